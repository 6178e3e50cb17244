"""Recovery scan at scale: the startup scan on a store with a long history, beside an empty one.

    python bench/recovery.py [--events N] [--runs 5] [--json] [--sqlite-only] [--pg ADMIN_URL]

For each backend a store is filled with N events (default 1,000,000) and the history that goes
with them: hourly windows (all closed but the current one and two a crash left open), actions
(mostly finished; a few started with no outcome, a few already in doubt), the command ledger, and
approvals (mostly decided; a few pending: some past their deadline, some due to escalate, some not
yet due). Seeding goes straight to the tables through the driver (executemany on SQLite, COPY on
Postgres), not through the Store API: it is setup, not what is measured.

Measured: `recovery.scan(...)` as the daemon calls it at startup, on a freshly opened store over a
fresh copy of the seeded database (a file copy on SQLite, CREATE DATABASE ... TEMPLATE on
Postgres), so every run repairs the same crash leftovers; the median of --runs runs. The same on an
empty (migrated) store gives the baseline. The goal: under one second at 1M events on each backend,
and a ratio near 1 (the scan's cost must not grow with history).

Also printed: the query plan (EXPLAIN QUERY PLAN / EXPLAIN, the latter under
plan_cache_mode=force_generic_plan, what a long-lived daemon's prepared statements end up with)
of every query the scan runs, and whether it reads through an index.

SQLite runs in a temporary directory; Postgres in temporary databases created on the server at
--pg (default $ACP_BENCH_PG, else $ACP_TEST_PG, else postgresql://postgres@127.0.0.1:5432/postgres)
and dropped afterwards. An unreachable Postgres is an error (exit 1) unless --sqlite-only.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio

from supervisor.actions import canonical_json, derive_id, params_hash
from supervisor.errors import SupervisorError
from supervisor.governance.approvals import Approvals
from supervisor.governance.escalation import EscalationChain, EscalationStep
from supervisor.killswitch import HostSwitchFile
from supervisor.logging import configure
from supervisor.runtime import recovery
from supervisor.store import open_store, system_stream
from supervisor.store.queries import load_queries
from supervisor.timing.clock import SystemClock

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
FLEET = "bench"
HOST = "bench-host"  # this host: its previous incarnation crashed
OTHER = "bench-other"  # a live host: its in-flight actions are its own, not orphans
CHAIN = EscalationChain(timeout=3600.0, initial_tier="operators",
                        steps=(EscalationStep(900.0, "oncall"),))  # fmt: skip
LEASE_TTL = 15.0
# Crash leftovers every run must repair
ORPHANS = 20  # started, no outcome, on this host
OTHER_IN_FLIGHT = 3  # started on the live host: left alone
IN_DOUBT = 5  # already in doubt from an earlier crash
OVERDUE_WINDOWS = 2  # past their end, still open
PENDING_EXPIRED = 10  # past their deadline
PENDING_ESCALATE = 10  # past the first step
PENDING_WAITING = 10  # nothing due yet
CRASH_ONLY = 1000  # the baseline with the same leftovers and (almost) no history
BIG_TABLES = ("events", "actions", "commands", "approvals", "sessions", "streams")


class BenchError(Exception):
    """A clear, one-line reason to stop."""


# --- the history --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    events: int
    sessions: int
    actions_per_session: int
    approvals: int

    @classmethod
    def of(cls, events: int) -> Shape:
        sessions = max(24, events // 120)  # ~120 events per hourly window: ~1 year at 1M
        per = events // sessions
        return cls(events, sessions, max(1, per // 4), max(60, events // 100))


@dataclass
class Tables:
    """Rows per table, in insertion order; values are Python (datetime, bool) until encoded."""

    columns: dict[str, tuple[str, ...]] = field(default_factory=dict)
    rows: dict[str, Any] = field(default_factory=dict)  # table -> iterable of tuples
    counts: dict[str, int] = field(default_factory=dict)


COLUMNS: dict[str, tuple[str, ...]] = {
    "sessions": ("id", "fleet", "window_key", "starts_at", "ends_at", "status", "max_cost",
                 "max_actions", "used_cost", "used_actions", "reserved_cost", "reserved_actions",
                 "opened_by", "opened_at", "closed_by", "closed_at"),
    "streams": ("id", "last_seq"),
    "events": ("session_id", "seq", "kind", "reason", "payload", "state_bearing", "command_id",
               "correlation_id", "worker", "agent_id", "created_at"),
    "commands": ("command_id", "operation", "params_hash", "result", "created_at"),
    "actions": ("command_id", "fleet", "session_id", "worker", "name", "params", "risk", "cost",
                "critical", "safe_to_retry", "status", "rule", "started_at", "finished_at",
                "result", "error", "resolved_by", "host"),
    "approvals": ("id", "idempotency_key", "fleet", "session_id", "worker", "agent_id", "action",
                  "params", "params_hash", "risk", "cost", "status", "tier", "created_at",
                  "deadline", "next_check_at", "decided_by", "decided_at", "reason", "scope",
                  "max_uses", "max_cost", "used_count", "used_cost"),
    "hosts": ("fleet", "host_id", "instance", "pid", "started_at", "heartbeat_at", "status"),
}  # fmt: skip

STARTED = canonical_json({"action": "support.resolve_case", "cost": 0.05, "risk": "low",
                          "rule": "risk:low"})  # fmt: skip
SUCCEEDED = canonical_json({"error": None, "status": "succeeded"})
FAILED = canonical_json({"error": "TimeoutError: upstream", "status": "failed"})


def _sid(i: int) -> str:
    return derive_id("session", FLEET, str(i))


def _cid(i: int, j: int) -> str:
    return derive_id("bench-action", str(i), str(j))


def history(shape: Shape, now: datetime) -> tuple[dict[str, list[tuple[Any, ...]]], dict[str, Any]]:
    """Every table's rows except events (streamed by `events`), and what the scan must find."""
    current = now.replace(minute=0, second=0, microsecond=0)
    first = current - timedelta(hours=shape.sessions)
    per = shape.actions_per_session
    tables: dict[str, list[tuple[Any, ...]]] = {t: [] for t in COLUMNS if t != "events"}
    expect: dict[str, Any] = {"windows": [], "orphans": []}
    orphan_sessions = list(range(shape.sessions - OVERDUE_WINDOWS, shape.sessions))
    for i in range(shape.sessions + 1):  # the last one is the current window
        start = first + timedelta(hours=i)
        end = start + timedelta(hours=1)
        sid = _sid(i)
        overdue = i in orphan_sessions
        is_open = overdue or i == shape.sessions
        n_actions = per if i < shape.sessions else 0
        orphans_here = ORPHANS // OVERDUE_WINDOWS if overdue else 0
        done = n_actions - orphans_here
        tables["sessions"].append((
            sid, FLEET, start.isoformat(), start, end, "open" if is_open else "closed", 50.0, 500,
            round(0.05 * done, 2), done, round(0.05 * orphans_here, 2), orphans_here, HOST, start,
            None if is_open else HOST, None if is_open else end,
        ))  # fmt: skip
        if overdue:
            expect["windows"].append(start.isoformat())
        for wc in ("window.open", "window.close") if not is_open else ("window.open",):
            tables["commands"].append((derive_id(wc, sid), wc, params_hash(wc, {"s": sid}),
                                       canonical_json({"session_id": sid}), start))  # fmt: skip
        for j in range(n_actions):
            cid = _cid(i, j)
            at = start + timedelta(seconds=(j * 3600) // max(1, n_actions))
            orphan = j >= done
            in_doubt = not orphan and i < IN_DOUBT and j == 0
            status = ("started" if orphan else "in_doubt" if in_doubt else
                      "succeeded" if j % 10 else "failed")  # fmt: skip
            params = canonical_json({"case": f"{i}-{j}", "risk": "low"})
            finished = (
                None if status in ("started", "in_doubt") else at + timedelta(milliseconds=40)
            )
            tables["actions"].append((
                cid, FLEET, sid, f"support-{j % 10}", "support.resolve_case", params, "low", 0.05,
                False, False, status, "risk:low", at, finished,
                canonical_json({"ok": True}) if status == "succeeded" else None,
                "TimeoutError: upstream" if status == "failed" else None, None, HOST,
            ))  # fmt: skip
            result = {"status": status, "result": None, "error": None}
            tables["commands"].append((cid, "action:support.resolve_case",
                                       params_hash("action:support.resolve_case", params),
                                       canonical_json(result), at))  # fmt: skip
            if orphan:
                expect["orphans"].append(cid)
    # in flight on a live host, in the current window: not orphans
    for j in range(OTHER_IN_FLIGHT):
        cid = derive_id("bench-other", str(j))
        tables["actions"].append((
            cid, FLEET, _sid(shape.sessions), "support-x", "support.resolve_case", "{}", "low",
            0.05, False, False, "started", "risk:low", now - timedelta(seconds=1), None, None,
            None, None, OTHER,
        ))  # fmt: skip
    # approvals: mostly decided long ago; a few pending
    for k in range(shape.approvals):
        i = (k * shape.sessions) // shape.approvals
        created = first + timedelta(hours=i, minutes=5)
        status = ("approved", "denied", "expired")[k % 3]
        tables["approvals"].append(_approval(f"old-{k}", _sid(i), created, status))
    # past the deadline; past the first step; created now (its first step is 15 min away, so
    # it is not due during the bench)
    pending = [("expired", now - timedelta(hours=2)), ("escalate", now - timedelta(minutes=20)),
               ("waiting", now)]  # fmt: skip
    counts = {"expired": PENDING_EXPIRED, "escalate": PENDING_ESCALATE, "waiting": PENDING_WAITING}
    for label, created in pending:
        for k in range(counts[label]):
            tables["approvals"].append(
                _approval(f"pending-{label}-{k}", _sid(shape.sessions), created, "pending")
            )
    tables["streams"] = [(_sid(i), 0) for i in range(shape.sessions + 1)]  # seqs set by `events`
    tables["streams"].append((system_stream(FLEET), 0))
    tables["hosts"] = [
        (FLEET, HOST, "dead0000", 1, now - timedelta(hours=3), now - timedelta(minutes=1), "running"),
        # "live": heartbeat in the future, so it stays live however long the bench takes
        (FLEET, OTHER, "live0000", 2, now - timedelta(hours=3), now + timedelta(days=1), "running"),
    ]  # fmt: skip
    expect.update(expired=PENDING_EXPIRED, escalated=PENDING_ESCALATE)
    return tables, expect


def _approval(key: str, session: str, created: datetime, status: str) -> tuple[Any, ...]:
    params = canonical_json({"key": key})
    step = CHAIN.evaluate(created, created)
    decided = status != "pending"
    return (
        derive_id("approval", key), key, FLEET, session, "maintenance", None,
        "maintenance.rotate_keys", params, params_hash("maintenance.rotate_keys", params), "high",
        0.0, status, "operators", created, CHAIN.deadline(created),
        None if decided else step.next_at, "op" if decided else None,
        created + timedelta(minutes=3) if decided else None, None, "once", None, None, 0, 0.0,
    )  # fmt: skip


def events(shape: Shape, tables: dict[str, list[tuple[Any, ...]]]) -> Iterator[tuple[Any, ...]]:
    """Exactly shape.events events, per window in seq order; fills in the streams' last_seq."""
    actions_by_session: dict[str, list[tuple[Any, ...]]] = {}
    for row in tables["actions"]:
        actions_by_session.setdefault(row[2], []).append(row)
    windows = tables["sessions"]
    budget = shape.events
    last_seq: dict[str, int] = {}
    n_sessions = len(windows)
    for index, w in enumerate(windows):
        sid, start, end, status = w[0], w[3], w[4], w[5]
        share = budget // (n_sessions - index)  # what is left, spread over the windows left
        out: list[tuple[Any, ...]] = [("WINDOW_OPENED", None, "{}", None, None, start)]
        for a in actions_by_session.get(sid, []):
            cid, worker, astatus, at = a[0], a[3], a[10], a[12]
            out.append(("ACTION_STARTED", None, STARTED, cid, worker, at))
            if astatus == "succeeded":
                out.append(("ACTION_SUCCEEDED", None, SUCCEEDED, cid, worker, at))
            elif astatus == "failed":
                out.append(("ACTION_FAILED", None, FAILED, cid, worker, at))
            elif astatus == "in_doubt":
                out.append(("ACTION_IN_DOUBT", "in_doubt", "{}", cid, worker, at))
        closing = [("WINDOW_CLOSED", None, '{"status":"closed"}', None, None, end)]
        fill = max(0, share - len(out) - (1 if status == "closed" else 0))
        step = 3600 / max(1, fill)
        for n in range(fill):
            at = start + timedelta(seconds=n * step)
            if n % 5 == 4:
                out.append(("ACTION_DENIED", "policy", '{"action":"support.resolve_case"}',
                            derive_id("denied", sid, str(n)), f"support-{n % 10}", at))  # fmt: skip
            else:
                out.append(("CYCLE_COMPLETED", None, f'{{"cycle":{n}}}',
                            derive_id("cycle", sid, str(n)), f"support-{n % 10}", at))  # fmt: skip
        if status == "closed":
            out += closing
        out = out[: max(share, 1)]
        for seq, (kind, reason, payload, cid, worker, at) in enumerate(out, start=1):
            yield (sid, seq, kind, reason, payload, kind != "CYCLE_COMPLETED", cid, None, worker,
                   None, at)  # fmt: skip
        last_seq[sid] = len(out)
        budget -= len(out)
    tables["streams"] = [(sid, last_seq.get(sid, 0)) for sid, _ in tables["streams"]]


# --- seeding --------------------------------------------------------------------------------------


def _sqlite_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat(timespec="microseconds")
    if isinstance(value, bool):
        return int(value)
    return value


def _insert_sql(table: str, style: str) -> str:
    cols = COLUMNS[table]
    marks = ", ".join("?" if style == "qmark" else f"${n}" for n in range(1, len(cols) + 1))
    return f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({marks})"


async def seed_sqlite(path: Path, shape: Shape, now: datetime) -> dict[str, Any]:
    store = await open_store(f"sqlite:///{path}", SystemClock(), migrate=True)
    await store.close()
    tables, expect = history(shape, now)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("BEGIN")
        conn.executemany(_insert_sql("events", "qmark"),
                         (tuple(_sqlite_value(v) for v in r) for r in events(shape, tables)))  # fmt: skip
        for table, rows in tables.items():
            conn.executemany(_insert_sql(table, "qmark"),
                             (tuple(_sqlite_value(v) for v in r) for r in rows))  # fmt: skip
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return expect


async def seed_postgres(url: str, shape: Shape, now: datetime) -> dict[str, Any]:
    import asyncpg

    store = await open_store(url, SystemClock(), migrate=True)
    await store.close()
    tables, expect = history(shape, now)
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            await conn.copy_records_to_table("events", records=events(shape, tables),
                                             columns=list(COLUMNS["events"]))  # fmt: skip
            for table, rows in tables.items():
                await conn.copy_records_to_table(table, records=rows, columns=list(COLUMNS[table]))
        await conn.execute("ANALYZE")
    finally:
        await conn.close()
    return expect


# --- the measurement ------------------------------------------------------------------------------


async def scan_once(url: str, state: Path) -> tuple[float, recovery.RecoveryReport, float]:
    """Open the store, run the startup scan as the daemon does; (scan ms, report, open ms)."""
    t0 = time.perf_counter()
    store = await open_store(url, SystemClock())
    opened = (time.perf_counter() - t0) * 1000
    try:
        kwargs: dict[str, Any] = {
            "fleet": FLEET, "approvals": Approvals(store, CHAIN, FLEET),
            "host_switch": HostSwitchFile(state / "killswitch.json", b"bench-secret"),
            "by": HOST, "started_before": store.clock.now(),
        }  # fmt: skip
        accepted = inspect.signature(recovery.scan).parameters
        if "host" in accepted and "live_after" in accepted:  # several hosts: the daemon's call
            now = await store.db_now() if hasattr(store, "db_now") else store.clock.now()
            kwargs.update(host=HOST, live_after=now - timedelta(seconds=LEASE_TTL))
        t1 = time.perf_counter()
        report = await recovery.scan(store, **kwargs)
        took = (time.perf_counter() - t1) * 1000
    finally:
        await store.close()
    return took, report, opened


@dataclass
class Case:
    events: int
    runs_ms: list[float]
    open_ms: float
    repairs: dict[str, int]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.runs_ms)


