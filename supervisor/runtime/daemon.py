"""The daemon: one anyio task group that runs the fleet and its duties.

Startup order (recovery before taking traffic): open and migrate the store, run the recovery scan
and timeout escalation, record missed windows, open the window for "now", tell systemd READY,
then start the workers. Duties (window rotation, recovery, escalation, telemetry flush, kill-switch
watch, watchdog) are tasks beside the workers. SIGTERM/SIGINT drain: no new cycles, in-flight
actions get the shutdown timeout, each worker checkpoints, exit 0.
"""

from __future__ import annotations

import functools
import os
import signal
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import structlog
from anyio.abc import TaskStatus

from ..actions import derive_id
from ..config import Config, WorkerSpec
from ..errors import ConfigError, StoreError, StoreLost, UsageError
from ..governance.approvals import Approvals
from ..governance.gate import Gate
from ..governance.replay import shadow_for
from ..killswitch import HostSwitchFile, SwitchState, load_secret

# host_switch_path is re-exported while drills.py still imports it from here.
from ..killswitch.engage import host_switch_path as host_switch_path
from ..killswitch.keeper import SwitchKeeper
from ..ops import gctune
from ..ops.alerts import STATE_WRITE_FAILED
from ..ops.alerts.engine import Alerts
from ..ops.metrics import Metrics
from ..ops.scorecard import Scorecard, compute
from ..ops.systemd import Notifier
from ..statedir import make_state_dir
from ..store import Store, open_store
from ..store.base import current_fence
from ..timing.clock import Clock, SystemClock, VirtualClock
from ..timing.horizons import HorizonProfile
from ..timing.sessions import WindowManager
from ..timing.windows import date_start, next_boundary, window_at
from . import recovery
from .checkpoints import Checkpoints
from .fleet import Fleet, WorkerFactory, load_worker_class
from .leases import Coordinator
from .worker import EffectLog, Worker

log = structlog.get_logger(__name__)


class DutyOver:
    """What a duty's run returns when the duty is over (the run's end was reached)."""


DUTY_OVER = DutyOver()


@dataclass(frozen=True, slots=True)
class Duty:
    """A singleton duty, run by `Daemon._duty`: `run` is the leader's work (under its fence); it
    returns when it is next due, or None to ask `idle`, or DUTY_OVER. `idle` gives the next
    instant to look again (None: the duty is over); `wake` the event that cuts a sleep short
    (default: the daemon stopping), `on_wake` what to do after any wake; `retry` how soon after a
    store failure to try again (None: as `idle` says); `first` runs it before the first sleep."""

    name: str
    run: Callable[[], Awaitable[datetime | DutyOver | None]]
    idle: Callable[[], datetime | None]
    wake: Callable[[], anyio.Event] | None = None
    on_wake: Callable[[], None] | None = None
    retry: float | None = None
    first: bool = False


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


def build_factories(
    config: Config, env: Mapping[str, str] | None = None
) -> dict[str, WorkerFactory]:
    """Every worker's factory, checked before anything is written (ConfigError names the worker)."""
    factories: dict[str, WorkerFactory] = {}
    search = [*([config.path.parent] if config.path is not None else []), Path.cwd()]
    for spec in config.workers:
        if spec.target is not None:
            factories[spec.name] = load_worker_class(spec, search)
        else:
            factories[spec.name] = external_factory(spec, config, env)
    _refuse_shared_users(config)
    _refuse_readable_secrets(config)
    return factories


def _refuse_readable_secrets(config: Config) -> None:
    """A worker that runs as another user is kept from the secret by file modes alone (outside
    a sandbox): a secret file, or a config holding the database's password, that every user
    may read is open to it."""
    from urllib.parse import urlsplit

    if not any(spec.command is not None and spec.user is not None for spec in config.workers):
        return
    paths = [config.killswitch_secret_file] if config.killswitch_secret_file else []
    if config.path is not None and "://" in config.db_url and urlsplit(config.db_url).password:
        paths.append(str(config.path))
    for path in paths:
        try:
            mode = os.stat(path).st_mode
        except OSError:
            continue  # reported where it is read
        if mode & 0o004:
            raise ConfigError(f"{path} is readable by every user (mode {oct(mode & 0o777)}), "
                              "the workers' users too; chmod o-r it (docs/deploy.md)")  # fmt: skip


def _refuse_shared_users(config: Config) -> None:
    """Two command workers outside a sandbox as one user can reach each other's processes (same
    uid: ptrace, pidfd_getfd on the protocol pipes, kill): one could speak, and be recorded, as
    the other, under the other's policy and switches. Each needs a user of its own (replicas of
    one worker share theirs) or sandbox = "bwrap" (a pid namespace of its own)."""
    from .sandbox import resolve

    seen: dict[int, WorkerSpec] = {}
    for spec in config.workers:
        if spec.command is None or spec.user is None:
            continue
        uid, _ = resolve(spec.user, spec.group, f"worker {spec.name!r}")
        assert uid is not None
        first = seen.setdefault(uid, spec)
        # Two sandboxes are two pid namespaces; one worker outside sees into the other's.
        if first is not spec and "none" in (first.sandbox, spec.sandbox):
            other = first.name
            raise ConfigError(f"workers {other!r} and {spec.name!r} both run as user "
                              f"{spec.user!r} outside a sandbox, so each could act in the "
                              "other's name; give each its own user, or sandbox = \"bwrap\"")  # fmt: skip


