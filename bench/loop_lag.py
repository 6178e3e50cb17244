"""Event-loop lag while the heavy reads run on a store with a long history, and how long a host
kill-switch engage made during them takes to reach idle workers.

    .venv/bin/python bench/loop_lag.py [--events 1000000] [--big-session 100000] [--rounds 3]
                                       [--backend sqlite|postgres] [--quick] [--json]
                                       [--keep-store FILE] [--gc-probe] [--no-gc-tune]

A store (SQLite: a temporary file, the store's own settings, synchronous=full; Postgres: a
temporary database at ACP_TEST_PG, created and dropped) is seeded with
`--events` events: the history of bench/recovery.py (hourly windows of about 120 events, actions,
the command ledger, approvals, a few crash leftovers) plus one big session, the current window,
holding `--big-session` of them. Seeding is one transaction straight into the tables (executemany
on SQLite, COPY on Postgres): setup, not what is measured. `--keep-store FILE` (SQLite) seeds
into FILE once and starts each later run with the same --events and --big-session from a fresh
copy of it (reseeded when it is a day old: the live host's heartbeat is a day ahead). Its
windows keep the hours of its seeding: in a later hour the current window is overdue too, and
the first recovery pass closes it beside the crash leftovers it repairs anyway.

Then, in one event loop, as the daemon has them: the store opened the daemon's way, the
garbage collector tuned as the daemon tunes it once started (`gctune.settle()`; `--no-gc-tune`
leaves the interpreter's defaults, for comparison), the
kill-switch keeper (the daemon's `SwitchKeeper`) polling the host switch file every `killswitch.watch_interval` (the default
config's), idle workers waiting on the gate's `switch_changed` (as a halted worker waits; the daemon's own
`SwitchKeeper` watches the switch), and
a ticker task that sleeps 5 ms again and again and records by how much each sleep overran (the
loop's lag). Measured, one after another:

- baseline: nothing else running, then an engage;
- scorecard: `scorecard.compute(store, fleet)`, what the daemon runs at a run's end and
  `acp-supervisor scorecard` prints;
- events replay: every event of the big session, page after page of `store.replay` (10,000
  events a page, the page `acp-supervisor events replay` reads);
- recovery scan: `recovery.scan` with the arguments of the daemon's scheduled scan.

Each heavy read runs pass after pass until an engage made 50 ms after its start has woken every
idle worker (and at least one pass is done). The engage is the CLI's own code path
(`commands.killswitch_engage --scope host --mode halt_all`) on another thread with its own event
loop and store connection, as a separate `acp-supervisor killswitch engage` process would run it;
it is disengaged (and the keeper has seen that) before the next read. The four phases run
`--rounds` times (`--quick`: once, still on 1M events; the seeding takes most of its minute).
Printed: per phase, over its rounds, the worst and p99 lag of the ticker, the time per pass, whether the engage returned while a pass was
running, and engage-to-wake: from the engage's return to the last idle worker woken (negative
when the keeper saw the switch file before the CLI had recorded its event and returned), and
call-to-wake, from the engage's start.
The aims (issue 16): worst lag at most 50 ms and engage-to-wake at most 100 ms at 1M events.
`--gc-probe` also times every garbage collection (`gc.callbacks`) and prints, per phase, the
collections of each generation and the longest, on whichever thread it ran: a collection holds
the GIL, so one started in a read's worker thread stops the loop as well.
The figures move with the machine's load; the script stops by itself.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import io
import json
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import anyio  # noqa: E402
import anyio.lowlevel  # noqa: E402
import anyio.to_thread  # noqa: E402

from supervisor.actions import derive_id  # noqa: E402
from supervisor.cli import commands  # noqa: E402
from supervisor.config import Config, load_config  # noqa: E402
from supervisor.governance.approvals import Approvals  # noqa: E402
from supervisor.governance.gate import Gate  # noqa: E402
from supervisor.killswitch import SECRET_ENV, HostSwitchFile, load_secret  # noqa: E402
from supervisor.killswitch.engage import host_switch_path  # noqa: E402
from supervisor.killswitch.keeper import SwitchKeeper  # noqa: E402
from supervisor.logging import configure  # noqa: E402
from supervisor.ops import gctune  # noqa: E402
from supervisor.ops.alerts import Alerts  # noqa: E402
from supervisor.ops.scorecard import compute  # noqa: E402
from supervisor.runtime import recovery  # noqa: E402
from supervisor.store import Store, open_store  # noqa: E402
from supervisor.timing.clock import SystemClock  # noqa: E402

TICK = 0.005
ENGAGE_AFTER = 0.05  # seconds after a heavy read starts
PAGE = 10_000  # `events replay` reads one page of this many
PHASE_LIMIT = 120.0  # a phase that takes longer is reported as a failure, not waited for
PG_ADMIN = os.environ.get("ACP_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def _load_history() -> ModuleType:
    """bench/recovery.py's history (windows, actions, ledger, approvals, leftovers)."""
    spec = importlib.util.spec_from_file_location("bench_recovery", ROOT / "bench" / "recovery.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


HISTORY = _load_history()
FLEET: str = HISTORY.FLEET
HOST: str = HISTORY.HOST


# --- seeding ----------------------------------------------------------------------------------


Plan = tuple[str, Iterator[tuple[Any, ...]], dict[str, list[tuple[Any, ...]]]]


def plan(total: int, big: int, now: datetime) -> Plan:
    """`total` events, `big` of them in the current window: (that window's session id, the event
    rows in insertion order, the other tables' rows, complete once the events are consumed)."""
    shape = HISTORY.Shape.of(max(total - big, 1000))
    tables, _expect = HISTORY.history(shape, now)
    big_sid: str = HISTORY._sid(shape.sessions)  # the current (open) window
    start = now.replace(minute=0, second=0, microsecond=0)
    span = max((now - start).total_seconds(), 1.0)

    def rows() -> Iterator[tuple[Any, ...]]:
        yield from HISTORY.events(shape, tables)  # sets the streams' last_seq when exhausted
        last = dict(tables["streams"])[big_sid]
        for n in range(big):
            at = start + timedelta(seconds=span * n / big)
            kind = "ACTION_DENIED" if n % 5 == 4 else "CYCLE_COMPLETED"
            yield (big_sid, last + 1 + n, kind, "policy" if kind == "ACTION_DENIED" else None,
                   f'{{"cycle":{n}}}', kind != "CYCLE_COMPLETED", derive_id("big", str(n)), None,
                   f"support-{n % 10}", None, at)  # fmt: skip
        tables["streams"] = [(sid, seq + big if sid == big_sid else seq)
                             for sid, seq in tables["streams"]]  # fmt: skip

    return big_sid, rows(), tables


async def seed_sqlite(path: Path, total: int, big: int, now: datetime) -> str:
    """One executemany transaction straight into the tables; the big session's id."""
    store = await open_store(f"sqlite:///{path}", SystemClock(), migrate=True)
    await store.close()
    big_sid, rows, tables = plan(total, big, now)
    value = HISTORY._sqlite_value
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("BEGIN")
        conn.executemany(HISTORY._insert_sql("events", "qmark"),
                         (tuple(value(v) for v in r) for r in rows))  # fmt: skip
        for table, table_rows in tables.items():
            conn.executemany(HISTORY._insert_sql(table, "qmark"),
                             (tuple(value(v) for v in r) for r in table_rows))  # fmt: skip
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    synced(path)
    return big_sid


def synced(path: Path) -> None:
    """On disk before anything is measured: the seed is written with synchronous=OFF, and the
    daemon's first sync of the file would otherwise wait for all of it (hundreds of MB),
    which a store that had been running for a while would not."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _reuse(keep: Path, path: Path, shape: dict[str, int], now: datetime) -> str | None:
    """Copy the kept store to `path` if it holds `shape` and is under a day old: its big
    session's id; None (and the stale files removed) when it must be seeded again."""
    meta_path = keep.with_name(keep.name + ".json")
    with contextlib.suppress(OSError, ValueError, KeyError):
        meta = json.loads(meta_path.read_text())
        fresh = now - datetime.fromisoformat(meta["seeded_at"]) < timedelta(hours=23)
        if {k: meta.get(k) for k in shape} == shape and keep.exists() and fresh:
            shutil.copyfile(keep, path)
            synced(path)
            return str(meta["big_sid"])
    for suffix in ("", "-wal", "-shm", ".identity", ".json"):
        keep.with_name(keep.name + suffix).unlink(missing_ok=True)
    return None


async def kept_sqlite(keep: Path, path: Path, total: int, big: int, now: datetime) -> str:
    """`--keep-store`: seed into `keep` unless it holds this shape already, then copy it to
    `path`, so every run starts from the same store; the big session's id."""
    shape = {"events": total, "big_session": big}
    big_sid = _reuse(keep, path, shape, now)
    if big_sid is None:
        big_sid = await seed_sqlite(keep, total, big, now)
        meta = {**shape, "big_sid": big_sid, "seeded_at": now.isoformat()}
        keep.with_name(keep.name + ".json").write_text(json.dumps(meta))
        shutil.copyfile(keep, path)
        synced(path)
    return big_sid


async def seed_postgres(url: str, total: int, big: int, now: datetime) -> str:
    """COPY in one transaction straight into the tables, then ANALYZE; the big session's id."""
    import asyncpg

    store = await open_store(url, SystemClock(), migrate=True)
    await store.close()
    big_sid, rows, tables = plan(total, big, now)
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            await conn.copy_records_to_table("events", records=rows,
                                             columns=list(HISTORY.COLUMNS["events"]))  # fmt: skip
            for table, table_rows in tables.items():
                await conn.copy_records_to_table(table, records=table_rows,
                                                 columns=list(HISTORY.COLUMNS[table]))  # fmt: skip
        await conn.execute("ANALYZE")
    finally:
        await conn.close()
    return big_sid


async def count_events(url: str, big_sid: str) -> tuple[int, int]:
    """(events in the store, events in the big session), straight from the driver."""
    if url.startswith("sqlite"):
        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as conn:
            total = conn.execute("SELECT count(*) FROM events").fetchone()[0]
            big = conn.execute("SELECT count(*) FROM events WHERE session_id = ?",
                               (big_sid,)).fetchone()[0]  # fmt: skip
        return int(total), int(big)
    import asyncpg

    pg = await asyncpg.connect(url)
    try:
        total = await pg.fetchval("SELECT count(*) FROM events")
        big = await pg.fetchval("SELECT count(*) FROM events WHERE session_id = $1", big_sid)
    finally:
        await pg.close()
    return int(total), int(big)


async def admin(statement: str) -> None:
    import asyncpg

    try:
        conn = await asyncpg.connect(PG_ADMIN, timeout=10)
    except (OSError, asyncpg.PostgresError) as exc:
        raise SystemExit(f"loop_lag: PostgreSQL at {PG_ADMIN} is unreachable: {exc}") from None
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


# --- the loop -----------------------------------------------------------------------------------


class GcProbe:
    """`--gc-probe`: every collection's (end instant, generation, seconds, on the loop's thread)."""

    def __init__(self) -> None:
        self.loop_thread = threading.get_ident()
        self.collections: list[tuple[float, int, float, bool]] = []
        self._started: dict[int, float] = {}

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        now = time.perf_counter()
        thread = threading.get_ident()
        if phase == "start":
            self._started[thread] = now
        elif thread in self._started:
            t0 = self._started.pop(thread)
            self.collections.append((now, info["generation"], now - t0,
                                     thread == self.loop_thread))  # fmt: skip

    def between(self, t0: float, t1: float) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for gen in (0, 1, 2):
            seen = [(s, on_loop) for at, g, s, on_loop in self.collections
                    if g == gen and t0 <= at <= t1]  # fmt: skip
            worst = max(seen, default=(0.0, True))
            out[f"gen{gen}"] = {"n": len(seen), "max_ms": round(worst[0] * 1000, 1),
                                "max_on_loop": worst[1] if seen else None}  # fmt: skip
        return out


@dataclass
class Phase:
    name: str
    passes: int = 0
    pass_ms: list[float] = field(default_factory=list)
    lags_ms: list[float] = field(default_factory=list)
    engage_ms: float = 0.0  # the engage call itself (CLI path, on its thread)
    engaged_during_pass: bool = False
    wake_ms: float = 0.0  # engage returned -> the last idle worker woken
    call_wake_ms: float = 0.0  # engage called -> the last idle worker woken
    gc: list[dict[str, Any]] = field(default_factory=list)  # --gc-probe: one entry per round

    def merge(self, other: Phase) -> None:
        """Another round of the same phase: worst figures kept, samples pooled."""
        self.passes += other.passes
        self.gc += other.gc
        self.pass_ms += other.pass_ms
        self.lags_ms += other.lags_ms
        self.engage_ms = max(self.engage_ms, other.engage_ms)
        self.engaged_during_pass = self.engaged_during_pass and other.engaged_during_pass
        self.wake_ms = max(self.wake_ms, other.wake_ms)
        self.call_wake_ms = max(self.call_wake_ms, other.call_wake_ms)

    def summary(self) -> dict[str, Any]:
        lags = sorted(self.lags_ms) or [0.0]
        return {
            "name": self.name,
            "passes": self.passes,
            "pass_ms_median": round(statistics.median(self.pass_ms), 1) if self.pass_ms else None,
            "pass_ms_max": round(max(self.pass_ms), 1) if self.pass_ms else None,
            "worst_lag_ms": round(lags[-1], 1),
            "p99_lag_ms": round(lags[min(len(lags) - 1, int(len(lags) * 0.99))], 1),
            "ticks": len(self.lags_ms),
            "engage_call_ms": round(self.engage_ms, 1),
            "engaged_during_pass": self.engaged_during_pass,
            "engage_to_wake_ms": round(self.wake_ms, 1),
            "call_to_wake_ms": round(self.call_wake_ms, 1),
            **({"gc": self._gc_summary()} if self.gc else {}),
        }

    def _gc_summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for gen in ("gen0", "gen1", "gen2"):
            rounds = [r[gen] for r in self.gc]
            worst = max(rounds, key=lambda r: r["max_ms"])
            out[gen] = {"n": sum(r["n"] for r in rounds), "max_ms": worst["max_ms"],
                        "max_on_loop": worst["max_on_loop"]}  # fmt: skip
        return out


@dataclass
class Loop:
    store: Store
    config: Config
    keeper: SwitchKeeper
    gate: Gate
    waiters: int
    ticks: list[tuple[float, float]] = field(default_factory=list)  # (end, lag seconds)
    stop: bool = False
    probe: GcProbe | None = None


async def ticker(loop: Loop) -> None:
    while not loop.stop:
        t0 = time.perf_counter()
        await anyio.sleep(TICK)
        t1 = time.perf_counter()
        loop.ticks.append((t1, max(0.0, t1 - t0 - TICK)))


def _cli(handler: Any, config: Config, **args: Any) -> None:
    """One CLI subcommand, on this (worker) thread with its own event loop, output captured."""
    namespace = argparse.Namespace(scope=["host"], reason="loop-lag bench", by="bench", **args)
    with contextlib.redirect_stdout(io.StringIO()):
        code = anyio.run(handler, namespace, config)
    if code != 0:
        raise SystemExit(f"killswitch command failed with exit code {code}")


def _engage_later(config: Config, delay: float) -> tuple[float, float]:
    """On a thread: wait `delay`, engage halt_all on the host; (call start, return) instants."""
    time.sleep(delay)
    t_call = time.perf_counter()
    _cli(commands.killswitch_engage, config, mode="halt_all")
    return t_call, time.perf_counter()


async def phase(loop: Loop, name: str, work: Callable[[], Awaitable[object]] | None) -> Phase:
    result = Phase(name)
    woke: list[float] = []
    all_awake = anyio.Event()
    engaged: dict[str, float] = {}
    running: list[tuple[float, float]] = []  # the passes' (start, end)

    async def idle() -> None:
        await loop.gate.switch_changed.wait()
        woke.append(time.perf_counter())
        if len(woke) == loop.waiters:
            all_awake.set()

    async def engage() -> None:
        # Started before the heavy read so the thread's timer runs even while the loop is stalled.
        engaged["call"], engaged["return"] = await anyio.to_thread.run_sync(
            _engage_later, loop.config, ENGAGE_AFTER
        )

    t_start = time.perf_counter()
    with anyio.fail_after(PHASE_LIMIT):
        async with anyio.create_task_group() as tg:
            for _ in range(loop.waiters):
                tg.start_soon(idle)
            await anyio.sleep(0.02)  # the waiters block
            t_start = time.perf_counter()
            tg.start_soon(engage)
            await anyio.lowlevel.checkpoint()  # the engage thread starts its timer
            while work is not None and (not all_awake.is_set() or not running):
                p0 = time.perf_counter()
                await work()
                running.append((p0, time.perf_counter()))
            await all_awake.wait()
    t_end = time.perf_counter()
    result.passes = len(running)
    result.pass_ms = [(b - a) * 1000 for a, b in running]
    result.lags_ms = [lag * 1000 for at, lag in loop.ticks if t_start <= at <= t_end]
    result.engage_ms = (engaged["return"] - engaged["call"]) * 1000
    result.engaged_during_pass = any(a <= engaged["return"] <= b for a, b in running)
    result.wake_ms = (max(woke) - engaged["return"]) * 1000
    result.call_wake_ms = (max(woke) - engaged["call"]) * 1000
    if loop.probe is not None:
        result.gc.append(loop.probe.between(t_start, t_end))

    # Disengage, and wait until the keeper has seen it, before the next phase.
    seen = anyio.Event()

    async def until_seen() -> None:
        await loop.gate.switch_changed.wait()
        seen.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(until_seen)
        await anyio.sleep(0.01)
        await anyio.to_thread.run_sync(_cli, commands.killswitch_disengage, loop.config)
        with anyio.fail_after(10):
            await seen.wait()
    return result


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="acp-bench-lag-") as tmp:
        if args.backend == "sqlite":
            return await measure(args, Path(tmp), f"sqlite:///{Path(tmp) / 'lag.db'}")
        name = f"acp_bench_lag_{os.getpid()}"
        await admin(f'CREATE DATABASE "{name}"')
        try:
            return await measure(args, Path(tmp), f"{PG_ADMIN.rsplit('/', 1)[0]}/{name}")
        finally:
            await admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def measure(args: argparse.Namespace, folder: Path, url: str) -> dict[str, Any]:
    now = datetime.now(UTC)
    t0 = time.perf_counter()
    if args.backend == "sqlite" and args.keep_store is not None:
        big_sid = await kept_sqlite(args.keep_store.resolve(), Path(url.removeprefix("sqlite:///")),
                                    args.events, args.big_session, now)  # fmt: skip
    elif args.backend == "sqlite":
        big_sid = await seed_sqlite(Path(url.removeprefix("sqlite:///")), args.events,
                                    args.big_session, now)  # fmt: skip
    else:
        big_sid = await seed_postgres(url, args.events, args.big_session, now)
    seed_s = time.perf_counter() - t0
    stored, in_big = await count_events(url, big_sid)
    os.environ.setdefault(SECRET_ENV, "bench-secret")
    config = load_config(None, db=url, state_dir=folder, env={})
    store = await open_store(config.db_url, SystemClock())
    switch = HostSwitchFile(host_switch_path(config.state_dir), load_secret(os.environ, None))
    approvals = Approvals(store, config.approvals, FLEET)
    gate = Gate(store=store, fleet=FLEET, policy=config.policy, approvals=approvals,
                host_switch=switch, token_budgets=config.token_budgets, models=config.models,
                timezone=config.timezone)  # fmt: skip
    keeper = SwitchKeeper(
        store=store, gate=gate, host_switch=switch, clock=store.clock, fleet=FLEET,
        alerts=Alerts(store, fleet=FLEET, config=config.alerts, clock=store.clock),
        host_id=HOST, state_dir=config.state_dir,
        watch_interval=config.killswitch_watch_interval, store_poll=config.killswitch_store_poll,
    )  # fmt: skip
    loop = Loop(store, config, keeper, gate, args.waiters)
    tracked = len(gc.get_objects())  # what a full collection walks, untuned
    if not args.no_gc_tune:
        gctune.settle()  # as the daemon does once started, before its tasks run
    if args.gc_probe:
        loop.probe = GcProbe()
        gc.callbacks.append(loop.probe)

    async def scorecard() -> None:
        await compute(store, FLEET)

    async def replay() -> None:
        after = 0
        while True:
            page = await store.replay(big_sid, after, PAGE)
            if not page:
                return
            after = page[-1].seq

    async def scan() -> None:
        # the daemon's scheduled scan (Daemon._recovery_duty)
        clock_now = store.clock.now()
        await recovery.scan(store, fleet=FLEET, approvals=approvals, host_switch=switch,
                            by=HOST, started_before=clock_now - timedelta(minutes=10),
                            host=HOST, approvals_due=False,
                            live_after=clock_now - timedelta(seconds=HISTORY.LEASE_TTL),
                            owner="bench-owner", in_flight=())  # fmt: skip

    phases: dict[str, Phase] = {}
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(loop.keeper.watch_host)
            tg.start_soon(ticker, loop)
            await anyio.sleep(0.2)
            for _ in range(args.rounds):
                for name, work in (("baseline", None), ("scorecard", scorecard),
                                   ("events replay", replay), ("recovery scan", scan)):  # fmt: skip
                    measured = await phase(loop, name, work)
                    if name in phases:
                        phases[name].merge(measured)
                    else:
                        phases[name] = measured
            loop.stop = True
            tg.cancel_scope.cancel()
    finally:
        if loop.probe is not None:
            gc.callbacks.remove(loop.probe)
        await store.close()
    heavy = [p for p in phases.values() if p.name != "baseline"]
    return {
        "backend": args.backend,
        "events": stored,
        "big_session_events": in_big,
        "seed_s": round(seed_s, 1),
        "gc_tuned": not args.no_gc_tune,
        "gc_tracked_objects": tracked,
        "tick_ms": TICK * 1000,
        "idle_workers": args.waiters,
        "rounds": args.rounds,
        "watch_interval_ms": round(config.killswitch_watch_interval * 1000, 1),
        "phases": [p.summary() for p in phases.values()],
        "worst_lag_ms": round(max(max(p.lags_ms, default=0.0) for p in heavy), 1),
        "worst_engage_to_wake_ms": round(max(p.wake_ms for p in heavy), 1),
    }