@dataclass
class Result:
    backend: str
    events: int
    empty_ms: float
    crash_only_ms: float
    full_ms: float
    ratio: float  # full / empty, as asked; dominated by the repairs' commits
    history_ratio: float  # full / the same crash on a 1k-event history: the cost of history
    under_1s: bool
    repairs_ok: bool
    repairs: dict[str, int]
    runs_ms: list[float]
    seed_s: float
    plans: list[dict[str, Any]]
    all_indexed: bool


def _repairs(report: recovery.RecoveryReport) -> dict[str, int]:
    return {"windows_closed": report.windows_closed, "in_doubt": report.in_doubt,
            "approvals_expired": report.approvals_expired,
            "approvals_escalated": report.approvals_escalated}  # fmt: skip


def _check(expect: dict[str, Any], report: recovery.RecoveryReport) -> bool:
    return (sorted(report.found["windows"]) == sorted(expect["windows"])
            and sorted(report.found["actions"]) == sorted(expect["orphans"])
            and report.in_doubt == len(expect["orphans"])
            and report.windows_closed == len(expect["windows"])
            and report.approvals_expired == expect["expired"]
            and report.approvals_escalated == expect["escalated"])  # fmt: skip


# --- query plans ----------------------------------------------------------------------------------


def plan_args(now: datetime) -> list[tuple[str, tuple[Any, ...]]]:
    """Every query the startup scan runs (reads and the repairs' writes), with sample arguments."""
    live_after = now - timedelta(seconds=LEASE_TTL)
    queries = load_queries("sqlite")
    out: list[tuple[str, tuple[Any, ...]]] = [("overdue_sessions", (FLEET, now))]
    if "stale_started_actions" in queries:
        out.append(("stale_started_actions", (FLEET, HOST, live_after, 100_000)))
    if "unfinished_actions" in queries:
        out.append(("unfinished_actions", (FLEET, "started", 100_000)))
    else:
        out.append(("actions_with_status", (FLEET, "started", 100_000)))
    out += [
        ("due_approvals", (FLEET, now, 100_000)),
        ("next_approval_check", (FLEET,)),
        ("get_command", ("x",)),
        ("mark_in_doubt", ("x",)),
        ("release_budget", ("x", 0.05)),
        ("close_session", ("recovered", HOST, now, "x")),
        ("decide_approval", ("expired", "deadline", now, "r", "once", None, None, "x")),
        ("escalate_approval", ("oncall", now, "x")),
        ("stream_seq", ("x",)),
    ]
    return out


