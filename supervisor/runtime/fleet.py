"""Worker supervision: every worker instance is one task that runs its cycles, survives its own
crashes with exponential backoff and jitter, goes to a visible quarantine when it restarts too
often, is cancelled when a cycle hangs past its deadline, and checkpoints every N cycles.
"""

from __future__ import annotations

import importlib
import math
import random
import sys
import traceback
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import anyio
import structlog

from .. import events as ev
from ..actions import derive_id
from ..config import Backoff, WorkerSpec
from ..errors import ConfigError, GovernedRefusal, StateWriteError, StoreError
from ..governance.gate import Gate
from ..store import NewEvent, Session, Store, system_stream
from ..timing.clock import Clock
from ..timing.horizons import HorizonProfile
from ..timing.sessions import WindowManager
from ..timing.windows import CronSchedule
from .checkpoints import Checkpoints
from .worker import CycleContext, EffectLog, Worker

log = structlog.get_logger(__name__)

WorkerFactory = Callable[[str, dict[str, Any]], Worker]


def load_worker_class(spec: WorkerSpec, search: Iterable[Path] = ()) -> WorkerFactory:
    """Import `module:Class` and check it implements the worker API (ConfigError naming it).

    The module is looked for on the Python path, then in the `search` folders (the config
    file's and the working directory): the `acp-supervisor` script's own path does not hold
    the working directory, as `python -m` does."""
    assert spec.target is not None
    module_name, _, class_name = spec.target.partition(":")
    added = False
    for folder in search:
        entry = str(folder.absolute())
        if entry not in sys.path:
            sys.path.append(entry)  # after the installed packages: never shadows one of them
            added = True
    if added:
        importlib.invalidate_caches()
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"worker {spec.name!r}: cannot import {module_name!r}: {exc}") from None
    except SyntaxError as exc:  # a typo in the worker's file: its line, not a traceback
        raise ConfigError(f"worker {spec.name!r}: cannot import {module_name!r}: {exc.msg} "
                          f"({exc.filename}, line {exc.lineno})") from None  # fmt: skip
    except Exception as exc:  # the module's own code raised while it was imported
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        raise ConfigError(f"worker {spec.name!r}: importing {module_name!r} raised "
                          f"{type(exc).__name__}: {exc} ({frame.filename}, line {frame.lineno})"
                          ) from None  # fmt: skip
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ConfigError(f"worker {spec.name!r}: {module_name!r} has no class {class_name!r}")
    if not (isinstance(cls, type) and issubclass(cls, Worker)):
        raise ConfigError(
            f"worker {spec.name!r}: {spec.target} does not implement the worker API "
            "(subclass supervisor.Worker with async def cycle(self, ctx))"
        )
    if cls.cycle is Worker.cycle:
        raise ConfigError(f"worker {spec.name!r}: {spec.target} does not define cycle(ctx)")
    factory: WorkerFactory = cls
    return factory


@dataclass
class WorkerStatus:
    name: str
    spec: WorkerSpec
    state: str = "starting"  # starting running stalled backoff quarantined stopping stopped
    restarts: int = 0
    crashes: int = 0
    hangs: int = 0
    cycles: int = 0
    cycle: int = 0
    last_error: str | None = None
    session_id: str | None = None
    pending: list[tuple[NewEvent, datetime]] = field(default_factory=list)
    # Monotonic instant of the last completed cycle (or of the start): the stall check's base.
    progress_at: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state, "restarts": self.restarts,
                "crashes": self.crashes, "hangs": self.hangs, "cycle": self.cycle,
                "last_error": self.last_error, "session_id": self.session_id}  # fmt: skip