_warned_own_user: set[str] = set()


def running_as_service(env: Mapping[str, str]) -> bool:
    """Started by systemd (a unit sets INVOCATION_ID; Type=notify sets NOTIFY_SOCKET)."""
    return bool(env.get("INVOCATION_ID") or env.get("NOTIFY_SOCKET"))


def hidden_paths(config: Config, env: Mapping[str, str]) -> tuple[str, ...]:
    """What a sandboxed worker must not see: the state directory, the secret, the database."""
    paths = [str(config.state_dir)]
    if config.killswitch_secret_file:
        paths.append(str(Path(config.killswitch_secret_file).absolute()))
    if env.get("CREDENTIALS_DIRECTORY"):
        paths.append(env["CREDENTIALS_DIRECTORY"])
    paths += [str(p) for p in sqlite_files(config)]
    return tuple(paths)


def sqlite_files(config: Config) -> list[Path]:
    """The SQLite database and its WAL files, when the store is SQLite."""
    if not config.db_url.startswith("sqlite:///"):
        return []
    db = Path("/" + config.db_url.removeprefix("sqlite://").partition("?")[0].lstrip("/"))
    return [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")]


def external_factory(
    spec: WorkerSpec, config: Config | None = None, env: Mapping[str, str] | None = None
) -> WorkerFactory:
    import shutil

    from .external import ExternalWorker
    from .sandbox import Identity, can_switch_user, resolve

    assert spec.command is not None
    env = os.environ if env is None else env
    program = spec.command[0]
    found = shutil.which(program)
    if found is None or not os.access(found, os.X_OK):
        raise ConfigError(f"worker {spec.name!r}: command {program!r} is not an executable")
    argv = spec.command
    uid, gid = resolve(spec.user, spec.group, f"worker {spec.name!r}")
    if uid is not None and uid != os.geteuid() and gid == os.getegid():
        # The service's group may read the secret file and the config (a database password).
        raise ConfigError(f"worker {spec.name!r}: runs in the daemon's own group (gid {gid}), "
                          "which may read its secret and config; give it a group of its own")  # fmt: skip
    if uid is not None and uid != os.geteuid() and not can_switch_user():
        # Fail at startup (exit 2), not with a launcher that fails at every restart.
        raise ConfigError(f"worker {spec.name!r}: running as {spec.user!r} needs the daemon to be "
                          "root or hold CAP_SETUID and CAP_SETGID (the shipped unit grants them)")  # fmt: skip
    identity = Identity(uid=uid, gid=gid, user=spec.user, sandbox="bwrap" if spec.sandbox == "bwrap" else "none",
                        hidden=hidden_paths(config, env) if config is not None else (),
                        writable=spec.writable)  # fmt: skip
    if spec.sandbox == "bwrap" and shutil.which("bwrap") is None:
        raise ConfigError(
            f"worker {spec.name!r}: sandbox 'bwrap' needs bubblewrap (bwrap) installed"
        )
    own_user = uid is None or uid == os.geteuid()
    if own_user and running_as_service(env) and spec.name not in _warned_own_user:
        _warned_own_user.add(spec.name)
        # The agent under governance could then read the store and the switch: say so.
        log.warning("worker.runs_as_daemon_user", worker=spec.name,
                    hint="set user = \"acp-agent\" for it (docs/security.md)")  # fmt: skip

    def make(name: str, params: dict[str, Any]) -> Worker:
        return ExternalWorker(name, params, argv=argv, heartbeat_timeout=spec.heartbeat_timeout,
                              identity=identity, max_proposals=spec.max_proposals,
                              max_log_lines=spec.max_log_lines,
                              max_pending_approvals=spec.max_pending_approvals)  # fmt: skip

    return make


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
        reload_config: Callable[[], Config] | None = None,
        effects_dir: Path | None = None,
        side_by_side: bool = True,
    ) -> None:
        """`side_by_side`: a simulation may run the workers due on one slot side by side (see
        `run`); False keeps one at a time, the order a store that waits on a network gets."""
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
        self.reload_config = reload_config
        self.effects_dir = effects_dir  # a simulated run keeps its effect log with its database
        self.side_by_side = side_by_side
        self.finished = False  # the horizon ran to its end
        self._scopes: dict[str, anyio.CancelScope] = {}
        self._factories: dict[str, WorkerFactory] = {}
        self._tg: anyio.abc.TaskGroup | None = None
        self.coordinator: Coordinator | None = None
        self._specs: dict[str, WorkerSpec] = {}
        self.stopping = anyio.Event()
        self.scorecard: Scorecard | None = None
        self.fleet: Fleet | None = None
        self.clock: Clock = SystemClock()
        self.store_lost: str | None = None  # why the database is gone, once it is

    # -- setup --------------------------------------------------------------------------------

    async def _plan(self, store: Store, now: datetime) -> RunPlan:
        cfg = self.config
        if self.horizon is None:
            profile = cfg.horizon(cfg.profile)
            return RunPlan(None, profile, window_at(now, profile.window, cfg.timezone).start,
                           None, None, False)  # fmt: skip
        profile = cfg.horizon(self.horizon)
        run = await store.unfinished_run(fleet=cfg.fleet, horizon=self.horizon,
                                         simulated=self.simulate)  # fmt: skip
        if run is not None:
            log.info("run.resumed", run=run.id, horizon=self.horizon,
                     start=run.starts_at.isoformat())  # fmt: skip
            return RunPlan(self.horizon, profile, run.starts_at, run.ends_at, run.id, True)
        start = self.start or now
        if self.simulate and self.start is None:
            last = await store.last_run(fleet=cfg.fleet, simulated=True)
            if last is not None and last.ends_at > start:
                start = last.ends_at  # windows are governed once: a new run starts after the last
        anchor = window_at(start, profile.window, cfg.timezone).start
        end = run_end(anchor, profile, cfg.timezone)
        run_id = derive_id("run", cfg.fleet, self.horizon, str(self.simulate), anchor.isoformat())
        if self.simulate:
            store.clock = VirtualClock(anchor)  # its events are in simulated time, from the first
        await store.start_run(run_id=run_id, fleet=cfg.fleet, horizon=self.horizon,
                              simulated=self.simulate, seed=self.seed, starts_at=anchor,
                              ends_at=end, created_at=now)  # fmt: skip
        return RunPlan(self.horizon, profile, anchor, end, run_id, False)

    # -- run ------------------------------------------------------------------------------------

    async def run(self) -> Scorecard | None:
        cfg = self.config
        factories = build_factories(cfg, self.env)  # config errors before anything is written
        if not cfg.workers:
            log.warning("config.no_workers", config=str(cfg.path or "built-in"),
                        hint="add [[workers]] tables; nothing will run")  # fmt: skip
        secret = load_secret(self.env, cfg.killswitch_secret_file)
        try:
            make_state_dir(cfg.state_dir)
            if any(s.user for s in cfg.workers):
                private_state_dir(cfg.state_dir)
        except OSError as exc:
            raise ConfigError(
                f"cannot create the state directory {cfg.state_dir}: {exc.strerror or exc}"
            ) from None
        system = SystemClock()
        # The embedded SQLite store migrates itself; a shared Postgres is migrated by an operator
        # (`acp-supervisor db migrate`), never by whichever host happens to start first.
        store = await open_store(cfg.db_url, system, migrate=not cfg.db_url.startswith("postgres"),
                                 query_timeout=cfg.query_timeout)  # fmt: skip
        if any(s.user for s in cfg.workers):
            private_files(sqlite_files(cfg))  # a database outside the state directory too
        try:
            if not self.simulate:
                self.coordinator = Coordinator(store, fleet=cfg.fleet, host_id=cfg.host_id,
                                               lease_ttl=cfg.lease_ttl, heartbeat=cfg.heartbeat)  # fmt: skip
                await self.coordinator.register()
            plan = await self._plan(store, system.now())
            if self.simulate:
                # Workers due on the same slot run side by side when nothing they wait for
                # ends on its own time: workers whose classes await only the gate, no alert
                # sink (a delivery's failure is recorded when a thread or a child ends), and
                # a store that keeps its work on the event loop. Else one at a time.
                gate_only = all(getattr(factories.get(spec.name), "awaits_only_the_gate", False)
                                for spec in cfg.workers)  # fmt: skip
                together = (self.side_by_side and gate_only and not cfg.alerts.sinks
                            and store.backend.keep_on_loop())  # fmt: skip
                self.clock = VirtualClock(plan.anchor, together=together)
                store.clock = self.clock
            return await self._run(store, plan, factories, secret)
        finally:
            with anyio.CancelScope(shield=True):
                if self.coordinator is not None:
                    try:
                        await self.coordinator.stop()
                    except StoreError as exc:
                        log.warning("lease.release_failed", error=str(exc))
                await store.close()

    async def _run(
        self, store: Store, plan: RunPlan, factories: dict[str, WorkerFactory], secret: bytes | None
    ) -> Scorecard | None:
        cfg, clock = self.config, self.clock
        # At startup nothing of this process has started: every started action of this host is an
        # earlier incarnation's. A resumed simulated run starts its clock at the anchor again, before
        # the killed incarnation's actions in simulated time, so "before now" would miss them all.
        started_real = clock.now() if not clock.virtual else None
        host_switch = HostSwitchFile(host_switch_path(cfg.state_dir), secret)
        # The store's replay mark: with the mark file (and the switch file) deleted, an old
        # disengage stays a replay and a missing file stays halt_all.
        host_switch.adopt_mark(await store.host_switch_mark(cfg.fleet, cfg.host_id))
        approvals = Approvals(store, cfg.approvals, cfg.fleet)
        alerts = self.alerts = Alerts(store, fleet=cfg.fleet, config=cfg.alerts, clock=clock)

        async def on_gate_alert(condition: str, detail: Mapping[str, Any]) -> None:
            await alerts.raise_alert(condition, session_id=detail.get("session"), detail=detail)

        async def on_fleet_alert(
            condition: str, session_id: str | None, detail: dict[str, Any]
        ) -> None:
            await alerts.raise_alert(condition, session_id=session_id, detail=detail)

        self.metrics = self._make_metrics()
        # The owner is this incarnation in the hosts row; a broken shadow candidate is logged,
        # it never stops the daemon. Wired here once: nothing is patched onto the gate later.
        owner = self.coordinator.instance if self.coordinator is not None else None
        gate = Gate(store=store, fleet=cfg.fleet, policy=cfg.policy, approvals=approvals,
                    host_switch=host_switch, token_budgets=cfg.token_budgets, models=cfg.models,
                    timezone=cfg.timezone, on_alert=on_gate_alert, observer=self.metrics,
                    host=cfg.host_id, owner=owner, halt_in_flight=cfg.halt_in_flight,
                    shadow=shadow_for(cfg))  # fmt: skip
        self.gate = gate
        windows = WindowManager(store, fleet=cfg.fleet, length=plan.profile.window,
                                tz=cfg.timezone, max_cost=plan.profile.max_cost,
                                max_actions=plan.profile.max_actions, by=cfg.host_id,
                                run_end=plan.end, on_closed=alerts.on_window_closed)  # fmt: skip
        self.windows = windows
        checkpoints = Checkpoints(store, cfg.fleet)
        fleet = Fleet(fleet=cfg.fleet, host=cfg.host_id, store=store, gate=gate, windows=windows,
                      checkpoints=checkpoints, clock=clock, profile=plan.profile,
                      timezone=cfg.timezone, anchor=plan.anchor, run_end=plan.end,
                      effects=EffectLog(effects_path(self.effects_dir or cfg.state_dir)), seed=self.seed,
                      stopping=self.stopping, on_alert=on_fleet_alert)  # fmt: skip
        self.fleet = fleet
        keeper = self.switch_keeper = SwitchKeeper(
            store=store, gate=gate, host_switch=host_switch, alerts=alerts, clock=clock,
            fleet=cfg.fleet, host_id=cfg.host_id, state_dir=cfg.state_dir,
            watch_interval=cfg.killswitch_watch_interval, store_poll=cfg.killswitch_store_poll,
            workers=lambda: [s.as_dict() for s in fleet.status.values()],
            on_write_failed=self._state_write_failed,
        )  # fmt: skip
        self._serve_metrics()
        structlog.contextvars.bind_contextvars(fleet=cfg.fleet, host=cfg.host_id)

        # recovery before taking traffic
        self.notifier.extend_timeout(120)
        report = await recovery.scan(store, fleet=cfg.fleet, approvals=approvals,
                                     host_switch=host_switch, by=cfg.host_id,
                                     started_before=started_real, host=cfg.host_id,
                                     live_after=await self._live_after(store),
                                     owner=gate.owner, in_flight=gate.owned)  # fmt: skip
        if report.in_doubt:
            await alerts.raise_alert("recovery_in_doubt", session_id=None,
                                     detail={"in_doubt": report.in_doubt,
                                             "actions": report.found.get("actions", [])[:20]})  # fmt: skip
        await keeper.record_host(host_switch.read())
        await store.ensure_fleet_switch(cfg.fleet)
        if not clock.virtual:
            await windows.record_missed(clock.now())
        session = await windows.ensure(clock.now())
        log.info("daemon.ready", horizon=plan.horizon, simulated=clock.virtual,
                 window=session.window_key if session else None, recovered=report.repairs,
                 workers=sum(s.replicas for s in cfg.workers))  # fmt: skip
        if self.install_signals:  # the process is the daemon's own, not a test's or a drill's
            gctune.settle()  # start-up's objects out of the collector's way (ops/gctune.py)

        async with anyio.create_task_group() as tg:
            if self.install_signals and not clock.virtual:
                # Handlers first, READY second: a SIGHUP or SIGTERM that systemd sends once it
                # sees READY must find them installed, not the default action (terminate).
                await tg.start(self._signals, tg.cancel_scope, name="signals")
            self.notifier.ready(self._status_line())
            self._tg = tg
            await tg.start(alerts.run_sinks)
            clock.spawn(tg, self._duty, self._alerts_duty(alerts, approvals), name="alerts")
            self._factories = dict(factories)
            for spec in cfg.workers:
                self._add_spec(spec)
            if self.coordinator is None:
                for name in list(self._specs):
                    self._start_instance(name)
            else:
                await self._coordinate_once()
                tg.start_soon(self._coordination, name="coordination")
            clock.spawn(tg, self._duty, self._rotation(windows), name="rotation")
            clock.spawn(tg, self._escalation, approvals, name="escalation")
            recover = functools.partial(self._recover, store, approvals, host_switch)
            clock.spawn(tg, self._duty, self._every(cfg.recovery_every, "recovery", recover),
                        name="recovery")  # fmt: skip
            if not clock.virtual:
                tg.start_soon(self._realtime_duties, store, keeper, name="realtime")
                tg.start_soon(keeper.watch_store, name="fleet-switch")
                if cfg.console.enabled:
                    tg.start_soon(self._console, name="console")
            if plan.end is not None:
                await clock.sleep_until(plan.end, self.stopping)
            else:
                await self.stopping.wait()
            clock.ring(self.stopping)
            fleet.stop_all()
            self.notifier.stopping()
            self.notifier.extend_timeout(cfg.shutdown_timeout + 5)
            with anyio.move_on_after(cfg.shutdown_timeout):
                await fleet.idle.wait()
            tg.cancel_scope.cancel()

        self.store_lost = self.store_lost or store.backend.lost()  # a simulated run has no watch
        if self.store_lost is not None:
            with anyio.move_on_after(5):
                await alerts.flush()  # the sinks hear of it: the store cannot record it
            alerts.close()
            if self.metrics is not None:
                self.metrics.close()
            raise StoreLost(f"{self.store_lost}: every action halted; restore the database "
                            "(or `acp-supervisor db migrate --new`) before starting again")  # fmt: skip
        over = plan.end is not None and clock.now() >= plan.end
        self.finished = over
        if over:
            await windows.close_current()
            if plan.run_id is not None:
                await store.finish_run(run_id=plan.run_id, fleet=cfg.fleet, at=clock.now())
        with anyio.move_on_after(5):
            await alerts.flush()  # deliveries already queued get their chance
        alerts.close()
        if self.metrics is not None:
            self.metrics.close()
        await store.flush_telemetry()
        self.scorecard = await compute(store, cfg.fleet)
        card = self.scorecard
        log.info("run.scorecard", fleet=card.fleet, pending=card.pending, windows=len(card.windows),
                 denials_by_reason=card.denials_by_reason, **card.total)  # fmt: skip
        log.info("daemon.stopped", horizon_over=over, telemetry_dropped=store.telemetry_dropped)
        return self.scorecard

    # -- duties -----------------------------------------------------------------------------------

    async def _duty(self, duty: Duty) -> None:
        """Run one singleton duty for as long as the daemon runs: sleep until it is next due (or
        its wake event rings), then, on the leader only, run it under the leader's fence. A store
        error is logged and raised as the state_write_failed alert, and the duty goes on."""
        at = None if duty.first else duty.idle()
        if at is None and not duty.first:
            return
        while not self.stopping.is_set():
            if at is not None:
                await self.clock.sleep_until(at, duty.wake() if duty.wake else self.stopping)
                if self.stopping.is_set():
                    return
                if duty.on_wake is not None:
                    duty.on_wake()
            due: datetime | None = None
            if self._leading():
                try:
                    with self._fenced():
                        ran = await duty.run()
                    if isinstance(ran, DutyOver):
                        return
                    due = ran
                except StoreError as exc:
                    log.warning("duty.failed", duty=duty.name, error=str(exc))
                    await self._state_write_failed(duty.name, exc)
                    if duty.retry is not None:
                        due = self.clock.now() + timedelta(seconds=duty.retry)
            at = due or duty.idle()
            if at is None:
                return

    def _rotation(self, windows: WindowManager) -> Duty:
        """At each boundary the leader closes the old window and opens the next; other hosts only
        follow (an action on any host rotates by itself if it gets there first)."""

        async def rotate() -> datetime | DutyOver:
            current = await windows.ensure(self.clock.now())
            if current is None:  # the run is over
                await windows.close_current()
                return DUTY_OVER
            self.notifier.status(self._status_line())
            return current.ends_at

        def follow() -> datetime | None:
            now = self.clock.now()
            if windows.run_end is not None and now >= windows.run_end:
                return None
            return next_boundary(now, windows.length, windows.tz)

        return Duty("rotation", rotate, follow, retry=self.config.heartbeat, first=True)

    def _every(self, seconds: float, name: str, work: Callable[[], Awaitable[None]]) -> Duty:
        return Duty(name, work, lambda: self.clock.now() + timedelta(seconds=seconds))

    def _alerts_duty(self, alerts: Alerts, approvals: Approvals) -> Duty:
        """Evaluate the approval alerts every evaluate_every while approvals are pending; with none
        pending (and none counted last time) nothing can change until one is created."""

        def next_look() -> datetime:
            idle = approvals.next_due is None and alerts.pending_approvals == 0
            wait = self.config.recovery_every if idle else self.config.alerts.evaluate_every
            return self.clock.now() + timedelta(seconds=wait)

        return Duty("alerts", alerts.evaluate, next_look, wake=approvals.watch)

    async def _escalation(self, approvals: Approvals) -> None:
        """Sleep until the next approval is due (at most escalation_every), then move it on."""
        while approvals.next_due is None and not self.stopping.is_set():
            try:
                await approvals.refresh_hint()
                break
            except StoreError as exc:
                log.warning("duty.failed", duty="escalation", error=str(exc))
                await self.clock.sleep_until(
                    self.clock.now() + timedelta(seconds=self.config.heartbeat), self.stopping
                )

        async def escalate() -> None:
            if approvals.next_due is not None and approvals.next_due <= await self._deadline_now(
                approvals
            ):
                counts = await approvals.escalate_due()
                if any(counts.values()):
                    log.info("approvals.escalated", **counts)
            elif not self.clock.virtual:
                try:
                    await approvals.refresh_hint()  # approvals created by another host or process
                except StoreError as exc:
                    log.warning("duty.failed", duty="escalation", error=str(exc))

        def next_due() -> datetime:
            now = self.clock.now()
            idle_until = now + timedelta(seconds=self.config.recovery_every)
            target = min(approvals.next_due or idle_until, idle_until)
            if self.clock.virtual is False:
                target = min(target, now + timedelta(seconds=self.config.escalation_every))
            return max(target, now)

        await self._duty(Duty("escalation", escalate, next_due, wake=lambda: approvals.changed,
                              on_wake=approvals.rearm))  # fmt: skip

    async def _deadline_now(self, approvals: Approvals) -> datetime:
        """Now on the clock approval deadlines run on (the database's on Postgres): a step of
        this host's wall clock neither delays nor hastens an escalation."""
        try:
            return await approvals.store.deadline_now()
        except StoreError as exc:
            log.warning("duty.failed", duty="escalation", error=str(exc))
            return self.clock.now()

    async def _recover(
        self, store: Store, approvals: Approvals, host_switch: HostSwitchFile
    ) -> None:
        longest = max((s.cycle_deadline for s in self.config.workers), default=300.0)
        # Actions started and windows that ended this recently are still the daemon's own.
        settled = self.clock.now() - timedelta(seconds=longest * 2)
        await recovery.scan(store, fleet=self.config.fleet, approvals=approvals,
                            host_switch=host_switch, by=self.config.host_id,
                            started_before=settled, ended_before=settled,
                            host=self.config.host_id, approvals_due=False,
                            live_after=await self._live_after(store),
                            owner=self.gate.owner, in_flight=self.gate.owned)  # fmt: skip

    async def _console(self) -> None:
        """The operator console, off the gate's hot path: its own store connection, its own
        requests. Its failure is logged and leaves the daemon governing."""
        from ..console.serve import serve_beside

        try:
            await serve_beside(self.config)
        except Exception as exc:
            log.error("console.failed", error=f"{type(exc).__name__}: {exc}")

    async def _realtime_duties(self, store: Store, keeper: SwitchKeeper) -> None:
        """Only on the system clock: telemetry flush, kill-switch watch, watchdog, status."""
        interval = self.config.killswitch_watch_interval
        watchdog = self.notifier.watchdog_interval()
        last_flush = last_ping = last_metrics = last_stall = 0.0
        stalled: list[str] = []
        while True:
            await anyio.sleep(interval)
            now = anyio.current_time()
            lost = store.backend.lost()
            if lost is not None and self.store_lost is None:
                await self._on_store_lost(lost)
            state = await keeper.poll_host()
            if now - last_flush >= self.config.flush_every:
                last_flush = now
                await store.flush_telemetry()
            if self.fleet is not None and now - last_stall >= 1.0:
                last_stall = now
                stalled = await self._check_stalls(stalled)
            if self.metrics is not None and now - last_metrics >= 1.0:
                last_metrics = now
                await self._update_metrics(store, state)
            if watchdog is not None and now - last_ping >= watchdog:
                last_ping = now
                self.notifier.watchdog()
                self.notifier.status(self._status_line())

    async def _check_stalls(self, known: list[str]) -> list[str]:
        """A worker that completes no cycle is never silent: `stalled` in status, an alert while
        any is stalled, and /healthz failing. Returns the workers stalled now."""
        assert self.fleet is not None
        found = await self.fleet.check_stalls()
        names = sorted(st.name for st in found)
        if self.metrics is not None:
            self.metrics.set_stalled_workers(names)
        if names and not known:
            now = self.clock.monotonic()
            since = {st.name: round(now - st.progress_at, 1) for st in found}
            await self.alerts.raise_alert("worker_stalled", session_id=None,
                                          detail={"workers": names, "seconds": since})  # fmt: skip
        elif known and not names:
            await self.alerts.resolve("worker_stalled", session_id=None, detail={"workers": known})
        return names

    async def _on_store_lost(self, problem: str) -> None:
        """The database file was deleted or replaced: every commit now fails (the backend checks
        each one), so no action gets a started record; alert, drain and exit non-zero."""
        self.store_lost = problem
        log.critical("store.lost", problem=problem, treated_as="halt_all")
        await self.alerts.raise_alert(STATE_WRITE_FAILED, session_id=None,
                                      detail={"store_lost": problem})  # fmt: skip
        self.clock.ring(self.stopping)

    async def _state_write_failed(self, duty: str, exc: Exception) -> None:
        """A duty's write failed: the state_write_failed alert (logged and delivered even when
        the store cannot record it; raise_alert never raises)."""
        await self.alerts.raise_alert("state_write_failed", session_id=None,
                                      detail={"duty": duty, "error": str(exc)})  # fmt: skip

    def _add_spec(self, spec: WorkerSpec) -> None:
        for name in spec.instance_names():
            self._specs[name] = spec
            if name != spec.name:
                self.gate.worker_groups[name] = spec.name

    def _start_instance(self, name: str) -> None:
        assert self._tg is not None and self.fleet is not None
        if name in self._scopes:
            return
        spec = self._specs[name]
        self.fleet.add_instance(name, spec)
        scope = anyio.CancelScope()
        self._scopes[name] = scope
        self.clock.spawn(
            self._tg, self._supervise, name, scope, self._factories[spec.name], name=name
        )

    async def _supervise(self, name: str, scope: anyio.CancelScope, factory: WorkerFactory) -> None:
        assert self.fleet is not None
        try:
            with scope:
                while not await self._run_instance_once(name, factory):
                    spec = self._specs.get(name)
                    if spec is None or self.stopping.is_set():
                        break
                    wait = timedelta(seconds=spec.quarantine_for)
                    if not await self.clock.sleep_until(self.clock.now() + wait, self.stopping):
                        break
        finally:
            self._scopes.pop(name, None)
            if self.coordinator is not None and name in self.coordinator.slots:
                with anyio.CancelScope(shield=True):
                    try:
                        await self.coordinator.release(name)  # handed over at once, no wait
                    except StoreError as exc:
                        log.warning("lease.release_failed", worker=name, error=str(exc))
        if name not in self._specs:
            self.fleet.status.pop(name, None)
            log.info("worker.removed", worker=name)

    async def _run_instance_once(self, name: str, factory: WorkerFactory) -> bool:
        """False when the instance failed outside its cycles (a worker whose __init__ or restore
        raises, an unexpected bug): it is quarantined and tried again, never taking the daemon
        and every other worker down with it."""
        assert self.fleet is not None
        while True:
            try:
                await self.fleet.run_instance(name, factory)
                return True
            except StoreError as exc:
                if not exc.transient or self.stopping.is_set():
                    failure: Exception = exc
                    break
                # The store went away outside a cycle (resuming the checkpoint): the worker did
                # nothing wrong, so it waits for the store and starts again, no quarantine.
                log.warning("worker.store_unavailable", worker=name, error=str(exc))
                later = self.clock.now() + timedelta(seconds=self.config.heartbeat)
                await self.clock.sleep_until(later, self.stopping)
            except Exception as exc:
                failure = exc
                break
        status = self.fleet.status.get(name)
        error = f"{type(failure).__name__}: {failure}"
        if status is not None:
            status.state, status.last_error = "quarantined", error
            status.restarts += 1
        counts = self.fleet.quarantine_counts
        counts[name] = counts.get(name, 0) + 1
        log.error("worker.failed", worker=name, error=error)
        return False

    def _stop_instance(self, name: str) -> None:
        """After its current cycle: checkpoint, stop, give the slot back."""
        if self.fleet is not None and name in self._scopes:
            self.fleet.stop_instance(name)

    async def _coordinate_once(self) -> None:
        assert self.coordinator is not None
        gained, give_up = await self.coordinator.beat(sorted(self._specs))
        for name in give_up:
            log.info("worker.slot_handed_over", worker=name)
            self._stop_instance(name)
        for name in gained:
            if name in self._specs and not self.stopping.is_set():
                log.info("worker.slot_taken", worker=name)
                self._start_instance(name)

    async def _coordination(self) -> None:
        """Heartbeat: renew leases, adopt slots of dead hosts, hand over excess ones. A host that
        cannot reach the store for fleet_switch_grace treats the fleet switch as halt_all."""
        assert self.coordinator is not None
        unreachable_since: float | None = None
        while not self.stopping.is_set():
            await anyio.sleep(self.config.heartbeat)
            try:
                await self._coordinate_once()
                if unreachable_since is not None:
                    log.info("store.reachable_again")
                unreachable_since = None
                self.gate.fleet_switch_unreadable(None)
            except StoreError as exc:
                now = anyio.current_time()
                unreachable_since = unreachable_since or now
                if now - unreachable_since >= self.config.fleet_switch_grace:
                    if self.gate.fleet_unknown is None:
                        log.error("killswitch.fleet_unknown", treated_as="halt_all", error=str(exc))
                    self.gate.fleet_switch_unreadable(
                        f"store unreachable for {now - unreachable_since:.0f}s"
                    )
                    self.coordinator.leader = None  # no singleton work without a renewed lease
                else:
                    log.warning("lease.heartbeat_failed", error=str(exc))

    async def _live_after(self, store: Store) -> datetime:
        return await store.db_now() - timedelta(seconds=self.config.lease_ttl)

    @contextmanager
    def _fenced(self) -> Iterator[None]:
        """A singleton duty's writes, each checked against the leader's fence (its lease and
        token) inside its own transaction."""
        token = current_fence.set(self.coordinator.leader if self.coordinator else None)
        try:
            yield
        finally:
            current_fence.reset(token)

    def _leading(self) -> bool:
        return self.coordinator is None or self.coordinator.is_leader

    async def reload(self) -> bool:
        """SIGHUP: a new policy, budgets, approvals chain and worker set, without dropping running
        workers. An invalid config is logged and the old one stays. True when applied."""
        if self.reload_config is None or self.fleet is None:
            return False
        self.notifier.reloading()
        try:
            new = self.reload_config()
            factories = build_factories(new, self.env)
            if new.fleet != self.config.fleet or new.db_url != self.config.db_url:
                raise ConfigError("fleet and database cannot change on reload; restart instead")
        except ConfigError as exc:
            log.error("config.reload_rejected", error=str(exc))
            self.notifier.ready(self._status_line())
            return False
        old_specs = {s.name: s for s in self.config.workers}
        new_specs = {s.name: s for s in new.workers}
        self.gate.reconfigure(policy=new.policy, chain=new.approvals,
                              token_budgets=new.token_budgets, models=new.models,
                              halt_in_flight=new.halt_in_flight, shadow=shadow_for(new))  # fmt: skip
        profile = new.horizon(self.horizon or new.profile)
        self.windows.max_cost, self.windows.max_actions = profile.max_cost, profile.max_actions
        self._factories.update(factories)
        for name, spec in old_specs.items():
            if name not in new_specs:
                for instance in spec.instance_names():
                    self._specs.pop(instance, None)
                    scope = self._scopes.get(instance)
                    if scope is not None:
                        scope.cancel()
        for name, spec in new_specs.items():
            if name not in old_specs:
                self._add_spec(spec)
                if self.coordinator is None:
                    for instance in spec.instance_names():
                        self._start_instance(instance)
        self.config = new
        log.info("config.reloaded", added=sorted(set(new_specs) - set(old_specs)),
                 removed=sorted(set(old_specs) - set(new_specs)))  # fmt: skip
        self.notifier.ready(self._status_line())
        return True

    async def _signals(
        self, scope: anyio.CancelScope, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            task_status.started()
            async for signum in signals:
                log.info("daemon.signal", signal=signal.Signals(signum).name)
                if signum == signal.SIGHUP:
                    await self.reload()
                    continue
                if self.stopping.is_set():
                    scope.cancel()  # a second signal: stop now
                    return
                self.clock.ring(self.stopping)

    def _make_metrics(self) -> Metrics | None:
        if not self.config.metrics.enabled or self.clock.virtual:
            return None
        try:
            return Metrics(self.config.metrics, now=self.clock.now)
        except ImportError:
            raise ConfigError(
                "metrics.enabled needs prometheus-client: pip install 'acp-supervisor[metrics]'"
            ) from None

    def _serve_metrics(self) -> None:
        metrics = self.metrics
        if metrics is None:
            return
        fleet, windows, alerts = self.fleet, self.windows, self.alerts
        assert fleet is not None
        # read at scrape time from the counts these keep; dict.copy is atomic under the GIL
        metrics.count_from("acp_worker_restarts_total", fleet.restart_counts.copy)
        metrics.count_from("acp_worker_quarantines_total", fleet.quarantine_counts.copy)
        metrics.count_from("acp_windows_opened_total", lambda: {"": windows.opened})
        metrics.count_from("acp_windows_closed_total", lambda: {"": windows.closed})
        metrics.count_from(
            "acp_alert_deliveries_total",
            lambda: {"sent": alerts.delivered, "failed": alerts.failed, "dropped": alerts.dropped},
        )
        port = metrics.serve()
        log.info("metrics.serving", host=self.config.metrics.host, port=port)

    async def _update_metrics(self, store: Store, switch: SwitchState) -> None:
        assert self.metrics is not None
        self.metrics.tick()
        try:
            current = self.windows.current and await store.get_session(self.windows.current.id)
            self.metrics.set_store_ok(True)
        except StoreError as exc:
            self.metrics.set_store_ok(False, str(exc))
            current = None
        if current:
            self.metrics.set_budget_used(cost=current.used_cost, actions=current.used_actions)
        if self.fleet is not None:
            self.metrics.set_workers(self.fleet.by_state())
        self.metrics.set_killswitch_mode(switch.mode.value)
        try:  # the backlog as of now (the alerts' view is as old as their last evaluation)
            backlog = await store.approval_backlog(fleet=self.config.fleet)
        except StoreError:
            backlog = None
        if backlog is not None:
            self.metrics.set_approvals(backlog.pending, backlog.oldest_at)

    def _status_line(self) -> str:
        window = (
            self.windows.current.window_key
            if getattr(self, "windows", None) and self.windows.current
            else "-"
        )
        states = (
            ", ".join(f"{k} {v}" for k, v in sorted(self.fleet.by_state().items()))
            if self.fleet
            else ""
        )
        fleet_switch = getattr(getattr(self, "gate", None), "fleet_unknown", None)
        unknown = f"; fleet switch unknown ({fleet_switch}): halted" if fleet_switch else ""
        return f"horizon {self.horizon or 'continuous'}; window {window}; workers {states or 'starting'}{unknown}"


def run_end(anchor: datetime, profile: HorizonProfile, tz: Any) -> datetime:
    """Whole days count in local calendar days, so a `day` run on a DST date covers that date's
    23 or 25 hourly windows; shorter runs count real time."""
    length = profile.run_length
    if length % timedelta(days=1):
        return anchor + length
    local_date = anchor.astimezone(tz).date()
    if anchor == date_start(local_date, tz):
        # A run from the first instant of a date covers whole dates, however each begins: where
        # midnight is skipped the first instant is 01:00, and 01:00 a date later is an hour late.
        return date_start(local_date + timedelta(days=length // timedelta(days=1)), tz)
    local_end = anchor.astimezone(tz).replace(tzinfo=None) + length
    return window_at(local_end.replace(tzinfo=tz), profile.window, tz).start


def private_state_dir(state_dir: Path) -> None:
    """Workers that run as another user must find the state directory closed: no group or
    other access (the database, the switch file and its high-water mark live there)."""
    mode = state_dir.stat().st_mode & 0o777
    if mode & 0o077:
        state_dir.chmod(mode & 0o700)
        log.warning(
            "state_dir.tightened", path=str(state_dir), was=oct(mode), now=oct(mode & 0o700)
        )


def private_files(paths: list[Path]) -> None:
    for path in paths:
        try:
            mode = path.stat().st_mode & 0o777
            if mode & 0o077:
                path.chmod(mode & 0o700)
                log.warning(
                    "store.file_tightened", path=str(path), was=oct(mode), now=oct(mode & 0o700)
                )
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.error("store.file_not_private", path=str(path), error=exc.strerror or str(exc))