def _literal(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, datetime):
        value = value.isoformat()
    return "'" + str(value).replace("'", "''") + "'"


def _sqlite_verdict(lines: list[str]) -> bool:
    """Full scans of a table are `SCAN t` (or `SCAN t USING ... INDEX`, a whole index)."""
    return not any(ln.startswith("SCAN ") and "CONSTANT ROW" not in ln for ln in lines)


def sqlite_plans(path: Path, now: datetime) -> list[dict[str, Any]]:
    queries = load_queries("sqlite")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    out = []
    try:
        for name, args in plan_args(now):
            rows = conn.execute("EXPLAIN QUERY PLAN " + queries[name],
                                tuple(_sqlite_value(a) for a in args)).fetchall()  # fmt: skip
            lines = [str(r[3]) for r in rows]
            indexed = _sqlite_verdict(lines)
            out.append({"query": name, "indexed": indexed, "plan": lines,
                        "verdict": "index" if indexed else "FULL SCAN"})  # fmt: skip
    finally:
        conn.close()
    return out


async def postgres_plans(url: str, now: datetime) -> list[dict[str, Any]]:
    import asyncpg

    queries = load_queries("postgres")
    conn = await asyncpg.connect(url)
    out = []
    try:
        sizes = {t: int(await conn.fetchval(f"SELECT count(*) FROM {t}")) for t in BIG_TABLES}
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        for n, (name, args) in enumerate(plan_args(now)):
            # PREPARE + EXPLAIN EXECUTE: the generic plan, not one made for these values
            await conn.execute(f"PREPARE bench_q{n} AS {queries[name]}")
            literals = ", ".join(_literal(a) for a in args)
            rows = await conn.fetch(f"EXPLAIN EXECUTE bench_q{n}({literals})")
            lines = [str(r[0]).strip() for r in rows]
            seq = [ln for ln in lines if "Seq Scan on" in ln]
            # a sequential scan only matters on a table that grows with history
            bad = [ln for ln in seq if any(f"Seq Scan on {t}" in ln and sizes[t] > 10_000
                                           for t in BIG_TABLES)]  # fmt: skip
            verdict = "FULL SCAN" if bad else ("seq scan of a small table" if seq else "index")
            out.append({"query": name, "indexed": not bad, "plan": lines, "verdict": verdict})
    finally:
        await conn.close()
    return out


