"""The recovery scan: at startup before any worker runs, and again on a schedule.

It repairs what a crash or an outage leaves behind: windows past their end still open (closed as
recovered), actions with a started record and no outcome (marked in-doubt; re-run later only if
declared safe to retry, with the same command_id), approvals past their deadline (escalated or
denied), and a kill-switch file that does not verify (reported). Each scan is one RECOVERY event.
Every repair is an indexed query over unfinished rows, so cost does not grow with history.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import anyio.lowlevel
import structlog

from .. import events as ev
from ..governance.approvals import Approvals
from ..killswitch import HostSwitchFile
from ..store import NewEvent, Store, system_stream
from ..store.actions import ActionRow
from .leases import _alive

log = structlog.get_logger(__name__)


@dataclass
class RecoveryReport:
    windows_closed: int = 0
    in_doubt: int = 0
    approvals_escalated: int = 0
    approvals_expired: int = 0
    killswitch_invalid: bool = False
    found: dict[str, list[str]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"windows_closed": self.windows_closed, "in_doubt": self.in_doubt,
                "approvals_escalated": self.approvals_escalated,
                "approvals_expired": self.approvals_expired,
                "killswitch_invalid": self.killswitch_invalid, "found": self.found}  # fmt: skip

    @property
    def repairs(self) -> int:
        return (self.windows_closed + self.in_doubt + self.approvals_escalated
                + self.approvals_expired)  # fmt: skip


async def scan(
    store: Store,
    *,
    fleet: str,
    approvals: Approvals,
    host_switch: HostSwitchFile | None,
    by: str,
    started_before: datetime | None = None,
    ended_before: datetime | None = None,
    host: str | None = None,
    live_after: datetime | None = None,
    dry_run: bool = False,
    approvals_due: bool = True,
    owner: str | None = None,
    in_flight: Collection[str] = (),
) -> RecoveryReport:
    """`owner` is the scanning process's incarnation and `in_flight` the actions it has between
    its started record and its outcome: those are never touched, and its other started actions
    are orphans (abandoned by a cancelled cycle). Actions of another incarnation of this host,
    or of a host whose heartbeat stopped, are orphans. Wall time decides only for actions that
    record no owner (started before owners were recorded): `started_before`, at startup the
    daemon's own start, on the schedule now minus the longest an action may take.
    `ended_before`: only windows that ended before it are overdue (on the schedule: the
    daemon's own rotation closes a window at its end, and a scan at that instant is not to
    take it for abandoned and close it as recovered)."""
    # A clean scan never waits (its reads run on the loop's connection, its RECOVERY event is
    # buffered telemetry): yield once, or scans back to back hold the loop until the buffer's
    # flush (measured: 20-75 ms at 1M events, bench/loop_lag.py). No new cancellation point.
    await anyio.lowlevel.cancel_shielded_checkpoint()
    now = store.clock.now()
    report = RecoveryReport()

    overdue = await store.overdue_windows(fleet=fleet, now=min(now, ended_before or now))
    report.found["windows"] = [w.window_key for w in overdue]
    # Incarnations whose host row is running with a fresh heartbeat (and, on this host, whose
    # process exists: a daemon killed a moment ago still has a fresh heartbeat) own their actions.
    live: set[tuple[str, str]] = set()
    if live_after is not None:
        live = {(h.host_id, h.instance) for h in await store.list_hosts(fleet)
                if h.fresh(live_after)
                and (h.host_id != host or h.instance == owner or _alive(h.pid))}  # fmt: skip

    def orphaned(r: ActionRow) -> bool:
        if r.command_id in in_flight:
            return False  # this process is running it: a wall-clock step changes nothing
        if r.owner is not None:
            if owner is not None and r.owner == owner:
                return True  # started here and no longer in flight: abandoned (cancelled)
            return (r.host, r.owner) not in live  # its process is gone
        return (host is not None and r.host != host) or started_before is None \
            or r.started_at < started_before  # fmt: skip

    candidates = await store.orphan_candidates(fleet=fleet, host=host, live_after=live_after)
    orphans = [r for r in candidates if orphaned(r)]
    report.found["actions"] = [r.command_id for r in orphans]
    # While the daemon runs, its escalation duty owns due approvals (it wakes for each); the
    # scheduled scan leaves them to it so a routine tie is not counted as a repair.
    due = await store.due_approvals(fleet=fleet, now=now, limit=100_000) if approvals_due else []
    report.found["approvals"] = [r.id for r in due]
    if host_switch is not None:
        state = host_switch.read()
        report.killswitch_invalid = not state.valid
    if dry_run:
        report.windows_closed = len(overdue)
        report.in_doubt = len(orphans)
        for row in due:  # what escalate_due would do with each, without doing it
            step = approvals.chain.evaluate(row.created_at, now)
            if step.expired:
                report.approvals_expired += 1
            elif step.tier != row.tier:
                report.approvals_escalated += 1
        return report

    for window in overdue:
        report.windows_closed += int(await store.close_window(window.id, by=by, status="recovered"))
    for orphan in orphans:
        # Its reservation is released: an in-doubt action is not charged until an operator
        # resolves it as done.
        report.in_doubt += int(await store.mark_in_doubt(
            command_id=orphan.command_id, session_id=orphan.session_id, cost=orphan.cost,
            worker=orphan.worker, reason="in_doubt",
            payload={"action": orphan.name, "safe_to_retry": orphan.safe_to_retry},
        ))  # fmt: skip
    counts = await approvals.escalate_due() if approvals_due else {"escalated": 0, "expired": 0}
    report.approvals_escalated = counts["escalated"]
    report.approvals_expired = counts["expired"]
    # A scan that repaired something is state; a clean one is telemetry (buffered).
    repaired = bool(report.repairs or report.killswitch_invalid)
    await store.append(
        NewEvent(kind=ev.RECOVERY, session_id=system_stream(fleet), payload=report.as_dict(),
                 reason="repaired" if repaired else "clean", state_bearing=repaired)
    )  # fmt: skip
    if report.repairs or report.killswitch_invalid:
        log.warning("recovery.repaired", **report.as_dict())
    else:
        log.info("recovery.clean")
    return report


async def resolve_in_doubt(store: Store, command_id: str, *, done: bool, by: str) -> None:
    """An operator's verdict on an in-doubt action; done charges the budget, failed does not."""
    from ..errors import NotFound

    if await store.resolve_in_doubt(command_id=command_id, done=done, by=by) is None:
        raise NotFound(f"no in-doubt action {command_id!r}")
