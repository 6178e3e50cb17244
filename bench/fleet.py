"""Fleet throughput: N in-process workers on one daemon, every action through the full gate,
beside the raw single-row commit rate of the same database measured in the same run.

    .venv/bin/python bench/fleet.py [--seconds 10] [--sizes 1,50,1000] [--cadence 0]
                                    [--synchronous full|normal] [--backend sqlite|postgres]
                                    [--raw-seconds 4] [--history-events N] [--json]

For each fleet size, in a child process of its own (so memory figures do not mix):

1. raw commits (first half of `--raw-seconds`): a loop of single-row INSERT+COMMIT transactions,
   nothing else, on the same kind of database as the daemon's. SQLite: one connection to a
   separate file in the daemon's directory, WAL, the same `synchronous` (one writer at a time is
   all SQLite allows, so one connection whatever the fleet size). Postgres: asyncpg, one loop per
   connection over as many connections as there are workers (at most `--raw-connections`), each
   transaction BEGIN, INSERT, COMMIT, into a table of the daemon's own temporary database.
2. the gate (`--seconds`): one Daemon in continuous mode on the real SystemClock and that store
   (SQLite: a temporary file with the store's own settings; Postgres: a temporary database at
   ACP_TEST_PG) runs N replicas of a worker whose every cycle dispatches one no-op, low-risk action
   through the whole gate: kill switch, idempotency, policy, approval (auto-allowed), budget, the
   durable started record, the last look at the switch, the (empty) effect, the outcome record;
   a checkpoint every `--checkpoint-every` cycles. Budgets are far above what the run can spend.
   `--cadence 0` (the default) means no cadence: the horizon's cycle_every is set to 1 us, so the
   next slot is always due and each worker dispatches back to back; the figures are then the
   gate's capacity. A real cadence (`--cadence 10ms`) caps each worker at 1/cadence actions/s.
3. raw commits again (second half): the load of the machine moves during a run; the raw rate is
   the mean of both halves (both are in the JSON).

`--history-events N` (SQLite): the daemon's database holds N events of another fleet's history
before it starts (windows, actions, ledger rows: bench/loop_lag.py's seeding, one bulk
transaction, synced to disk and not measured), so the figures show the gate on a large store
beside an empty one.

Printed per fleet size, over the measured window after every worker is running:

- actions/s: dispatches that returned per second (the effect ran and its outcome is recorded);
- raw commits/s and ratio: the raw loop's commits per second and actions/s divided by it (each
  governed action makes two or more commits, so the gate's ceiling today is under 1);
- admit p50/p99: `Gate.stats.latencies`, from the gate's first check to the moment the effect may
  run (what an action waits before its side effect, queueing for the store included);
- dispatch p50/p99: the whole `ctx.dispatch` round trip seen by the worker, outcome record
  included;
- CPU: the child process's user+system time over the window, in % of one core and per action;
- RSS: the daemon process's resident set at the end of the window (VmRSS) and its peak.

Numbers depend on the machine, its load and its disk; the ratio to the raw rate of the same run
is what carries from one machine to another. `--synchronous normal` (WAL without a sync per
commit: a power loss may lose the last commits, never corrupt) shows what the gate costs in CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import anyio  # noqa: E402

from supervisor.actions import Action  # noqa: E402
from supervisor.runtime.worker import CycleContext, Worker  # noqa: E402

# Filled by the workers of this process while `RECORDING` is true (one child = one fleet).
DISPATCH_LATENCIES: list[float] = []
RECORDING = False


class NoopWorker(Worker):
    """One no-op, low-risk action per cycle through the whole gate."""

    async def cycle(self, ctx: CycleContext) -> None:
        async def effect() -> None:
            return None

        t0 = time.perf_counter()
        await ctx.dispatch(Action(name="bench.noop", risk="low"), effect)
        if RECORDING:
            DISPATCH_LATENCIES.append(time.perf_counter() - t0)


CONFIG = """
[daemon]
fleet = "gate"  # not "bench": --history-events seeds that fleet's history
profile = "hour"
shutdown_timeout = "10s"
flush_every = "1s"