# --- the two backends -----------------------------------------------------------------------------


def _remove_db(path: Path) -> None:
    for name in (str(path), f"{path}-wal", f"{path}-shm"):
        Path(name).unlink(missing_ok=True)


async def bench_sqlite(events_n: int, runs: int, log: Any) -> Result:
    with tempfile.TemporaryDirectory(prefix="acp-bench-recovery-") as tmp:
        root = Path(tmp)
        state = root / "state"
        state.mkdir()
        cases: dict[int, Case] = {}
        expect: dict[str, Any] = {}
        seed_s = 0.0
        plans: list[dict[str, Any]] = []
        ok = False
        for n in (0, CRASH_ONLY, events_n):
            seed = root / f"seed-{n}.db"
            now = datetime.now(UTC)
            t0 = time.perf_counter()
            if n == 0:
                store = await open_store(f"sqlite:///{seed}", SystemClock(), migrate=True)
                await store.close()
            else:
                log(f"sqlite: seeding {n:,} events ...")
                expect = await seed_sqlite(seed, Shape.of(n), now)
                took_s = time.perf_counter() - t0
                seed_s = took_s if n == events_n else seed_s
                log(f"sqlite: seeded in {took_s:.1f}s ({seed.stat().st_size / 2**20:.0f} MiB)")
            samples, opens = [], []
            report = None
            for r in range(runs):
                copy = root / f"run-{n}-{r}.db"
                shutil.copyfile(seed, copy)
                took, report, opened = await scan_once(f"sqlite:///{copy}", state)
                samples.append(took)
                opens.append(opened)
                _remove_db(copy)
            assert report is not None
            cases[n] = Case(n, samples, statistics.median(opens), _repairs(report))
            if n:
                ok = _check(expect, report) and (ok or n == CRASH_ONLY)
            if n == events_n:
                plans = sqlite_plans(seed, now)
        return _result("sqlite", cases, events_n, seed_s, plans, ok)