class Fleet:
    def __init__(
        self,
        *,
        fleet: str,
        host: str,
        store: Store,
        gate: Gate,
        windows: WindowManager,
        checkpoints: Checkpoints,
        clock: Clock,
        profile: HorizonProfile,
        timezone: ZoneInfo,
        anchor: datetime,
        run_end: datetime | None,
        effects: EffectLog,
        seed: int,
        stopping: anyio.Event,
        on_alert: Callable[[str, str | None, dict[str, Any]], Awaitable[None]] | None = None,
    ) -> None:
        self.fleet = fleet
        self.host = host
        self.store = store
        self.gate = gate
        self.windows = windows
        self.checkpoints = checkpoints
        self.clock = clock
        self.profile = profile
        self.timezone = timezone
        self.anchor = anchor
        self.run_end = run_end
        # Identifies the horizon run in checkpoints (a resumed run keeps each worker's base cycle).
        self.run_key = f"{profile.name}@{anchor.isoformat()}" if run_end is not None else None
        self.bases: dict[str, int] = {}
        self.effects = effects
        self.seed = seed
        self.stopping = stopping
        self.status: dict[str, WorkerStatus] = {}
        # Per instance: set to stop it after its current cycle (shutdown, reload, slot handed over).
        self.stop_events: dict[str, anyio.Event] = {}
        # Raises an alert (condition, session_id, detail); set by the daemon.
        self.on_alert = on_alert
        self.in_flight = 0
        self.idle = anyio.Event()
        self.idle.set()
        # Per instance since this process started (metrics read copies from another thread).
        self.restart_counts: dict[str, int] = {}
        self.quarantine_counts: dict[str, int] = {}

    def add(self, spec: WorkerSpec) -> list[str]:
        names = spec.instance_names()
        for name in names:
            self.status[name] = WorkerStatus(name=name, spec=spec)
        return names

    def add_instance(self, name: str, spec: WorkerSpec) -> None:
        if name not in self.status:
            self.status[name] = WorkerStatus(name=name, spec=spec)

    def stop_instance(self, name: str) -> None:
        event = self.stop_events.get(name)
        if event is not None:
            self.clock.ring(event)

    def stop_all(self) -> None:
        for name in list(self.stop_events):
            self.stop_instance(name)

    def by_state(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for st in self.status.values():
            counts[st.state] = counts.get(st.state, 0) + 1
        return counts

    async def _set_state(self, st: WorkerStatus, state: str) -> None:
        # Checkpoints write the same state again (for the cycle shown in `status`): log changes only.
        if st.state != state:
            log.info("worker.state", worker=st.name, state=state)
        st.state = state
        try:
            await self.store.record_worker(
                fleet=self.fleet, name=st.name, host=self.host, state=state, restarts=st.restarts,
                last_error=st.last_error, cycle=st.cycle, session_id=st.session_id,
                at=self.clock.now(),
            )  # fmt: skip
        except StateWriteError as exc:
            log.warning("worker.status_write_failed", worker=st.name, error=str(exc))
            await self.state_write_failed(st.session_id, worker=st.name, error=str(exc))

    async def state_write_failed(self, session_id: str | None, **detail: Any) -> None:
        """Every failed state write is the `state_write_failed` alert, not only a log line
        (the alerts module logs and delivers it even when the store cannot record it)."""
        if self.on_alert is not None:
            try:
                await self.on_alert("state_write_failed", session_id, dict(detail))
            except Exception as exc:  # never let the alert hide the failure it reports
                log.error("alert.failed", condition="state_write_failed", error=str(exc))

    # -- scheduling -------------------------------------------------------------------------------

    def _cadence(self, spec: WorkerSpec) -> timedelta:
        return timedelta(seconds=spec.cycle_every) if spec.cycle_every else self.profile.cycle_every

    def _slot_time(self, spec: WorkerSpec, cycle: int) -> datetime:
        return self.anchor + self._cadence(spec) * cycle

    def _first_slot_at_or_after(self, spec: WorkerSpec, instant: datetime) -> int:
        cadence = self._cadence(spec).total_seconds()
        elapsed = (instant - self.anchor).total_seconds()
        slot = max(0, int(elapsed // cadence))
        while self._slot_time(spec, slot) < instant:
            slot += 1
        return slot

    def _missed_slots(
        self, spec: WorkerSpec, slot_at: str | None, written_at: datetime, resume_slot: int
    ) -> int:
        """Slots of the real clock between the checkpointed cycle's slot (or, for a checkpoint
        that does not say, its write time) and the slot this start resumes at."""
        try:
            last = datetime.fromisoformat(slot_at) if slot_at else written_at
        except (TypeError, ValueError):
            last = written_at
        gap = (self._slot_time(spec, resume_slot) - last) / self._cadence(spec)
        return max(0, math.ceil(gap - 1e-9) - 1)

    async def _skipped(self, st: WorkerStatus, skipped: int, next_cycle: int) -> None:
        """One event per worker start: how many slots passed while it was not running."""
        log.info("worker.cycles_skipped", worker=st.name, skipped=skipped, next_cycle=next_cycle)
        current = self.windows.current
        await self._record(NewEvent(
            kind=ev.CYCLES_SKIPPED, worker=st.name,
            session_id=current.id if current is not None else system_stream(self.fleet),
            payload={"skipped": skipped, "next_cycle": next_cycle},
        ))  # fmt: skip

    def stall_limit(self, spec: WorkerSpec) -> float | None:
        """Seconds without a completed cycle after which a worker is stalled; None for cron
        schedules (their gaps are the schedule's own)."""
        if spec.schedule is not None:
            return None
        return 2 * self._cadence(spec).total_seconds() + spec.cycle_deadline

    async def check_stalls(self) -> list[WorkerStatus]:
        """Mark running workers that completed no cycle within their stall limit as `stalled`
        (visible in `status`); returns every worker stalled now. A completed cycle clears it."""
        now = self.clock.monotonic()
        stalled = []
        for st in list(self.status.values()):
            limit = self.stall_limit(st.spec)
            if limit is None or st.state not in ("running", "stalled"):
                continue
            if now - st.progress_at <= limit:
                continue
            if st.state == "running":
                log.error("worker.stalled", worker=st.name, cycle=st.cycle,
                          seconds=round(now - st.progress_at, 1), limit=limit)  # fmt: skip
                await self._set_state(st, "stalled")
            stalled.append(st)
        return stalled

    # -- one worker instance ----------------------------------------------------------------------

    async def run_instance(self, name: str, factory: WorkerFactory) -> None:
        st = self.status[name]
        spec = st.spec
        stop = self.stop_events[name] = anyio.Event()
        if self.stopping.is_set():
            stop.set()
        worker = factory(name, dict(spec.params))
        checkpoint = await self.checkpoints.resume_point(name)
        next_cycle = 0
        # Cycle numbers go on across runs (command ids derive from them); a horizon run's first
        # cycle `base` takes its first slot. A run resumed after a crash keeps its base.
        base = 0
        last_run: datetime | None = None
        if checkpoint is not None:
            worker.restore(checkpoint.state)
            next_cycle = checkpoint.cycle + 1
            if self.run_key is not None:
                same_run = checkpoint.counters.get("run") == self.run_key
                base = int(checkpoint.counters.get("run_base", 0)) if same_run else next_cycle
            if checkpoint.counters.get("last_run"):
                last_run = datetime.fromisoformat(checkpoint.counters["last_run"])
            await self.checkpoints.consumed(name, checkpoint.id)
            log.info(
                "worker.resumed", worker=name, checkpoint=checkpoint.id, cycle=checkpoint.cycle
            )
        skipped = 0
        if not self.clock.virtual and spec.schedule is None:
            # After downtime the slots that passed are skipped, not replayed in a burst.
            slot = self._first_slot_at_or_after(spec, self.clock.now())
            if checkpoint is not None and self.run_key is None:
                # A continuous run's slots count from the window this start fell in, not from
                # the one the checkpoint was written in: the next cycle number takes the next
                # slot of the real clock (else it waits out the time between the two windows).
                base = next_cycle - slot
            next_cycle = max(next_cycle, base + slot)
            if checkpoint is not None:
                skipped = self._missed_slots(spec, checkpoint.counters.get("slot_at"),
                                             checkpoint.created_at, next_cycle - base)  # fmt: skip
        cron = CronSchedule(spec.schedule, self.timezone) if spec.schedule else None
        if cron is not None and last_run is None:
            last_run = self.anchor - timedelta(microseconds=1)
        self.bases[name] = base
        st.cycle = next_cycle - 1
        restarts: deque[float] = deque()
        backoff = spec.backoff.initial
        jitter = random.Random(f"{self.seed}:{name}:jitter")
        started_at = self.clock.monotonic()
        st.progress_at = started_at
        await self._set_state(st, "running")
        if skipped:
            await self._skipped(st, skipped, next_cycle)
        since_checkpoint = 0
        slot_at: datetime | None = None
        try:
            while not stop.is_set():
                if cron is not None:
                    assert last_run is not None
                    due = cron.next_after(last_run)
                else:
                    due = self._slot_time(spec, next_cycle - base)
                if self.run_end is not None and due >= self.run_end:
                    break
                if not await self.clock.sleep_until(due, stop):
                    break
                if cron is not None:
                    missed, latest = cron.due(last_run, self.clock.now())
                    if missed > 1:
                        log.info("worker.cron_coalesced", worker=name, missed=missed)
                    last_run = latest or self.clock.now()
                try:
                    session = await self.windows.ensure(self.clock.now())
                    if session is None:
                        break
                    cycle = next_cycle
                    next_cycle += 1
                    slot_at = due
                    ok = await self._run_cycle(st, worker, cycle, session)
                    if ok:
                        if self.clock.monotonic() - started_at >= spec.stable_after:
                            backoff = spec.backoff.initial  # a stable period resets the backoff
                        since_checkpoint += 1
                        if (
                            cycle % self.profile.checkpoint_every
                            == self.profile.checkpoint_every - 1
                        ):
                            counters = {"cycles": st.cycles, "last_run": last_run.isoformat() if last_run else None,
                                        "run": self.run_key, "run_base": base,
                                        "slot_at": slot_at.isoformat()}  # fmt: skip
                            await self._checkpoint(st, worker, cycle, session, counters)
                            since_checkpoint = 0
                        continue
                    # a crash or a hang: count it, back off, maybe quarantine, restart from checkpoint
                    if spec.restart == "temporary":
                        await self._set_state(st, "stopped")
                        return
                    now_m = self.clock.monotonic()
                    restarts.append(now_m)
                    while restarts and now_m - restarts[0] > spec.restart_window:
                        restarts.popleft()
                    if len(restarts) > spec.max_restarts:
                        if not await self._quarantine(st, session, stop):
                            break  # stopping during the cool-down: no restart to record
                        restarts.clear()
                        backoff = spec.backoff.initial
                    else:
                        delay, backoff = backoff_step(backoff, spec.backoff, jitter)
                        await self._set_state(st, "backoff")
                        if not await self.clock.sleep_until(
                            self.clock.now() + timedelta(seconds=delay), stop
                        ):
                            break
                    await _close(worker)
                    worker = factory(name, dict(spec.params))
                    restored = await self.checkpoints.resume_point(name)
                    if restored is not None:
                        worker.restore(restored.state)
                    st.restarts += 1
                    self.restart_counts[name] = self.restart_counts.get(name, 0) + 1
                    started_at = st.progress_at = self.clock.monotonic()
                    if cron is None:
                        # Slots that passed during the backoff or quarantine are skipped, not
                        # replayed back to back (cron schedules coalesce missed runs by themselves).
                        skip_to = base + self._first_slot_at_or_after(spec, self.clock.now())
                        next_cycle = max(next_cycle, skip_to)
                    await self._record(NewEvent(
                        kind=ev.WORKER_RESTARTED, session_id=session.id, worker=name,
                        payload={"restarts": st.restarts, "after": st.last_error},
                    ))  # fmt: skip
                    await self._set_state(st, "running")
                except StoreError as exc:
                    # The store is unreachable (a restart, a cut connection): the action that
                    # needed it did not run (fail-closed). Supervision survives it: wait, retry.
                    st.last_error = f"store unavailable: {exc}"
                    log.warning("worker.store_unavailable", worker=name, error=str(exc))
                    await self.state_write_failed(None, worker=name, error=str(exc))
                    delay, backoff = backoff_step(backoff, spec.backoff, jitter)
                    if not await self.clock.sleep_until(
                        self.clock.now() + timedelta(seconds=delay), stop
                    ):
                        break
        finally:
            with anyio.CancelScope(shield=True):
                await self._final_checkpoint(st, worker, since_checkpoint, last_run, slot_at)
                await _close(worker)
                self.stop_events.pop(name, None)

    async def _run_cycle(
        self, st: WorkerStatus, worker: Worker, cycle: int, session: Session
    ) -> bool:
        # The cycle's id is also CYCLE_COMPLETED's command_id (derived once).
        cycle_id = derive_id(self.fleet, st.name, "cycle", str(cycle))
        ctx = CycleContext(
            fleet=self.fleet, worker=st.name, cycle=cycle, session=session, gate=self.gate,
            clock=self.clock, rng=random.Random(f"{self.seed}:{st.name}:{cycle}"),
            effects=self.effects, correlation_id=cycle_id,
        )  # fmt: skip
        # Per cycle, so the cheap forms: a bare cancel scope with a deadline instead of
        # fail_after (two generator layers around the same scope), and tokens instead of
        # bound_contextvars (which copies the whole context to save what it overwrites). Same
        # semantics: the deadline is on the event loop's clock, only it can cancel this scope,
        # and the log context is given back before the outcome is logged.
        deadline = anyio.CancelScope(deadline=anyio.current_time() + st.spec.cycle_deadline)
        st.cycle = cycle
        st.session_id = session.id
        self.in_flight += 1
        self.idle = anyio.Event() if self.in_flight == 1 else self.idle
        error: str | None = None
        lost: StoreError | None = None
        try:
            bound = structlog.contextvars.bind_contextvars(
                worker=st.name, window=session.window_key, cycle=cycle, correlation_id=cycle_id
            )
            try:
                with deadline:
                    await worker.cycle(ctx)
            finally:
                structlog.contextvars.reset_contextvars(**bound)
            if deadline.cancelled_caught:
                st.hangs += 1
                error = f"hung: cycle {cycle} passed its {st.spec.cycle_deadline}s deadline"
        except TimeoutError as exc:  # the worker's own timeout (a network call, say): a crash
            error = f"{type(exc).__name__}: {exc}"
        except GovernedRefusal as exc:
            log.debug("cycle.governed", worker=st.name, reason=exc.reason)
        except StoreError as exc:
            if exc.transient:
                # A lost connection or a timeout: the action that needed the store failed closed;
                # the worker did nothing wrong. The caller waits for the store (not a crash).
                lost = exc
            else:
                error = f"state write failed: {exc}"
                await self.state_write_failed(session.id, worker=st.name, error=str(exc))
        except Exception as exc:
            from .protocol import WorkerHung

            if isinstance(exc, WorkerHung):
                st.hangs += 1
                error = f"hung: {exc}"
            else:
                error = f"{type(exc).__name__}: {exc}"
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self.idle.set()
        if lost is not None:
            raise lost
        if error is not None:
            st.crashes += 1
            st.last_error = error
            log.warning("worker.crashed", worker=st.name, cycle=cycle, error=error)
            await self._record(NewEvent(
                kind=ev.WORKER_CRASHED, session_id=session.id, worker=st.name,
                reason="hang" if error.startswith("hung") else "crash",
                payload={"cycle": cycle, "error": error},
            ))  # fmt: skip
            return False
        st.cycles += 1
        st.progress_at = self.clock.monotonic()
        if st.state == "stalled":
            await self._set_state(st, "running")
            log.info("worker.unstalled", worker=st.name, cycle=cycle)
        st.pending.append((NewEvent(
            kind=ev.CYCLE_COMPLETED, session_id=session.id, worker=st.name, state_bearing=False,
            command_id=cycle_id, payload={"cycle": cycle},
        ), self.clock.now()))  # fmt: skip
        return True

    async def _record(self, event: NewEvent) -> None:
        """Supervision's own events: a failed write is logged loudly, and supervision goes on
        (the worker's actions still fail closed on their own writes)."""
        try:
            await self.store.append(event)
        except StoreError as exc:
            log.error(
                "worker.event_not_recorded", kind=event.kind, worker=event.worker, error=str(exc)
            )
            await self.state_write_failed(event.session_id, worker=event.worker, kind=event.kind,
                                          error=str(exc))  # fmt: skip

    async def _checkpoint(
        self, st: WorkerStatus, worker: Worker, cycle: int, session: Session | None,
        counters: dict[str, Any],
    ) -> None:  # fmt: skip
        pending, st.pending = st.pending, []
        try:
            await self.checkpoints.save(
                st.name, cycle=cycle, session_id=session.id if session else None,
                state=worker.snapshot(), counters=counters, pending=pending,
            )  # fmt: skip
        except StoreError:
            st.pending = pending + st.pending
            raise
        await self._set_state(st, st.state)  # `status` shows the cycle as of this checkpoint

    async def _final_checkpoint(
        self, st: WorkerStatus, worker: Worker, since: int, last_run: datetime | None,
        slot_at: datetime | None = None,
    ) -> None:  # fmt: skip
        try:
            if since > 0 or st.pending:
                session = self.windows.current
                await self._checkpoint(st, worker, st.cycle, session,
                                       {"cycles": st.cycles,
                                        "last_run": last_run.isoformat() if last_run else None,
                                        "run": self.run_key,
                                        "run_base": self.bases.get(st.name, 0),
                                        "slot_at": slot_at.isoformat() if slot_at else None})  # fmt: skip
            await self._set_state(st, "stopped")
        except Exception as exc:  # the store may be gone at shutdown; say so, do not mask
            log.warning("worker.final_checkpoint_failed", worker=st.name, error=str(exc))

    async def _quarantine(self, st: WorkerStatus, session: Session, stop: anyio.Event) -> bool:
        """Park the worker for its cool-down. False when the daemon stops during it."""
        spec = st.spec
        await self._set_state(st, "quarantined")
        self.quarantine_counts[st.name] = self.quarantine_counts.get(st.name, 0) + 1
        await self._record(NewEvent(
            kind=ev.WORKER_QUARANTINED, session_id=session.id, worker=st.name, reason="restarts",
            payload={"restarts": st.restarts, "cool_down": spec.quarantine_for,
                     "last_error": st.last_error},
        ))  # fmt: skip
        log.warning("worker.quarantined", worker=st.name, cool_down=spec.quarantine_for)
        if self.on_alert is not None:
            await self.on_alert("worker_quarantined", session.id,
                                {"worker": st.name, "restarts": st.restarts, "last_error": st.last_error})  # fmt: skip
        return await self.clock.sleep_until(
            self.clock.now() + timedelta(seconds=spec.quarantine_for), stop
        )


def backoff_step(nominal: float, policy: Backoff, jitter: random.Random) -> tuple[float, float]:
    """This wait (jittered to 50-100 % of the nominal delay, capped) and the next nominal delay."""
    delay = min(nominal, policy.max) * (0.5 + jitter.random() / 2)
    return delay, min(nominal * policy.multiplier, policy.max)


async def _close(worker: Worker) -> None:
    """Let a worker release what it holds (an external worker's child process)."""
    try:
        await worker.close()
    except Exception as exc:  # closing must not hide why the worker stopped
        log.warning("worker.close_failed", worker=worker.name, error=str(exc))