[killswitch]
watch_interval = "50ms"

[policy]
unmatched = "allow"

[horizons.hour]
cycle_every = "{cycle_every}"
checkpoint_every = {checkpoint_every}
max_actions = 1000000000
max_cost = 1000000000000.0

[[workers]]
name = "noop"
class = "{target}"
replicas = {workers}
cycle_deadline = "120s"
"""


def rss_kib() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return peak_rss_kib()


def peak_rss_kib() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak // 1024) if sys.platform == "darwin" else int(peak)  # bytes on macOS


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=1000, method="inclusive")[int(q * 1000) - 1]


PG_ADMIN = os.environ.get("ACP_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


async def _pg(sql: str, url: str = PG_ADMIN) -> list[Any]:
    import asyncpg

    conn = await asyncpg.connect(url, timeout=10)
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()


# `--cadence 0`: the smallest cadence the config accepts (durations must be positive), so each
# worker's next slot is already due when its cycle ends and it dispatches back to back.
NO_CADENCE = "0.001ms"
RAW_NOTE = "x" * 64  # about the size of a started record's payload


def no_cadence(value: str) -> bool:
    return re.fullmatch(r"\s*0*\.?0*\s*(ms|s)?\s*", value) is not None and "0" in value


def sqlite_raw_rate(path: Path, synchronous: str, seconds: float) -> tuple[float, int]:
    """Single-row INSERT+COMMIT transactions back to back on one connection: (commits/s, n)."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={synchronous}")
        conn.execute("CREATE TABLE IF NOT EXISTS raw_commits "
                     "(id INTEGER PRIMARY KEY, at REAL NOT NULL, note TEXT NOT NULL)")  # fmt: skip
        n = 0
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while time.perf_counter() < deadline:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                "INSERT INTO raw_commits (at, note) VALUES (?, ?)", (time.time(), RAW_NOTE)
            )
            conn.execute("COMMIT")
            n += 1
        return n / (time.perf_counter() - t0), n
    finally:
        conn.close()


async def pg_raw_rate(url: str, connections: int, seconds: float) -> tuple[float, int]:
    """Single-row INSERT transactions, one loop per asyncpg connection: (commits/s, n)."""
    import asyncpg

    conns = [await asyncpg.connect(url, timeout=10) for _ in range(connections)]
    try:
        await conns[0].execute("CREATE TABLE IF NOT EXISTS raw_commits "
                               "(id bigserial PRIMARY KEY, at double precision NOT NULL, "
                               "note text NOT NULL)")  # fmt: skip
        n = 0
        t0 = time.perf_counter()
        deadline = t0 + seconds

        async def loop(conn: Any) -> None:
            nonlocal n
            while time.perf_counter() < deadline:
                async with conn.transaction():
                    await conn.execute("INSERT INTO raw_commits (at, note) VALUES ($1, $2)",
                                       time.time(), RAW_NOTE)  # fmt: skip
                n += 1

        async with anyio.create_task_group() as tg:
            for conn in conns:
                tg.start_soon(loop, conn)
        return n / (time.perf_counter() - t0), n
    finally:
        for conn in conns:
            await conn.close()


