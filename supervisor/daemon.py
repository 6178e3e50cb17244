"""The daemon: one anyio task group that runs the fleet and its duties.

Startup order (recovery before taking traffic): open and migrate the store, run the recovery scan
and timeout escalation, record missed windows, open the window for "now", tell systemd READY,
then start the workers. Duties (window rotation, recovery, escalation, telemetry flush, kill-switch
watch, watchdog) are tasks beside the workers. SIGTERM/SIGINT drain: no new cycles, in-flight
actions get the shutdown timeout, each worker checkpoints, exit 0.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import structlog

from . import events as ev
from . import recovery
from .actions import derive_id
from .approvals import Approvals
from .checkpoints import Checkpoints
from .clock import Clock, SystemClock, VirtualClock
from .config import Config
from .errors import ConfigError, UsageError
from .fleet import Fleet, WorkerFactory, load_worker_class
from .gate import Gate
from .horizons import HorizonProfile
from .killswitch import HostSwitchFile, Mode, SwitchState, load_secret
from .scorecard import Scorecard, compute
from .sessions import WindowManager
from .store import NewEvent, Store, open_store, system_stream
from .systemd import Notifier
from .windows import window_at
from .worker import EffectLog

log = structlog.get_logger("supervisor.daemon")


def host_switch_path(state_dir: Path) -> Path:
    return state_dir / "killswitch.json"


def effects_path(state_dir: Path) -> Path:
    return state_dir / "effects.jsonl"


@dataclass
class RunPlan:
    horizon: str | None
    profile: HorizonProfile
    anchor: datetime
    end: datetime | None
    run_id: str | None
    resumed: bool


def build_factories(config: Config) -> dict[str, WorkerFactory]:
    factories: dict[str, WorkerFactory] = {}
    for spec in config.workers:
        if spec.target is None:
            raise ConfigError(
                f"worker {spec.name!r}: external command workers are not supported yet"
            )
        factories[spec.name] = load_worker_class(spec)
    return factories


class Daemon:
    def __init__(
        self,
        config: Config,
        *,
        horizon: str | None = None,
        simulate: bool = False,
        start: datetime | None = None,
        seed: int | None = None,
        env: Mapping[str, str] | None = None,
        notifier: Notifier | None = None,
        install_signals: bool = True,
    ) -> None:
        if simulate and horizon is None:
            raise UsageError("--simulate needs --horizon (a simulated run must end)")
        self.config = config
        self.horizon = horizon
        self.simulate = simulate
        self.start = start
        self.seed = config.seed if seed is None else seed
        self.env = os.environ if env is None else env
        self.notifier = notifier or Notifier(self.env)
        self.install_signals = install_signals
        self.stopping = anyio.Event()
        self.scorecard: Scorecard | None = None
        self.fleet: Fleet | None = None
        self.clock: Clock = SystemClock()

    # -- setup --------------------------------------------------------------------------------

    async def _plan(self, store: Store, now: datetime) -> RunPlan:
        cfg = self.config
        if self.horizon is None:
            profile = cfg.horizon(cfg.profile)
            return RunPlan(None, profile, window_at(now, profile.window, cfg.timezone).start,
                           None, None, False)  # fmt: skip
        profile = cfg.horizon(self.horizon)
        row = await store.fetchrow("unfinished_run", cfg.fleet, self.horizon, self.simulate)
        if row is not None:
            log.info("run.resumed", run=row["id"], horizon=self.horizon, start=row["starts_at"].isoformat())
            return RunPlan(self.horizon, profile, row["starts_at"], row["ends_at"], row["id"], True)
        start = self.start or now
        if self.simulate and self.start is None:
            last = await store.fetchrow("last_run", cfg.fleet, True)
            if last is not None and last["ends_at"] > start:
                start = last["ends_at"]  # windows are governed once: a new run starts after the last
        anchor = window_at(start, profile.window, cfg.timezone).start
        end = anchor + profile.run_length
        run_id = derive_id("run", cfg.fleet, self.horizon, str(self.simulate), anchor.isoformat())
        async with store.backend.transaction() as tx:
            await tx.execute("insert_run", run_id, cfg.fleet, self.horizon, self.simulate,
                             self.seed, anchor, end, now)  # fmt: skip
        await store.once(
            derive_id("run.started", run_id),
            NewEvent(kind=ev.RUN_STARTED, session_id=system_stream(cfg.fleet),
                     payload={"run": run_id, "horizon": self.horizon, "simulated": self.simulate,
                              "seed": self.seed, "start": anchor.isoformat(),
                              "end": end.isoformat()}),
        )  # fmt: skip
        return RunPlan(self.horizon, profile, anchor, end, run_id, False)

    # -- run ------------------------------------------------------------------------------------

    async def run(self) -> Scorecard | None:
        cfg = self.config
        factories = build_factories(cfg)  # config errors before anything is written
        secret = load_secret(self.env, cfg.killswitch_secret_file)
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        system = SystemClock()
        store = await open_store(cfg.db_url, system, migrate=True)
        try:
            plan = await self._plan(store, system.now())
            if self.simulate:
                self.clock = VirtualClock(plan.anchor)
                store.clock = self.clock
            return await self._run(store, plan, factories, secret)
        finally:
            with anyio.CancelScope(shield=True):
                await store.close()

    async def _run(
        self, store: Store, plan: RunPlan, factories: dict[str, WorkerFactory], secret: bytes | None
    ) -> Scorecard | None:
        cfg, clock = self.config, self.clock
        started_real = datetime.now(UTC) if not clock.virtual else clock.now()
        host_switch = HostSwitchFile(host_switch_path(cfg.state_dir), secret)
        approvals = Approvals(store, cfg.approvals, cfg.fleet)
        gate = Gate(store=store, fleet=cfg.fleet, policy=cfg.policy, approvals=approvals,
                    host_switch=host_switch, token_budgets=cfg.token_budgets, models=cfg.models,
                    timezone=cfg.timezone)  # fmt: skip
        self.gate = gate
        windows = WindowManager(store, fleet=cfg.fleet, length=plan.profile.window,
                                tz=cfg.timezone, max_cost=plan.profile.max_cost,
                                max_actions=plan.profile.max_actions, by=cfg.host_id,
                                run_end=plan.end)  # fmt: skip
        self.windows = windows
        checkpoints = Checkpoints(store, cfg.fleet)
        fleet = Fleet(fleet=cfg.fleet, host=cfg.host_id, store=store, gate=gate, windows=windows,
                      checkpoints=checkpoints, clock=clock, profile=plan.profile,
                      timezone=cfg.timezone, anchor=plan.anchor, run_end=plan.end,
                      effects=EffectLog(effects_path(cfg.state_dir)), seed=self.seed,
                      stopping=self.stopping)  # fmt: skip
        self.fleet = fleet
        structlog.contextvars.bind_contextvars(fleet=cfg.fleet, host=cfg.host_id)

        # recovery before taking traffic
        self.notifier.extend_timeout(120)
        report = await recovery.scan(store, fleet=cfg.fleet, approvals=approvals,
                                     host_switch=host_switch, by=cfg.host_id,
                                     started_before=started_real)  # fmt: skip
        await self._observe_switch(store, host_switch.read())
        if not clock.virtual:
            await windows.record_missed(clock.now())
        session = await windows.ensure(clock.now())
        log.info("daemon.ready", horizon=plan.horizon, simulated=clock.virtual,
                 window=session.window_key if session else None, recovered=report.repairs,
                 workers=sum(s.replicas for s in cfg.workers))  # fmt: skip
        self.notifier.ready(self._status_line())

        async with anyio.create_task_group() as tg:
            if self.install_signals and not clock.virtual:
                tg.start_soon(self._signals, tg.cancel_scope, name="signals")
            for spec in cfg.workers:
                for name in fleet.add(spec):
                    clock.spawn(tg, fleet.run_instance, name, factories[spec.name], name=name)
            clock.spawn(tg, self._rotation, windows, name="rotation")
            clock.spawn(tg, self._escalation, approvals, name="escalation")
            clock.spawn(tg, self._every, cfg.recovery_every, self._recover, store, approvals,
                        host_switch, name="recovery")  # fmt: skip
            if not clock.virtual:
                tg.start_soon(self._realtime_duties, store, host_switch, name="realtime")
            if plan.end is not None:
                await clock.sleep_until(plan.end, self.stopping)
            else:
                await self.stopping.wait()
            clock.ring(self.stopping)
            self.notifier.stopping()
            with anyio.move_on_after(cfg.shutdown_timeout):
                await fleet.idle.wait()
            tg.cancel_scope.cancel()

        over = plan.end is not None and clock.now() >= plan.end
        if over:
            await windows.close_current()
            if plan.run_id is not None:
                async with store.backend.transaction() as tx:
                    finished = await tx.fetchrow("finish_run", clock.now(), plan.run_id)
                if finished is not None:
                    await store.append(NewEvent(kind=ev.RUN_FINISHED, session_id=system_stream(cfg.fleet),
                                                payload={"run": plan.run_id}))  # fmt: skip
        await store.flush_telemetry()
        self.scorecard = await compute(store, cfg.fleet)
        log.info("daemon.stopped", horizon_over=over, telemetry_dropped=store.telemetry_dropped)
        return self.scorecard

    # -- duties -----------------------------------------------------------------------------------

    async def _rotation(self, windows: WindowManager) -> None:
        while not self.stopping.is_set():
            current = windows.current or await windows.ensure(self.clock.now())
            if current is None:
                return
            if not await self.clock.sleep_until(current.ends_at, self.stopping):
                return
            if await windows.ensure(self.clock.now()) is None:
                await windows.close_current()
                return
            self.notifier.status(self._status_line())

    async def _every(self, seconds: float, duty: Any, *args: Any) -> None:
        while not self.stopping.is_set():
            if not await self.clock.sleep_until(self.clock.now() + timedelta(seconds=seconds), self.stopping):
                return
            await duty(*args)

    async def _escalation(self, approvals: Approvals) -> None:
        """Sleep until the next approval is due (at most escalation_every), then move it on."""
        await approvals.refresh_hint()
        while not self.stopping.is_set():
            now = self.clock.now()
            idle_until = now + timedelta(seconds=self.config.recovery_every)
            target = min(approvals.next_due or idle_until, idle_until)
            if self.clock.virtual is False:
                target = min(target, now + timedelta(seconds=self.config.escalation_every))
            await self.clock.sleep_until(max(target, now), approvals.changed)
            if self.stopping.is_set():
                return
            if approvals.changed.is_set():
                approvals.changed = anyio.Event()
            if approvals.next_due is not None and approvals.next_due <= self.clock.now():
                counts = await approvals.escalate_due()
                if any(counts.values()):
                    log.info("approvals.escalated", **counts)
            elif not self.clock.virtual:
                await approvals.refresh_hint()  # approvals created by another host or process

    async def _recover(self, store: Store, approvals: Approvals, host_switch: HostSwitchFile) -> None:
        longest = max((s.cycle_deadline for s in self.config.workers), default=300.0)
        await recovery.scan(store, fleet=self.config.fleet, approvals=approvals,
                            host_switch=host_switch, by=self.config.host_id,
                            started_before=self.clock.now() - timedelta(seconds=longest * 2))  # fmt: skip

    async def _realtime_duties(self, store: Store, host_switch: HostSwitchFile) -> None:
        """Only on the system clock: telemetry flush, kill-switch watch, watchdog, status."""
        interval = self.config.killswitch_watch_interval
        watchdog = self.notifier.watchdog_interval()
        last_flush = last_ping = 0.0
        known = host_switch.read()
        while True:
            await anyio.sleep(interval)
            now = anyio.current_time()
            state = host_switch.read()
            if state != known:
                known = state
                await self._observe_switch(store, state)
            if now - last_flush >= self.config.flush_every:
                last_flush = now
                await store.flush_telemetry()
            if watchdog is not None and now - last_ping >= watchdog:
                last_ping = now
                self.notifier.watchdog()
                self.notifier.status(self._status_line())

    async def _observe_switch(self, store: Store, state: SwitchState) -> None:
        """Every change of the host switch is an event once, whoever changed it (CLI or hand)."""
        fleet = self.config.fleet
        if not state.valid:
            log.error("killswitch.invalid", problem=state.problem)
            await store.once(
                derive_id("killswitch.invalid", fleet, state.problem or "", str(host_switch_mtime(self.config.state_dir))),
                NewEvent(kind=ev.KILLSWITCH_INVALID, session_id=system_stream(fleet),
                         reason="killswitch", payload={"problem": state.problem}),
            )  # fmt: skip
            return
        if state.seq == 0:
            return
        kind = ev.KILLSWITCH_DISENGAGED if state.mode == Mode.DISENGAGED else ev.KILLSWITCH_ENGAGED
        await store.once(
            killswitch_command_id(fleet, "host", state.seq),
            NewEvent(kind=kind, session_id=system_stream(fleet), reason=state.mode.value,
                     payload={"scope": "host", "mode": state.mode.value, "seq": state.seq,
                              "by": state.by, "reason": state.reason}),
        )  # fmt: skip
        log.warning("killswitch.changed", mode=state.mode.value, by=state.by, reason=state.reason)
        if state.mode == Mode.EMERGENCY:
            await self._emergency_snapshot(store, state)

    async def _emergency_snapshot(self, store: Store, state: SwitchState) -> None:
        path = self.config.state_dir / f"emergency-{state.seq}.json"
        if path.exists():
            return
        snapshot = {
            "at": self.clock.now().isoformat(), "switch": {"seq": state.seq, "by": state.by, "reason": state.reason},
            "workers": [s.as_dict() for s in (self.fleet.status.values() if self.fleet else [])],
            "open_windows": [s.as_dict() for s in await store.open_sessions(self.config.fleet)],
            "pending_approvals": [_plain(r) for r in await store.fetchall("pending_approvals", self.config.fleet, 10_000)],
        }  # fmt: skip
        path.write_text(json.dumps(snapshot, indent=2, sort_keys=True))
        await store.append(NewEvent(kind=ev.ALERT, session_id=system_stream(self.config.fleet),
                                    reason="killswitch_emergency",
                                    payload={"snapshot": str(path), "by": state.by}))  # fmt: skip
        log.error("killswitch.emergency", snapshot=str(path))

    async def _signals(self, scope: anyio.CancelScope) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("daemon.signal", signal=signal.Signals(signum).name)
                if self.stopping.is_set():
                    scope.cancel()  # a second signal: stop now
                    return
                self.clock.ring(self.stopping)

    def _status_line(self) -> str:
        window = self.windows.current.window_key if getattr(self, "windows", None) and self.windows.current else "-"
        states = ", ".join(f"{k} {v}" for k, v in sorted(self.fleet.by_state().items())) if self.fleet else ""
        return f"horizon {self.horizon or 'continuous'}; window {window}; workers {states or 'starting'}"


def killswitch_command_id(fleet: str, scope: str, seq: int | str) -> str:
    return derive_id("killswitch", fleet, scope, str(seq))


def host_switch_mtime(state_dir: Path) -> int:
    try:
        return host_switch_path(state_dir).stat().st_mtime_ns
    except OSError:
        return 0


def _plain(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in row.items()}
