"""Drills: rehearse an emergency on a throwaway fleet and check, from the store, that it held.

Each drill builds its own temporary state directory and SQLite store, never touching the
configured ones, and returns a `DrillReport`: named checks (each passed or failed, with a detail
line) and figures (measurements). A drill never raises for a failed check: it reports it.

- `killswitch_drill`: a real `Daemon` runs `workers` support-agent replicas at a fast cadence;
  the host kill switch is engaged at `halt_all` through the signed switch file (the path and
  format `acp-supervisor killswitch engage` uses); the drill measures how fast the fleet halts,
  holds the switch for `seconds`, and checks that nothing started and no effect happened after
  the engage returned. Then it disengages, checks that actions resume, and stops the daemon.
- `approval_backlog_drill`: `count` pending approvals on a virtual clock are walked through the
  configured escalation chain; each must reach each tier exactly on time, and all must be denied
  by default at the deadline, none earlier.
"""

from __future__ import annotations

import dataclasses
import json
import math
import secrets as _secrets
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.to_thread

from .. import events as ev
from ..actions import Action
from ..config import Config, WorkerSpec
from ..errors import StoreConfigError, StoreError, UsageError
from ..governance.approvals import Approvals
from ..governance.budgets import ModelGovernor, TokenBudgets
from ..governance.policy import Policy
from ..killswitch import HostSwitchFile, Mode, load_secret
from ..store import Event, Store, open_store, system_stream
from ..store.records import ActionStatus
from ..timing.clock import SystemClock, VirtualClock

if TYPE_CHECKING:
    from ..runtime.daemon import Daemon

Check = Callable[[str, bool, str], None]

SUPPORT_AGENT = "workers.support:SupportAgent"
DRILL_FLEET = "drill"
DRILL_WORKER = "drill-support"


_WALL = SystemClock()  # a drill measures a real fleet in real time
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)  # before anything a drill's store holds

T = TypeVar("T")


@dataclasses.dataclass
class DrillReport:
    """A drill's verdict: passed when every check passed (and there was at least one)."""

    name: str
    passed: bool
    checks: list[tuple[str, bool, str]]
    figures: dict[str, Any]

    @classmethod
    def of(
        cls, name: str, checks: list[tuple[str, bool, str]], figures: dict[str, Any]
    ) -> DrillReport:
        return cls(name, bool(checks) and all(ok for _c, ok, _d in checks), checks, figures)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "passed": self.passed,
            "checks": [{"check": c, "ok": ok, "detail": d} for c, ok, d in self.checks],
            "figures": dict(self.figures),
        }

    def render(self) -> str:
        lines = [f"drill {self.name}: {'PASS' if self.passed else 'FAIL'}"]
        for check, ok, detail in self.checks:
            mark = "ok" if ok else "FAIL"
            lines.append(f"  [{mark:>4}] {check}" + (f": {detail}" if detail else ""))
        if self.figures:
            lines.append("figures:")
            width = max(len(k) for k in self.figures)
            for key, value in self.figures.items():
                shown = f"{value:.1f}" if isinstance(value, float) else str(value)
                lines.append(f"  {key:<{width}}  {shown}")
        return "\n".join(lines)


def _iso(instant: datetime) -> str:
    """An instant as the switch file records it: UTC, to the microsecond."""
    return instant.astimezone(UTC).isoformat(timespec="microseconds")


def _ms(delta: timedelta) -> float:
    return round(delta.total_seconds() * 1000.0, 1)


