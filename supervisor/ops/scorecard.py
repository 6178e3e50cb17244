"""The scorecard: per window and in total, from grouped counts over the events index.

Nothing here replays events: one GROUP BY over (session_id, kind, reason) plus the system stream.
Its cost still grows with the event log, so the reads and the tallying run off the event loop
(Store.read_off_loop): a scorecard at a run's end never holds up the kill switch or the gate.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import anyio.to_thread

from .. import events as ev
from ..store import Store
from ..store.counts import EventCount, EventTallies

# scorecard field -> event kind it counts
FIELDS: dict[str, str] = {
    "cycles": ev.CYCLE_COMPLETED,
    "actions_started": ev.ACTION_STARTED,
    "actions_succeeded": ev.ACTION_SUCCEEDED,
    "actions_failed": ev.ACTION_FAILED,
    "denials": ev.ACTION_DENIED,
    "approvals_requested": ev.APPROVAL_REQUESTED,
    "approvals": ev.APPROVAL_GRANTED,
    "approvals_denied": ev.APPROVAL_DENIED,
    "expired": ev.APPROVAL_EXPIRED,
    "escalations": ev.APPROVAL_ESCALATED,
    "budget_exhaustions": ev.BUDGET_EXHAUSTED,
    "token_budget_exhaustions": ev.TOKEN_BUDGET_EXHAUSTED,
    "model_denials": ev.MODEL_ACCESS_DENIED,
    "killswitch_engagements": ev.KILLSWITCH_ENGAGED,
    "recoveries": ev.RECOVERY,
    "in_doubt": ev.ACTION_IN_DOUBT,
    "worker_crashes": ev.WORKER_CRASHED,
    "worker_restarts": ev.WORKER_RESTARTED,
    "quarantines": ev.WORKER_QUARANTINED,
    "windows_opened": ev.WINDOW_OPENED,
    "windows_closed": ev.WINDOW_CLOSED,
    "windows_missed": ev.WINDOW_MISSED,
    "checkpoints": ev.CHECKPOINT,
    "alerts": ev.ALERT,
    "shadow_disagreements": ev.POLICY_SHADOW,
}


@dataclass
class Scorecard:
    fleet: str
    total: dict[str, int]
    denials_by_reason: dict[str, int]
    pending: int
    windows: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"fleet": self.fleet, "total": self.total, "pending": self.pending,
                "denials_by_reason": self.denials_by_reason, "windows": self.windows}  # fmt: skip

    def render(self) -> str:
        t = self.total
        lines = [
            f"scorecard for fleet {self.fleet}",
            f"  windows   opened {t['windows_opened']}  closed {t['windows_closed']}"
            f"  missed {t['windows_missed']}",
            f"  cycles    {t['cycles']}   checkpoints {t['checkpoints']}",
            f"  actions   started {t['actions_started']}  succeeded {t['actions_succeeded']}"
            f"  failed {t['actions_failed']}  in-doubt {t['in_doubt']}",
            f"  approvals requested {t['approvals_requested']}  approved {t['approvals']}"
            f"  denied {t['approvals_denied']}  pending {self.pending}  expired {t['expired']}"
            f"  escalations {t['escalations']}",
            f"  denials   {t['denials']}  by reason: "
            + (", ".join(f"{k} {v}" for k, v in sorted(self.denials_by_reason.items())) or "none"),
            f"  budgets   exhausted {t['budget_exhaustions']}  token budgets exhausted "
            f"{t['token_budget_exhaustions']}  model denials {t['model_denials']}",
            f"  safety    kill-switch engagements {t['killswitch_engagements']}  recoveries "
            f"{t['recoveries']}  crashes {t['worker_crashes']}  restarts {t['worker_restarts']}"
            f"  quarantines {t['quarantines']}  alerts {t['alerts']}",
        ]
        return "\n".join(lines)


def _tally(counts: list[EventCount]) -> tuple[Counter[str], Counter[str]]:
    kinds: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    for _session, kind, reason, n in counts:
        if kind == ev.RECOVERY and reason == "clean":
            continue  # "recoveries" counts scans that repaired something
        kinds[kind] += n
        if kind == ev.ACTION_DENIED:
            reasons[reason or "unknown"] += n
    return kinds, reasons


def _fields(kinds: Counter[str]) -> dict[str, int]:
    return {name: kinds.get(kind, 0) for name, kind in FIELDS.items()}


async def compute(store: Store, fleet: str, *, per_window: bool = True) -> Scorecard:
    # Both halves off the event loop: the read (its own connection) and the tally, whose cost
    # grows with the windows and kinds in the log (tens of thousands of counts at a million
    # events held the loop for over 100 ms).
    tallies = await store.event_tallies(fleet, windows=per_window)
    return await anyio.to_thread.run_sync(_card, fleet, tallies)


def _card(fleet: str, tallies: EventTallies) -> Scorecard:
    by_session: dict[str, list[EventCount]] = defaultdict(list)
    for c in tallies.counts:
        by_session[c[0]].append(c)
    kinds, reasons = _tally(tallies.counts)
    card = Scorecard(
        fleet=fleet,
        total=_fields(kinds),
        denials_by_reason=dict(reasons),
        pending=tallies.pending_approvals,
    )
    for session in sorted(tallies.windows, key=lambda s: s.starts_at):
        s_kinds, s_reasons = _tally(by_session.get(session.id, []))
        card.windows.append({
            "session_id": session.id, "window": session.window_key, "status": session.status,
            "used_cost": session.used_cost, "used_actions": session.used_actions,
            **_fields(s_kinds), "denials_by_reason": dict(s_reasons),
        })  # fmt: skip
    return card


async def shadow(store: Store, fleet: str) -> dict[str, Any]:
    """`scorecard --shadow`: per window, the proposals the live policy decided (actions started
    and denied) and where the shadow candidate disagreed, by transition ("allow->deny")."""
    tallies = await store.event_tallies(fleet)
    decided: Counter[str] = Counter()
    disagreed: dict[str, Counter[str]] = defaultdict(Counter)
    for session_id, kind, reason, n in tallies.counts:
        if kind in (ev.ACTION_STARTED, ev.ACTION_DENIED):
            decided[session_id] += n
        elif kind == ev.POLICY_SHADOW:
            disagreed[session_id][reason or "unknown"] += n
    windows: list[dict[str, Any]] = []
    total: Counter[str] = Counter()
    for session in sorted(tallies.windows, key=lambda s: s.starts_at):
        moves = disagreed.get(session.id, Counter())
        total.update(moves)
        windows.append({
            "session_id": session.id, "window": session.window_key, "status": session.status,
            "decided": decided.get(session.id, 0), "disagreements": sum(moves.values()),
            "by_transition": dict(sorted(moves.items())),
        })  # fmt: skip
    return {"fleet": fleet, "disagreements": sum(total.values()),
            "by_transition": dict(sorted(total.items())), "windows": windows}  # fmt: skip


def render_shadow(data: dict[str, Any]) -> str:
    from ..cli import tables

    head = (
        f"shadow policy for fleet {data['fleet']}: {data['disagreements']} disagreements"
        + "".join(f", {k} {v}" for k, v in data["by_transition"].items())
    )
    body = tables.table(
        ["WINDOW", "STATUS", "DECIDED", "DISAGREED", "BY TRANSITION"],
        ([w["window"], w["status"], w["decided"], w["disagreements"],
          ", ".join(f"{k} {v}" for k, v in w["by_transition"].items()) or "-"]
         for w in data["windows"]),
        "no windows",
    )  # fmt: skip
    return f"{head}\n{body}"