async def bench_postgres(events_n: int, runs: int, admin_url: str, log: Any) -> Result:
    import asyncpg

    try:
        admin = await asyncpg.connect(admin_url, timeout=5)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise BenchError(
            f"PostgreSQL at {admin_url} is unreachable ({exc or type(exc).__name__}); "
            "start it, point --pg at it, or pass --sqlite-only"
        ) from exc
    base = admin_url.rpartition("/")[0]
    tag = uuid.uuid4().hex[:8]
    made: list[str] = []
    cases: dict[int, Case] = {}
    expect: dict[str, Any] = {}
    seed_s = 0.0
    plans: list[dict[str, Any]] = []
    ok = False
    try:
        with tempfile.TemporaryDirectory(prefix="acp-bench-recovery-") as tmp:
            state = Path(tmp)
            for n in (0, CRASH_ONLY, events_n):
                seed = f"acp_bench_rec_{tag}_{n}"
                await admin.execute(f'CREATE DATABASE "{seed}"')
                made.append(seed)
                now = datetime.now(UTC)
                t0 = time.perf_counter()
                if n == 0:
                    store = await open_store(f"{base}/{seed}", SystemClock(), migrate=True)
                    await store.close()
                else:
                    log(f"postgres: seeding {n:,} events ...")
                    expect = await seed_postgres(f"{base}/{seed}", Shape.of(n), now)
                    took_s = time.perf_counter() - t0
                    seed_s = took_s if n == events_n else seed_s
                    size = await admin.fetchval("SELECT pg_database_size($1)", seed)
                    log(f"postgres: seeded in {took_s:.1f}s ({size / 2**20:.0f} MiB)")
                samples, opens = [], []
                report = None
                for r in range(runs):
                    copy = f"{seed}_r{r}"
                    await admin.execute(
                        f'CREATE DATABASE "{copy}" TEMPLATE "{seed}" STRATEGY FILE_COPY'
                    )
                    made.append(copy)
                    took, report, opened = await scan_once(f"{base}/{copy}", state)
                    samples.append(took)
                    opens.append(opened)
                    await admin.execute(f'DROP DATABASE IF EXISTS "{copy}" WITH (FORCE)')
                    made.remove(copy)
                assert report is not None
                cases[n] = Case(n, samples, statistics.median(opens), _repairs(report))
                if n:
                    ok = _check(expect, report) and (ok or n == CRASH_ONLY)
                if n == events_n:
                    plans = await postgres_plans(f"{base}/{seed}", now)
                await admin.execute(f'DROP DATABASE IF EXISTS "{seed}" WITH (FORCE)')
                made.remove(seed)
    finally:
        for name in made:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    return _result("postgres", cases, events_n, seed_s, plans, ok)