@contextmanager
def _scratch(prefix: str, keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


# -- the kill-switch drill ------------------------------------------------------------------------


def drill_config(
    config: Config,
    state_dir: Path,
    *,
    workers: int,
    secret_file: Path,
    include_config_workers: bool = False,
) -> Config:
    """The throwaway fleet's config: `workers` support-agent replicas every 50 ms in continuous
    mode on a temp SQLite store, no window budget, a policy that lets low and medium risk through.

    With `include_config_workers`, the config's in-process workers join the drill (external
    command workers never do: a drill must not run real programs).
    """
    hour = dataclasses.replace(
        config.horizon("hour"), cycle_every=timedelta(milliseconds=50), max_cost=None,
        max_actions=None,
    )  # fmt: skip
    fleet = [WorkerSpec(name=DRILL_WORKER, target=SUPPORT_AGENT, replicas=workers,
                        cycle_deadline=30.0)]  # fmt: skip
    if include_config_workers:
        fleet += [s for s in config.workers if s.target is not None and s.name != DRILL_WORKER]
    return dataclasses.replace(
        config,
        path=None,
        fleet=DRILL_FLEET,
        host_id=f"{config.host_id}-drill",
        state_dir=state_dir,
        db_url=f"sqlite:///{state_dir / 'drill.db'}?synchronous=normal",
        db_explicit=True,
        profile="hour",
        horizons={**config.horizons, "hour": hour},
        shutdown_timeout=5.0,
        recovery_every=3600.0,
        killswitch_secret_file=str(secret_file),
        policy=Policy(risk={"low": "allow", "medium": "allow", "high": "deny", "critical": "deny"}),
        token_budgets=TokenBudgets(),
        models=ModelGovernor(),
        workers=tuple(fleet),
    )


class _Probe:
    """Reads of the drill's store beside the running daemon, through a store of its own (its
    own connection: WAL lets it read while the daemon writes). Opened once the daemon has
    created and migrated the database; until then, and on a failed read, it sees nothing."""

    def __init__(self, url: str, fleet: str) -> None:
        self.url = url
        self.fleet = fleet
        self._store: Store | None = None

    async def _db(self) -> Store | None:
        if self._store is None:
            try:
                self._store = await open_store(self.url, _WALL)
            except (StoreError, StoreConfigError):
                return None  # not there or not migrated yet
        return self._store

    async def _read(self, read: Callable[[Store], Awaitable[T]], nothing: T) -> T:
        store = await self._db()
        if store is None:
            return nothing
        try:
            return await read(store)
        except StoreError:
            return nothing

    async def started(self, after: datetime = _EPOCH) -> int:
        return await self._read(
            lambda s: s.count_events_since(fleet=self.fleet, kind=ev.ACTION_STARTED, after=after),
            0,
        )

    async def last_started(self) -> datetime | None:
        return await self._read(
            lambda s: s.last_event_at(fleet=self.fleet, kind=ev.ACTION_STARTED), None
        )

    async def observed(self, kind: str, seq: int) -> datetime | None:
        """When the daemon recorded the host switch change with this seq."""
        none: list[Event] = []
        events = await self._read(
            lambda s: s.stream_events_of_kind(stream=system_stream(self.fleet), kind=kind,
                                              limit=10_000),
            none,
        )  # fmt: skip
        for event in events:
            if event.payload.get("scope") == "host" and event.payload.get("seq") == seq:
                return event.created_at
        return None

    async def refused(self, after: datetime) -> int:
        """Actions refused by a kill switch after `after`."""
        return await self._read(
            lambda s: s.count_events_since(fleet=self.fleet, kind=ev.ACTION_DENIED, after=after,
                                           reason="killswitch"),
            0,
        )  # fmt: skip

    async def action_rows_started(self, after: datetime) -> int:
        return await self._read(
            lambda s: s.count_actions_started_since(fleet=self.fleet, after=after), 0
        )

    async def halted(self) -> int:
        none: dict[ActionStatus, int] = {}
        counts = await self._read(lambda s: s.count_actions_by_status(self.fleet), none)
        return counts.get(ActionStatus.HALTED, 0)

    async def close(self) -> None:
        if self._store is not None:
            store, self._store = self._store, None
            await store.close()


def _effects_after(path: Path, offset: int, engaged: datetime) -> list[dict[str, Any]]:
    """Effect-log entries written past `offset` (the log's size when the engage returned) or
    stamped after the engage instant."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    late: list[dict[str, Any]] = []
    position = 0
    for raw in data.splitlines(keepends=True):
        start, position = position, position + len(raw)
        try:
            entry = json.loads(raw)
        except ValueError:
            entry = {"unparsable": raw.decode(errors="replace").strip()}
        at = entry.get("at") if isinstance(entry, dict) else None
        stamped_late = False
        if isinstance(at, str):
            try:
                stamped_late = datetime.fromisoformat(at) > engaged
            except ValueError:
                stamped_late = False
        if start >= offset or stamped_late:
            late.append(entry if isinstance(entry, dict) else {"entry": entry})
    return late


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


async def killswitch_drill(
    config: Config,
    *,
    workers: int = 10,
    seconds: float = 2.0,
    secret: bytes | None = None,
    include_config_workers: bool = False,
    keep: bool = False,
) -> DrillReport:
    """Engage `halt_all` on a running throwaway fleet and check that it halts at once.

    `secret` signs the drill's switch file (a random one when None: the drill's files are
    throwaway). `keep` leaves the temp directory in place (its path is in the figures).
    """
    from ..runtime.daemon import Daemon, effects_path, host_switch_path
    from .systemd import Notifier

    if workers < 1:
        raise UsageError(f"a kill-switch drill needs at least one worker, got {workers}")
    if not (math.isfinite(seconds) and seconds > 0):
        raise UsageError(f"the halt must last a positive number of seconds, got {seconds}")
    checks: list[tuple[str, bool, str]] = []
    figures: dict[str, Any] = {"workers": workers, "hold_s": seconds}

    def check(name: str, ok: bool, detail: str) -> None:
        checks.append((name, ok, detail))

    with _scratch("acp-drill-killswitch-", keep) as tmp:
        state = tmp / "state"
        state.mkdir()
        secret_file = tmp / "killswitch.secret"
        secret_file.write_bytes(secret if secret is not None else _secrets.token_hex(32).encode())
        secret_file.chmod(0o600)
        key = load_secret({}, str(secret_file))  # as the daemon reads it (trailing newline off)
        cfg = drill_config(config, state, workers=workers, secret_file=secret_file,
                           include_config_workers=include_config_workers)  # fmt: skip
        if keep:
            figures["state_dir"] = str(state)
        daemon = Daemon(cfg, env={}, notifier=Notifier({}), install_signals=False)
        switch = HostSwitchFile(host_switch_path(state), key)
        effects = effects_path(state)
        probe = _Probe(cfg.db_url, cfg.fleet)
        outcome: dict[str, BaseException | None] = {}

        async def run_daemon() -> None:
            try:
                await daemon.run()
                outcome["error"] = None
            except Exception as exc:  # reported as a failed check, not raised
                outcome["error"] = exc

        def alive() -> bool:
            return "error" not in outcome

        async def stopped() -> bool:
            return not alive()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(run_daemon)
                try:
                    await _killswitch_phases(daemon, switch, probe, effects, seconds, workers,
                                             alive, check, figures)  # fmt: skip
                finally:
                    with anyio.CancelScope(shield=True):
                        daemon.clock.ring(daemon.stopping)
                        with anyio.move_on_after(cfg.shutdown_timeout + 10) as waited:
                            await _until(stopped)
                        if waited.cancelled_caught:
                            tg.cancel_scope.cancel()
                error = outcome.get("error")
                if error is not None:
                    detail = f"{type(error).__name__}: {error}"
                else:
                    detail = "did not stop within the shutdown timeout" if alive() else ""
                check("daemon stopped cleanly", not alive() and error is None, detail)
        finally:
            with anyio.CancelScope(shield=True):
                await probe.close()
    return DrillReport.of("killswitch", checks, figures)


async def _killswitch_phases(
    daemon: Daemon,
    switch: HostSwitchFile,
    probe: _Probe,
    effects: Path,
    seconds: float,
    workers: int,
    alive: Callable[[], bool],
    check: Check,
    figures: dict[str, Any],
) -> None:
    # 1. the fleet runs and actions flow
    want = max(workers, 10)
    t0 = _WALL.monotonic()

    async def flowing_or_gone() -> bool:
        return not alive() or await probe.started() >= want

    with anyio.move_on_after(20.0):
        await _until(flowing_or_gone)
    flowing = await probe.started()
    check("actions flowing before the engage", flowing >= want,
          f"{flowing} started in {_WALL.monotonic() - t0:.1f}s (wanted {want})")  # fmt: skip
    if flowing < want:
        return

    # 2. engage halt_all through the signed file, as the CLI does, while the fleet runs
    begin = _WALL.now()
    engaged_state = await anyio.to_thread.run_sync(
        lambda: switch.write(
            Mode.HALT_ALL, reason="kill-switch drill", by="drill", at=_iso(_WALL.now())
        )
    )
    engaged = _WALL.now()  # the instant `engage` returned to the operator
    offset = _size(effects)
    figures["engage_write_ms"] = _ms(engaged - begin)
    figures["actions_before_engage"] = flowing

    # 3. the daemon observes the switch; nothing new starts
    async def engage_observed() -> bool:
        return await probe.observed(ev.KILLSWITCH_ENGAGED, engaged_state.seq) is not None

    with anyio.move_on_after(min(seconds, 5.0)):
        await _until(engage_observed)
    observed = await probe.observed(ev.KILLSWITCH_ENGAGED, engaged_state.seq)
    when = f"{_ms(observed - engaged):.1f} ms after the engage" if observed else "never"
    check("daemon observed the switch", observed is not None,
          f"KILLSWITCH_ENGAGED (seq {engaged_state.seq}) recorded {when}")  # fmt: skip
    last = await probe.last_started()
    halted_at = max(x for x in (observed, last, engaged) if x is not None)
    figures["time_to_halt_ms"] = max(0.0, _ms(halted_at - engaged))
    figures["observed_ms"] = _ms(observed - engaged) if observed else None
    if last is not None and last <= engaged:
        figures["last_start_before_engage_ms"] = _ms(engaged - last)

    # 4. hold the switch, then verify from the store and the effect log
    remaining = seconds - (_WALL.now() - engaged).total_seconds()
    if remaining > 0:
        await anyio.sleep(remaining)
    started = await probe.started(engaged)
    rows = await probe.action_rows_started(engaged)
    check("no action started after the engage", started == 0 and rows == 0,
          f"{started} ACTION_STARTED events and {rows} action rows after it")  # fmt: skip
    late = _effects_after(effects, offset, engaged)
    detail = f"{len(late)} effect(s) after the engage"
    if late:
        detail += f" (first: {json.dumps(late[0], sort_keys=True)[:160]})"
    check("no effect after the engage", not late, detail)
    refused = await probe.refused(engaged)
    check("workers kept cycling and were refused", alive() and refused > 0,
          f"{refused} refusals with reason killswitch while halted"
          + ("" if alive() else "; the daemon is not running"))  # fmt: skip
    figures["refused_while_halted"] = refused
    figures["halted_in_flight"] = await probe.halted()
    figures["effects_after_engage"] = len(late)
    figures["started_after_engage"] = started

    # 5. disengage: actions resume
    freed = await anyio.to_thread.run_sync(
        lambda: switch.write(
            Mode.DISENGAGED, reason="kill-switch drill over", by="drill", at=_iso(_WALL.now())
        )
    )
    disengaged = _WALL.now()

    async def resumed() -> datetime | None:
        last = await probe.last_started()
        return last if last is not None and last > disengaged else None

    async def has_resumed() -> bool:
        return await resumed() is not None

    async def disengage_observed() -> bool:
        return await probe.observed(ev.KILLSWITCH_DISENGAGED, freed.seq) is not None

    with anyio.move_on_after(5.0):
        await _until(has_resumed)
    first = await resumed()
    with anyio.move_on_after(2.0):
        await _until(disengage_observed)
    seen = await probe.observed(ev.KILLSWITCH_DISENGAGED, freed.seq)
    detail = f"first start {_ms(first - disengaged):.1f} ms after it" if first else "none within 5s"
    check("actions resume after the disengage", first is not None and seen is not None,
          detail + ("" if seen else "; no KILLSWITCH_DISENGAGED recorded"))  # fmt: skip
    figures["resume_ms"] = _ms(first - disengaged) if first else None


async def _until(condition: Callable[[], Awaitable[bool]], interval: float = 0.01) -> None:
    """Poll `condition` (a cheap read of the drill's store or files) until it holds."""
    while True:
        if await condition():
            return
        await anyio.sleep(interval)


# -- the approval backlog drill -------------------------------------------------------------------


async def approval_backlog_drill(
    config: Config, *, count: int = 100, keep: bool = False
) -> DrillReport:
    """Walk `count` pending approvals through the configured chain on a virtual clock."""
    if count < 1:
        raise UsageError(f"an approval backlog drill needs at least one approval, got {count}")
    chain = config.approvals
    checks: list[tuple[str, bool, str]] = []
    tiers_text = " -> ".join([chain.initial_tier, *(s.tier for s in chain.steps)])
    figures: dict[str, Any] = {"approvals": count, "timeout_s": chain.timeout, "tiers": tiers_text}

    def check(name: str, ok: bool, detail: str) -> None:
        checks.append((name, ok, detail))

    with _scratch("acp-drill-approvals-", keep) as tmp:
        t0 = _WALL.now().replace(microsecond=0)
        clock = VirtualClock(t0)
        store = await open_store(f"sqlite:///{tmp / 'drill.db'}?synchronous=normal", clock,
                                 migrate=True)  # fmt: skip
        try:
            approvals = Approvals(store, chain, DRILL_FLEET)
            session, _ = await store.open_window(
                fleet=DRILL_FLEET, key="approval-backlog-drill", starts_at=t0,
                ends_at=t0 + timedelta(seconds=chain.timeout + 3600), max_cost=None,
                max_actions=None, by="drill",
            )  # fmt: skip
            started = time.perf_counter()
            ids: list[str] = []
            for i in range(count):
                row = await approvals.request(
                    key=f"drill-backlog-{i}",
                    action=Action(name="drill.backlog", params={"n": i}, risk="high"),
                    worker=f"drill-{i % 10}", session_id=session.id, escalate_now=False,
                    correlation_id=None,
                )  # fmt: skip
                ids.append(row.id)
            figures["create_ms"] = round((time.perf_counter() - started) * 1000, 1)
            pending = await store.pending_approvals(fleet=DRILL_FLEET, limit=count + 1)
            check("backlog created, pending at the first tier",
                  len(pending) == count and all(r.tier == chain.initial_tier for r in pending),
                  f"{len(pending)} pending at {sorted({r.tier for r in pending})}")  # fmt: skip

            async def tiers() -> dict[str, tuple[str, str]]:
                rows = await store.list_approvals(fleet=DRILL_FLEET, limit=count + 1)
                return {r.id: (r.status.value, r.tier) for r in rows}

            async def duty() -> float:
                """What the daemon's escalation duty does when woken: escalate until nothing
                more is due (escalate_due works in batches)."""
                began = time.perf_counter()
                for _round in range(count // 1000 + 3):
                    await approvals.escalate_due()
                    if approvals.next_due is None or approvals.next_due > clock.now():
                        break
                return (time.perf_counter() - began) * 1000

            # Expected instants from the configured numbers, not from the chain's own arithmetic.
            deadline = t0 + timedelta(seconds=chain.timeout)
            boundaries = [(s.tier, t0 + timedelta(seconds=s.after)) for s in chain.steps]
            boundaries.append(("deadline", deadline))
            previous = chain.initial_tier
            slowest = 0.0
            for label, at in boundaries:
                # just before the instant: nothing may move yet
                before = at - timedelta(milliseconds=1)
                if before > clock.now():
                    clock.advance(before - clock.now())
                slowest = max(slowest, await duty())
                early = {k: v for k, v in (await tiers()).items() if v != ("pending", previous)}
                check(f"nothing moves before {label} (+{_ago(at, t0)})", not early,
                      f"{len(early)} approval(s) moved early" if early else
                      f"all {count} still pending at {previous}")  # fmt: skip
                # at the instant: every approval moves
                clock.advance(at - clock.now())
                slowest = max(slowest, await duty())
                state = await tiers()
                if label == "deadline":
                    done = [k for k in ids if state.get(k, ("", ""))[0] == "expired"]
                    check(f"all denied by default at the deadline (+{_ago(at, t0)})",
                          len(done) == count, f"{len(done)}/{count} expired")  # fmt: skip
                else:
                    done = [k for k in ids if state.get(k) == ("pending", label)]
                    check(f"all reached {label} on time (+{_ago(at, t0)})", len(done) == count,
                          f"{len(done)}/{count} at {label}")  # fmt: skip
                    previous = label
            figures["slowest_escalation_pass_ms"] = round(slowest, 1)

            events = await store.replay(session.id, 0, 10 * count * (len(chain.steps) + 3))
            escalated: dict[str, list[tuple[str, datetime]]] = {}
            expired: dict[str, datetime] = {}
            for e in events:
                if e.kind == ev.APPROVAL_ESCALATED:
                    moves = escalated.setdefault(e.payload["approval"], [])
                    moves.append((e.payload["to"], e.created_at))
                elif e.kind == ev.APPROVAL_EXPIRED:
                    expired[e.payload["approval"]] = e.created_at
            expected: list[tuple[str, datetime]] = []
            tier = chain.initial_tier
            for s in chain.steps:
                if s.tier != tier:  # a step to the same tier moves nothing visible
                    expected.append((s.tier, t0 + timedelta(seconds=s.after)))
                tier = s.tier
            wrong = [k for k in ids if escalated.get(k, []) != expected]
            check("APPROVAL_ESCALATED once per tier, at each step's instant", not wrong,
                  f"{len(wrong)} approval(s) with other escalations" if wrong else
                  f"{count * len(expected)} events")  # fmt: skip
            late_or_early = [k for k in ids if expired.get(k) != deadline]
            check("APPROVAL_EXPIRED for each at its deadline, none earlier", not late_or_early,
                  f"{len(late_or_early)} missing or off their deadline" if late_or_early else
                  f"{count} events at +{_ago(deadline, t0)}")  # fmt: skip
            figures["escalations"] = sum(len(v) for v in escalated.values())
            figures["expired"] = len(expired)
        finally:
            await store.close()
    return DrillReport.of("approval-backlog", checks, figures)


def _ago(at: datetime, t0: datetime) -> str:
    from ..configparse import format_duration

    seconds = (at - t0).total_seconds()
    return format_duration(seconds) if seconds > 0 else "0s"


__all__ = ["DrillReport", "approval_backlog_drill", "drill_config", "killswitch_drill"]