def render(r: dict[str, Any]) -> str:
    lines = [
        f"loop lag, {r['backend']}: {r['events']:,} events "
        f"({r['big_session_events']:,} in the replayed session), "
        f"seeded in {r['seed_s']} s; ticker every {r['tick_ms']:g} ms, {r['idle_workers']} idle "
        f"workers, switch watched every {r['watch_interval_ms']:g} ms, {r['rounds']} round(s), "
        f"gc {'tuned' if r['gc_tuned'] else 'defaults'} ({r['gc_tracked_objects']:,} objects "
        "tracked at the start)",
        f"{'phase':<14} {'passes':>6} {'pass ms':>9} {'worst lag ms':>12} {'p99 lag ms':>10} "
        f"{'engage in pass':>14} {'engage->wake ms':>15} {'call->wake ms':>13}",
    ]
    for p in r["phases"]:
        pass_ms = "-" if p["pass_ms_median"] is None else f"{p['pass_ms_median']:.1f}"
        during = "-" if p["name"] == "baseline" else ("yes" if p["engaged_during_pass"] else "no")
        lines.append(
            f"{p['name']:<14} {p['passes']:>6} {pass_ms:>9} {p['worst_lag_ms']:>12.1f} "
            f"{p['p99_lag_ms']:>10.1f} {during:>14} {p['engage_to_wake_ms']:>15.1f} "
            f"{p['call_to_wake_ms']:>13.1f}"
        )
    for p in r["phases"]:
        if "gc" in p:
            where = {None: "", True: ", on the loop", False: ", in a thread"}
            lines.append(f"gc in {p['name']:<14} " + "  ".join(
                f"{gen}: {g['n']} (max {g['max_ms']:.1f} ms{where[g['max_on_loop']]})"
                for gen, g in p["gc"].items()))  # fmt: skip
    lines.append(
        f"worst lag {r['worst_lag_ms']:.1f} ms (aim: at most 50), worst engage-to-wake "
        f"{r['worst_engage_to_wake_ms']:.1f} ms (aim: at most 100)"
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="events in the store")
    parser.add_argument("--big-session", type=int, default=100_000,
                        help="of which in the session that is replayed")  # fmt: skip
    parser.add_argument("--waiters", type=int, default=10, help="idle workers")
    parser.add_argument("--rounds", type=int, default=3, help="times each phase runs")
    parser.add_argument("--backend", choices=["sqlite", "postgres"], default="sqlite",
                        help="the store (postgres: a temporary database at ACP_TEST_PG)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="one round (about a minute)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--keep-store", type=Path, metavar="FILE",
                        help="SQLite: seed FILE once, start each run from a copy of it")  # fmt: skip
    parser.add_argument("--gc-probe", action="store_true",
                        help="time every garbage collection, per phase and generation")  # fmt: skip
    parser.add_argument("--no-gc-tune", action="store_true",
                        help="leave the collector as the interpreter sets it (for comparison)")  # fmt: skip
    args = parser.parse_args()
    if args.keep_store is not None and args.backend != "sqlite":
        parser.error("--keep-store is for the SQLite backend")
    if args.quick:
        args.rounds = 1
    if args.events < 10_000 or not 0 < args.big_session < args.events:
        parser.error("--events must be >= 10000 and --big-session between 1 and --events")
    if args.waiters < 1 or args.rounds < 1:
        parser.error("--waiters and --rounds must be >= 1")
    configure(level="error", stream=sys.stderr, json=True)
    result = anyio.run(run, args)
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
