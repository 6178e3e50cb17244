"""What the daemon runs for the kill switch, and what bench/killswitch.py measures: it watches
the host's switch file and the store's switches, and the moment one changes it stops the effects
in flight that the change reaches (emergency; halt_all with halt_in_flight = "terminate"), wakes
every waiting worker, records the change once (an event and an alert), and in an emergency
writes the snapshot of what was running.

The gate enforces the switches on every action whatever happens here: a watch that is late or
down delays only the waking, the events and the snapshot."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import structlog

from .. import events as ev
from ..actions import derive_id
from ..errors import StoreError
from ..store import NewEvent, Store, system_stream
from ..store.base import Subscription
from ..timing.clock import Clock
from .engage import host_switch_mtime, killswitch_command_id
from .hostfile import HostSwitchFile, SwitchState
from .modes import Mode

if TYPE_CHECKING:
    from ..ops.alerts.engine import Alerts

log = structlog.get_logger("supervisor.killswitch")


class Reach(Protocol):
    """What a switch change must reach at once: the gate's effects in flight and its waiters."""

    def stop_in_flight(self, scope: str, target: str, mode: Mode) -> int: ...

    def switch_moved(self, clock: Any) -> None: ...


class SwitchKeeper:
    def __init__(
        self,
        *,
        store: Store,
        gate: Reach,
        host_switch: HostSwitchFile,
        alerts: Alerts,
        clock: Clock,
        fleet: str,
        host_id: str,
        state_dir: Path,
        watch_interval: float,
        store_poll: float,
        workers: Callable[[], list[dict[str, Any]]] = list,
        on_write_failed: Callable[[str, Exception], Awaitable[None]] | None = None,
    ) -> None:
        self.store = store
        self.gate = gate
        self.host_switch = host_switch
        self.alerts = alerts
        self.clock = clock
        self.fleet = fleet
        self.host_id = host_id
        self.state_dir = state_dir
        self.watch_interval = watch_interval  # the host file's poll
        self.store_poll = store_poll  # the store's, while LISTEN delivers changes (Postgres)
        self.workers = workers  # the fleet's worker states, for the emergency snapshot
        self.on_write_failed = on_write_failed
        self._host_known: SwitchState | None = host_switch.read()

    async def poll_host(self) -> SwitchState:
        """One look at the host file; a change is acted on at once. Returns the state read."""
        state = self.host_switch.read()
        if state != self._host_known:
            self._host_known = state
            # First, before any store write: reach the effects in flight (emergency).
            self.gate.stop_in_flight("host", "", state.mode)
            self.gate.switch_moved(self.clock)
            try:
                await self.record_host(state)
            except StoreError as exc:  # the gate enforces the switch regardless
                log.error("killswitch.event_not_recorded", mode=state.mode.value, error=str(exc))
                if self.on_write_failed is not None:
                    await self.on_write_failed("killswitch", exc)
                self._host_known = None  # record it again on the next look
        return state

    async def watch_host(self) -> None:
        """`poll_host` every watch interval (the daemon calls it from its real-time loop)."""
        while True:
            await self.poll_host()
            await anyio.sleep(self.watch_interval)

    async def watch_store(self) -> None:
        """Fleet, session and worker switches live in the store. The gate reads them inside every
        started-record transaction (that is the enforcement); this watch makes a daemon notice a
        change at once (LISTEN/NOTIFY on Postgres, else a poll) to log it and, in emergency
        mode, write the snapshot."""
        changed = anyio.Event()

        def wake(_payload: str | None = None) -> None:
            changed.set()

        # LISTEN again whenever its connection goes (terminated, server restart, or a dead peer
        # that the ping finds), then read at once: a change made meanwhile sent no notification.
        sub: Subscription | None = None
        listens = True  # False once the backend says it has no notifications (SQLite)
        listen_after = 0.0
        known: dict[tuple[str, str], str] = {}
        first = True
        waits = False  # the first pass reads at once
        try:
            while True:
                if waits:
                    poll = self.watch_interval
                    if sub is not None:
                        poll = self.store_poll
                    with anyio.move_on_after(poll):
                        await changed.wait()
                    changed = anyio.Event()
                    if sub is not None and not await sub.check():
                        log.warning("killswitch.listen_lost")
                        with anyio.CancelScope(shield=True):
                            await sub.close()
                        sub = None
                waits = True
                if listens and sub is None and anyio.current_time() >= listen_after:
                    try:
                        sub = await self.store.backend.listen("acp_killswitch", wake, on_lost=wake)
                        listens = sub is not None
                        if sub is not None and not first:
                            log.info("killswitch.listening_again")
                    except StoreError as exc:
                        log.warning("killswitch.listen_failed", error=str(exc))
                        listen_after = anyio.current_time() + 1.0
                try:
                    records = await self.store.kill_switches(self.fleet)
                except StoreError:
                    continue  # the coordination loop reports an unreachable store
                current = {(r.scope, r.target): r.stored_mode for r in records}
                for r in records:
                    key, mode = (r.scope, r.target), r.stored_mode
                    if known.get(key, "disengaged") != mode and not (
                        first and mode == "disengaged"
                    ):
                        # An unknown stored mode reads as halt_all (SwitchRecord): fail closed.
                        self.gate.stop_in_flight(r.scope, r.target, r.mode)
                        self.gate.switch_moved(self.clock)
                        log.warning("killswitch.observed", scope=r.scope, target=r.target,
                                    mode=mode, by=r.changed_by, reason=r.reason)  # fmt: skip
                        if r.mode is Mode.EMERGENCY:
                            await self.snapshot(SwitchState(
                                mode=Mode.EMERGENCY, seq=0, reason=r.reason or "", by=r.changed_by or "",
                                at=r.updated_at.isoformat() if r.updated_at else "",
                                scope=r.scope))  # fmt: skip
                known, first = current, False
        finally:
            if sub is not None:
                with anyio.CancelScope(shield=True):
                    await sub.close()

    async def record_host(self, state: SwitchState) -> None:
        """Every change of the host switch is an event once, whoever changed it (CLI or hand)."""
        fleet = self.fleet
        if not state.valid:
            log.error("killswitch.invalid", problem=state.problem)
            await self.alerts.raise_alert("killswitch_engaged", session_id=None,
                                          detail={"scope": "host", "mode": "halt_all",
                                                  "invalid": True, "problem": state.problem})  # fmt: skip
            await self.store.once(
                derive_id("killswitch.invalid", fleet, state.problem or "", str(host_switch_mtime(self.state_dir))),
                NewEvent(kind=ev.KILLSWITCH_INVALID, session_id=system_stream(fleet),
                         reason="killswitch", payload={"problem": state.problem}),
            )  # fmt: skip
            return
        if state.seq == 0:
            return
        await self.store.raise_host_switch_mark(fleet, self.host_id, state.seq)
        kind = ev.KILLSWITCH_DISENGAGED if state.mode == Mode.DISENGAGED else ev.KILLSWITCH_ENGAGED
        detail = {"scope": "host", "mode": state.mode.value, "by": state.by, "reason": state.reason}
        if state.mode == Mode.DISENGAGED:
            await self.alerts.resolve("killswitch_engaged", session_id=None, detail=detail)
        else:
            await self.alerts.raise_alert("killswitch_engaged", session_id=None, detail=detail)
        await self.store.once(
            killswitch_command_id(fleet, "host", state.seq),
            NewEvent(kind=kind, session_id=system_stream(fleet), reason=state.mode.value,
                     payload={"scope": "host", "mode": state.mode.value, "seq": state.seq,
                              "by": state.by, "reason": state.reason}),
        )  # fmt: skip
        log.warning("killswitch.changed", mode=state.mode.value, by=state.by, reason=state.reason)
        if state.mode == Mode.EMERGENCY:
            await self.snapshot(state)

    async def snapshot(self, state: SwitchState) -> None:
        """The emergency snapshot: what was running, open and pending when it was engaged."""
        try:
            await self._emergency_snapshot(state)
        except (StoreError, OSError) as exc:
            log.error("killswitch.snapshot_failed", error=str(exc))

    async def _emergency_snapshot(self, state: SwitchState) -> None:
        stamp = state.seq if state.scope == "host" else state.at.replace(":", "")
        path = self.state_dir / f"emergency-{state.scope}-{stamp}.json"
        if path.exists():
            return
        snapshot = {
            "at": self.clock.now().isoformat(), "switch": {"seq": state.seq, "by": state.by, "reason": state.reason},
            "workers": self.workers(),
            "open_windows": [s.as_dict() for s in await self.store.open_sessions(self.fleet)],
            "pending_approvals": [a.as_dict() for a in await self.store.pending_approvals(fleet=self.fleet, limit=10_000)],
        }  # fmt: skip
        path.write_text(json.dumps(snapshot, indent=2, sort_keys=True))
        await self.store.append(NewEvent(kind=ev.ALERT, session_id=system_stream(self.fleet),
                                    reason="killswitch_emergency",
                                    payload={"snapshot": str(path), "by": state.by}))  # fmt: skip
        log.error("killswitch.emergency", snapshot=str(path))
