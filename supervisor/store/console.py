"""Reads for the operator console. The console asks these for what its pages show and never
names a query itself; its decisions go through the same modules as the CLI's (approvals,
kill switch, recovery, checkpoints).

Every function here reads through indexes only (see the named queries under "The operator
console" in sql/queries.sql), so a page costs the same however long the event log grows.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from .. import events as ev
from .base import Event, Session, plain_row, system_stream
from .records import ActionStatus
from .repository import Store

# A cursor above every event id: "from the newest".
NEWEST = 2**62

# Per-window trend series: series name -> event kind (denials are split by reason as well).
TREND_KINDS: dict[str, str] = {
    "approvals": ev.APPROVAL_GRANTED,
    "denials": ev.ACTION_DENIED,
    "budget_exhaustions": ev.BUDGET_EXHAUSTED,
    "token_exhaustions": ev.TOKEN_BUDGET_EXHAUSTED,
    "restarts": ev.WORKER_RESTARTED,
    "crashes": ev.WORKER_CRASHED,
    "alerts": ev.ALERT,
}
# Fleet-level series, counted from the system stream by the window their instant falls in.
SYSTEM_TREND_KINDS: dict[str, str] = {
    "recoveries": ev.RECOVERY,
    "killswitch_engagements": ev.KILLSWITCH_ENGAGED,
}


async def hosts(store: Store, fleet: str) -> list[dict[str, Any]]:
    """Hosts with heartbeat, whether each leads, and the worker slots it holds."""
    return [view.as_dict() for view in await store.host_views(fleet)]


async def workers(store: Store, fleet: str) -> list[dict[str, Any]]:
    return [w.as_dict() for w in await store.list_workers(fleet)]


async def store_switches(store: Store, fleet: str) -> list[dict[str, Any]]:
    """Kill switches kept in the store: fleet, session and worker scopes."""
    return [plain_row(r) for r in await store._fetchall("kill_switches", fleet)]


async def pending_summary(store: Store, fleet: str) -> tuple[int, Any]:
    """(pending approvals, when the oldest was raised or None)."""
    backlog = await store.approval_backlog(fleet=fleet)
    return backlog.pending, backlog.oldest_at


async def in_doubt_count(store: Store, fleet: str) -> int:
    row = await store._fetchrow("console_in_doubt_count", fleet)
    return int(row["n"]) if row else 0


async def active_alerts(store: Store, fleet: str, open_windows: list[Session]) -> list[Event]:
    """Alerts raised and not resolved, on the system stream and each open window's stream."""
    active: list[Event] = []
    for stream in [system_stream(fleet), *(s.id for s in open_windows)]:
        rows = await store._fetchall(
            "console_stream_kinds", stream, ev.ALERT, ev.ALERT_RESOLVED, ev.ALERT, 10_000
        )
        raised: dict[str, Event] = {}
        for event in sorted((Event.from_row(r) for r in rows), key=lambda e: e.seq):
            if event.kind == ev.ALERT:
                raised[event.reason or ""] = event
            else:
                raised.pop(event.reason or "", None)
        active.extend(raised.values())
    return sorted(active, key=lambda e: e.created_at)


async def pending_approvals(store: Store, fleet: str, limit: int = 500) -> list[dict[str, Any]]:
    return [a.as_dict() for a in await store.pending_approvals(fleet=fleet, limit=limit)]


async def decided_approvals(store: Store, fleet: str, limit: int = 100) -> list[dict[str, Any]]:
    return [a.as_dict() for a in await store.decided_approvals(fleet=fleet, limit=limit)]


async def approval(store: Store, approval_id: str) -> dict[str, Any] | None:
    found = await store.approval(approval_id)
    return found.as_dict() if found is not None else None


async def killswitch_history(store: Store, fleet: str, limit: int = 100) -> list[Event]:
    """Engagements and disengagements at every scope, newest first (with who and why)."""
    rows = await store._fetchall("console_stream_kinds", system_stream(fleet),
                                ev.KILLSWITCH_ENGAGED, ev.KILLSWITCH_DISENGAGED,
                                ev.KILLSWITCH_INVALID, limit)  # fmt: skip
    return [Event.from_row(r) for r in rows]


async def in_doubt_actions(store: Store, fleet: str, limit: int = 500) -> list[dict[str, Any]]:
    rows = await store.actions_with_status(fleet=fleet, status=ActionStatus.IN_DOUBT, limit=limit)
    return [a.as_dict() for a in rows]


async def checkpoints(store: Store, fleet: str, limit: int = 200) -> list[dict[str, Any]]:
    return [
        {"id": c.id, "fleet": c.fleet, "worker": c.worker, "cycle": c.cycle,
         "session_id": c.session_id, "last_seq": c.last_seq, "created_at": c.created_at.isoformat()}
        for c in await store.list_checkpoints(fleet, limit=limit)
    ]  # fmt: skip


async def tail(store: Store, fleet: str, *, worker: str = "", kind: str = "", session: str = "",
               command_id: str = "", before: int = NEWEST, limit: int = 200) -> list[Event]:  # fmt: skip
    """The newest events of the fleet, newest first, filtered; `before` pages back by id."""
    rows = await store._fetchall(
        "console_tail", fleet, system_stream(fleet), worker, worker, kind, kind, session,
        session, command_id, command_id, before, limit,
    )  # fmt: skip
    return [Event.from_row(r) for r in rows]


async def windows(store: Store, fleet: str, limit: int = 60) -> list[dict[str, Any]]:
    """The newest windows, oldest first, each with its budget and its counts per trend series
    (denials also by reason): the windows page's table and the trend charts' data."""
    sessions = await store.list_sessions(fleet, limit)
    sessions.reverse()
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    reasons: dict[str, Counter[str]] = defaultdict(Counter)
    kinds = list(TREND_KINDS.values())
    # Counts over the windows' events and the system stream: off the loop (they grow with it).
    window_rows, system = await store.read_off_loop(
        [("console_window_counts", (fleet, limit, *kinds)),
         ("console_stream_kinds", (system_stream(fleet), *SYSTEM_TREND_KINDS.values(),
                                   ev.RECOVERY, 100_000))],
        tuple,
    )  # fmt: skip
    for row in window_rows:
        n = int(row["n"])
        counts[row["session_id"]][row["kind"]] += n
        if row["kind"] == ev.ACTION_DENIED:
            reasons[row["session_id"]][row["reason"] or "unknown"] += n
    by_window: dict[str, Counter[str]] = defaultdict(Counter)
    for row in system:
        for s in sessions:
            if s.starts_at <= row["created_at"] < s.ends_at:
                by_window[s.id][row["kind"]] += 1
                break
    out = []
    for s in sessions:
        entry = s.as_dict()
        entry["counts"] = {name: counts[s.id][kind] for name, kind in TREND_KINDS.items()}
        entry["counts"].update(
            {name: by_window[s.id][kind] for name, kind in SYSTEM_TREND_KINDS.items()}
        )
        entry["denials_by_reason"] = dict(reasons[s.id])
        out.append(entry)
    return out