async def measure(
    workers: int, seconds: float, cycle_every: str, checkpoint_every: int, synchronous: str,
    backend: str = "sqlite", raw_seconds: float = 4.0, raw_connections: int = 50,
    history_events: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """One daemon with `workers` replicas, measured for `seconds` once they all run, between two
    halves of the raw commit loop on the same kind of database."""
    global RECORDING
    from supervisor.config import load_config
    from supervisor.runtime.daemon import Daemon

    with tempfile.TemporaryDirectory(prefix="acp-bench-fleet-") as tmp:
        folder = Path(tmp)
        path = folder / "bench.toml"
        text = CONFIG.format(
            cycle_every=NO_CADENCE if no_cadence(cycle_every) else cycle_every,
            checkpoint_every=checkpoint_every,
            target=f"{__name__}:NoopWorker",
            workers=workers,
        )
        path.write_text(text)
        db = f"sqlite:///{folder / 'bench.db'}?synchronous={synchronous}"
        pg_name = f"acp_bench_fleet_{os.getpid()}"
        if backend == "postgres":
            from supervisor.store import open_store
            from supervisor.timing.clock import SystemClock

            await _pg(f'CREATE DATABASE "{pg_name}"')
            db = f"{PG_ADMIN.rsplit('/', 1)[0]}/{pg_name}"
            await (await open_store(db, SystemClock(), migrate=True)).close()
        pg_conns = max(1, min(workers, raw_connections))

        async def raw(span: float) -> tuple[float, int]:
            if backend == "postgres":
                return await pg_raw_rate(db, pg_conns, span)
            return sqlite_raw_rate(folder / "raw.db", synchronous, span)

        if history_events:
            lag = _bench_module("loop_lag")
            await lag.seed_sqlite(folder / "bench.db", history_events, 0, datetime.now(UTC))
        raw_before = await raw(raw_seconds / 2)
        config = load_config(path, env={}, db=db, state_dir=folder)
        daemon = Daemon(config, env={}, install_signals=False)
        rss_before = rss_kib()
        result: dict[str, Any] = {}
        async with anyio.create_task_group() as tg:
            tg.start_soon(daemon.run)
            t_start = time.perf_counter()
            # warm-up: every worker running and one action through the gate
            while True:
                await anyio.sleep(0.02)
                fleet = getattr(daemon, "fleet", None)
                gate = getattr(daemon, "gate", None)
                if fleet is None or gate is None or len(fleet.status) < workers:
                    continue
                if all(s.state == "running" for s in fleet.status.values()) and gate.stats.admitted:
                    break
                if time.perf_counter() - t_start > 120:
                    raise SystemExit(f"{workers} workers did not all start within 120 s")
            startup = time.perf_counter() - t_start
            # What the daemon's own process does once it is ready (install_signals is off here,
            # so the daemon leaves it to its host process).
            from supervisor.ops import gctune

            gctune.settle()
            gate.stats.latencies = []
            DISPATCH_LATENCIES.clear()
            RECORDING = True
            refused0 = gate.stats.refused
            cpu0 = cpu_seconds()
            t0 = time.perf_counter()
            await anyio.sleep(seconds)
            RECORDING = False
            elapsed = time.perf_counter() - t0
            cpu = cpu_seconds() - cpu0
            admit = list(gate.stats.latencies)
            dispatch = list(DISPATCH_LATENCIES)
            gate.stats.latencies = None
            result = {
                "workers": workers,
                "seconds": round(elapsed, 3),
                "actions": len(dispatch),
                "actions_per_s": round(len(dispatch) / elapsed, 1),
                "refused": gate.stats.refused - refused0,
                "cpu_pct": round(100 * cpu / elapsed, 1),
                "cpu_ms_per_action": round(1000 * cpu / max(len(dispatch), 1), 3),
                "admit_p50_ms": round(percentile(admit, 0.50) * 1000, 3),
                "admit_p99_ms": round(percentile(admit, 0.99) * 1000, 3),
                "dispatch_p50_ms": round(percentile(dispatch, 0.50) * 1000, 3),
                "dispatch_p99_ms": round(percentile(dispatch, 0.99) * 1000, 3),
                "rss_mib": round(rss_kib() / 1024, 1),
                "rss_growth_mib": round((rss_kib() - rss_before) / 1024, 1),
                "peak_rss_mib": round(max(peak_rss_kib(), rss_kib()) / 1024, 1),
                "startup_s": round(startup, 3),
                "crashes": sum(s.crashes for s in fleet.status.values()),
            }
            t_stop = time.perf_counter()
            daemon.clock.ring(daemon.stopping)
        result["shutdown_s"] = round(time.perf_counter() - t_stop, 3)
        raw_after = await raw(raw_seconds / 2)
        raw_rate = (raw_before[1] + raw_after[1]) / (raw_seconds or 1.0)
        result.update(
            raw_commits_per_s=round(raw_rate, 1),
            raw_before_per_s=round(raw_before[0], 1),
            raw_after_per_s=round(raw_after[0], 1),
            raw_connections=pg_conns if backend == "postgres" else 1,
            ratio_to_raw=round(result["actions_per_s"] / raw_rate, 4) if raw_rate else None,
        )
        # cross-check: every action the workers saw succeed has its outcome in the store
        query = "SELECT status, count(*) FROM actions WHERE fleet = 'gate' GROUP BY status"
        if backend == "postgres":
            stored = {r[0]: r[1] for r in await _pg(query, db)}
            await _pg(f'DROP DATABASE IF EXISTS "{pg_name}" WITH (FORCE)')
        else:
            conn = sqlite3.connect(folder / "bench.db")
            try:
                stored = dict(conn.execute(query))
            finally:
                conn.close()
        result["stored_outcomes"] = stored
        result["backend"] = backend
        result["history_events"] = history_events
        return result


def _bench_module(name: str) -> Any:
    """Another benchmark's module (its seeding), loaded from this folder."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def child(args: argparse.Namespace) -> int:
    from supervisor.logging import configure

    configure(level="error", stream=sys.stderr, json=True)
    result = anyio.run(measure, args.only, args.seconds, args.cadence, args.checkpoint_every,
                       args.synchronous, args.backend, args.raw_seconds,
                       args.raw_connections, args.history_events)  # fmt: skip
    print(json.dumps(result))
    return 0


COLUMNS = [
    ("workers", "workers", "{:>7}"),
    ("actions/s", "actions_per_s", "{:>9.1f}"),
    ("raw commits/s", "raw_commits_per_s", "{:>13.1f}"),
    ("ratio", "ratio_to_raw", "{:>6.3f}"),
    ("raw conns", "raw_connections", "{:>9}"),
    ("admit p50 ms", "admit_p50_ms", "{:>12.3f}"),
    ("admit p99 ms", "admit_p99_ms", "{:>12.3f}"),
    ("dispatch p50 ms", "dispatch_p50_ms", "{:>15.3f}"),
    ("dispatch p99 ms", "dispatch_p99_ms", "{:>15.3f}"),
    ("CPU %", "cpu_pct", "{:>5.0f}"),
    ("CPU ms/action", "cpu_ms_per_action", "{:>13.2f}"),
    ("RSS MiB", "rss_mib", "{:>7.1f}"),
    ("startup s", "startup_s", "{:>9.2f}"),
    ("stop s", "shutdown_s", "{:>6.2f}"),
]


def store_label(args: argparse.Namespace) -> str:
    if args.backend == "sqlite":
        return f"SQLite synchronous={args.synchronous}"
    return "Postgres (synchronous_commit as the server has it)"


def render(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    cadence = "none (back to back)" if no_cadence(args.cadence) else args.cadence
    lines = [
        f"fleet bench: {args.seconds:g} s per fleet size, cadence {cadence}, "
        + store_label(args)
        + ", no-op low-risk actions through the full gate",
        "raw commits/s: single-row INSERT+COMMIT loop on the same kind of database in the same "
        "run; ratio = actions/s / raw commits/s",
        "  ".join(f"{title:>{len(fmt.format(0))}}" for title, _, fmt in COLUMNS),
    ]
    lines += ["  ".join(fmt.format(row[key]) for _, key, fmt in COLUMNS) for row in rows]
    base = rows[0]
    for row in rows[1:]:
        extra_mib = row["rss_mib"] - base["rss_mib"]
        per_worker_kib = extra_mib * 1024 / max(row["workers"] - base["workers"], 1)
        throughput = row["actions_per_s"] / max(base["actions_per_s"], 1e-9)
        latency = row["dispatch_p50_ms"] / max(base["dispatch_p50_ms"], 1e-9)
        lines.append(
            f"{row['workers']} workers vs {base['workers']}: throughput x{throughput:.2f}, "
            f"dispatch p50 x{latency:.1f}, RSS +{extra_mib:.1f} MiB "
            f"({per_worker_kib:.1f} KiB per extra worker)"
        )
    trouble = [r for r in rows if r["refused"] or r["crashes"]]
    if trouble:
        lines.append(
            "WARNING: refusals or crashes during the run: "
            + ", ".join(
                f"{r['workers']}w refused {r['refused']} crashes {r['crashes']}" for r in trouble
            )
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time per fleet size")
    parser.add_argument("--sizes", default="1,50,1000", help="fleet sizes, comma-separated")
    parser.add_argument("--cadence", "--cycle-every", dest="cadence", default="0",
                        help="the horizon's cycle cadence; 0 (default): none, back to back")  # fmt: skip
    parser.add_argument("--raw-seconds", type=float, default=4.0,
                        help="raw commit loop time per fleet size, half before, half after")  # fmt: skip
    parser.add_argument("--raw-connections", type=int, default=50,
                        help="Postgres: at most this many connections for the raw loop")  # fmt: skip
    parser.add_argument("--checkpoint-every", type=int, default=100, help="cycles per checkpoint")
    parser.add_argument(
        "--synchronous",
        choices=["full", "normal"],
        default="full",
        help="SQLite durability (full: the store's default)",
    )
    parser.add_argument("--backend", choices=["sqlite", "postgres"], default="sqlite",
                        help="the store (postgres: a temporary database at ACP_TEST_PG)")  # fmt: skip
    parser.add_argument("--history-events", type=int, default=0, metavar="N",
                        help="SQLite: N events of history in the store before the daemon starts")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--only", type=int, help=argparse.SUPPRESS)  # one size, in this process
    args = parser.parse_args()
    if args.seconds <= 0:
        parser.error("--seconds must be > 0")
    if args.raw_seconds <= 0:
        parser.error("--raw-seconds must be > 0")
    if args.raw_connections < 1:
        parser.error("--raw-connections must be >= 1")
    if args.history_events < 0 or (args.history_events and args.backend != "sqlite"):
        parser.error("--history-events takes a count >= 0, for the SQLite backend")
    if args.only is not None:
        return child(args)

    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    rows = []
    for n in sizes:
        argv = [sys.executable, str(Path(__file__).resolve()), "--only", str(n),
                "--seconds", str(args.seconds), "--cadence", args.cadence,
                "--raw-seconds", str(args.raw_seconds),
                "--raw-connections", str(args.raw_connections),
                "--checkpoint-every", str(args.checkpoint_every),
                "--synchronous", args.synchronous, "--backend", args.backend,
                "--history-events", str(args.history_events)]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("ACP_")}
        env.pop("NOTIFY_SOCKET", None)
        done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT)
        if done.returncode != 0:
            print(f"fleet size {n} failed (exit {done.returncode}):\n{done.stderr[-4000:]}",
                  file=sys.stderr)  # fmt: skip
            return 1
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    for row in rows:  # throughput beside the first (smallest) fleet's
        row["x_first"] = round(row["actions_per_s"] / max(rows[0]["actions_per_s"], 1e-9), 2)
    if args.json:
        print(json.dumps({"seconds": args.seconds, "cadence": args.cadence,
                          "store": f"sqlite synchronous={args.synchronous}" if args.backend == "sqlite"
                          else "postgres (synchronous_commit=on)",
                          "results": rows}, indent=2))  # fmt: skip
    else:
        print(render(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