def _result(
    backend: str, cases: dict[int, Case], n: int, seed_s: float, plans: list[dict[str, Any]],
    ok: bool,
) -> Result:  # fmt: skip
    empty, crash, full = cases[0], cases[CRASH_ONLY], cases[n]
    return Result(
        backend=backend, events=n, empty_ms=round(empty.median_ms, 1),
        crash_only_ms=round(crash.median_ms, 1), full_ms=round(full.median_ms, 1),
        ratio=round(full.median_ms / empty.median_ms, 2) if empty.median_ms else float("inf"),
        history_ratio=round(full.median_ms / crash.median_ms, 2),
        under_1s=full.median_ms < 1000.0, repairs_ok=ok, repairs=full.repairs,
        runs_ms=[round(x, 1) for x in full.runs_ms], seed_s=round(seed_s, 1), plans=plans,
        all_indexed=all(p["indexed"] for p in plans),
    )  # fmt: skip


# --- output ---------------------------------------------------------------------------------------


def table(results: Sequence[Result]) -> str:
    lines = [f"{'backend':<9} {'events':>10} {'scan ms (empty)':>16} {'(same crash, 1k)':>17} "
             f"{'scan ms (full)':>15} {'ratio':>7} {'vs 1k':>6}  {'< 1 s':<6} {'repairs ok':<11}"
             " indexed", "-" * 112]  # fmt: skip
    for r in results:
        lines.append(f"{r.backend:<9} {r.events:>10,} {r.empty_ms:>16.1f} {r.crash_only_ms:>17.1f} "
                     f"{r.full_ms:>15.1f} {r.ratio:>7.1f} {r.history_ratio:>6.2f}  "
                     f"{'yes' if r.under_1s else 'NO':<6} {'yes' if r.repairs_ok else 'NO':<11} "
                     f"{'all' if r.all_indexed else 'NO'}")  # fmt: skip
    lines += [
        "",
        "ratio = full / empty store. Every scan of a seeded store repairs the same crash",
        "leftovers (each repair its own durable commit), so 'vs 1k' = full / the same leftovers",
        f"on a {CRASH_ONLY:,}-event history: the cost of the history itself (1.0 = none).",
        "",
    ]
    for r in results:
        repairs = ", ".join(f"{k} {v}" for k, v in r.repairs.items())
        lines.append(f"{r.backend}: runs {r.runs_ms} ms; each run repaired: {repairs}; "
                     f"seeding took {r.seed_s}s")  # fmt: skip
    for r in results:
        lines.append("")
        how = ("EXPLAIN QUERY PLAN" if r.backend == "sqlite"
               else "EXPLAIN, plan_cache_mode=force_generic_plan")  # fmt: skip
        lines.append(f"query plans, {r.backend} ({how}), at {r.events:,} events:")
        for p in r.plans:
            lines.append(f"  {p['query']:<22} {p['verdict']}")
            for step in p["plan"]:
                lines.append(f"      {step}")
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> list[Result]:
    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    results = [await bench_sqlite(args.events, args.runs, log)]
    if not args.sqlite_only:
        results.append(await bench_postgres(args.events, args.runs, args.pg, log))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=1_000_000, help="events in the history")
    parser.add_argument("--runs", type=int, default=5, help="scans per case (median reported)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--sqlite-only", action="store_true", help="skip Postgres")
    parser.add_argument(
        "--pg",
        default=os.environ.get("ACP_BENCH_PG") or os.environ.get("ACP_TEST_PG") or DEFAULT_PG,
        help="Postgres admin URL; temporary databases are created and dropped there",
    )
    args = parser.parse_args(argv)
    if args.events < 1000:
        parser.error("--events must be at least 1000")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    configure(level="error", stream=sys.stderr)  # the scan's own log lines stay off stdout
    try:
        results = anyio.run(run, args)
    except (BenchError, SupervisorError) as exc:
        print(f"bench/recovery.py: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"events": args.events, "runs": args.runs,
                          "results": [_summary(r) for r in results]}))  # fmt: skip
    else:
        print(table(results))
    return 0 if all(r.repairs_ok for r in results) else 1


def _summary(r: Result) -> dict[str, Any]:
    out = asdict(r)
    out["plans"] = {p["query"]: p["verdict"] for p in r.plans}
    return out


if __name__ == "__main__":
    sys.exit(main())
