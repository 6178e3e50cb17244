"""Store write throughput: exactly-once appends beside plain INSERTs of the same rows.

    python bench/store.py [--rows N] [--json] [--sqlite-only] [--pg ADMIN_URL]

For each backend, in the same run and against the same schema:

- exactly-once: `store.run_command(cid, "append", params, body)` where the body appends one event
  with `store.append_in`, i.e. the command ledger row, the per-session sequence and the event, in
  one transaction (what every state-bearing, idempotent write of the daemon costs);
- raw: one plain INSERT of the same event row (same columns, same payload) per transaction, through
  the same driver with the same durability: SQLite in WAL with synchronous=FULL, BEGIN IMMEDIATE and
  COMMIT on a worker thread as the store does; Postgres an asyncpg single-row INSERT in a
  transaction (synchronous_commit as the server has it).

SQLite runs in a temporary file; Postgres in a temporary database created on the server at
--pg (default $ACP_BENCH_PG, else $ACP_TEST_PG, else postgresql://postgres@127.0.0.1:5432/postgres)
and dropped afterwards. An unreachable Postgres is an error (exit 1) unless --sqlite-only.
The timings interleave the two kinds in chunks, so drift (cache, checkpoints) hits both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from supervisor.actions import canonical_json
from supervisor.errors import SupervisorError
from supervisor.store import NewEvent, Store, Tx, open_store
from supervisor.timing.clock import SystemClock

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
KIND = "BENCH"
CHUNKS = 4
WARMUP = 50
COLUMNS = (
    "session_id, seq, kind, reason, payload, state_bearing, command_id, correlation_id, worker, "
    "agent_id, created_at"
)
SQLITE_INSERT = f"INSERT INTO events ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
PG_INSERT = f"INSERT INTO events ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"


class BenchError(Exception):
    """A clear, one-line reason to stop."""


@dataclass(frozen=True)
class Result:
    backend: str
    rows: int
    exactly_once_per_s: float
    raw_per_s: float
    ratio: float  # exactly-once rate / raw rate
    durability: str


def payload(i: int) -> dict[str, Any]:
    return {"i": i, "target": f"resource-{i % 97}", "note": "x" * 64}


def row(session: str, i: int, command_id: str) -> tuple[Any, ...]:
    """The event row exactly as the store writes it (the store canonicalizes the payload too)."""
    return (session, i + 1, KIND, None, canonical_json(payload(i)), True, command_id, None,
            "bench", None, datetime.now(UTC))  # fmt: skip


# --- the two writers ----------------------------------------------------------------------------

Writer = Callable[[int], Awaitable[None]]


def exactly_once_writer(store: Store, session: str) -> Writer:
    async def write(i: int) -> None:
        command_id = f"{session}-{i}"

        async def body(tx: Tx) -> dict[str, Any]:
            seq = await store.append_in(
                tx, NewEvent(kind=KIND, session_id=session, payload=payload(i),
                             command_id=command_id, worker="bench")
            )  # fmt: skip
            return {"seq": seq}

        _result, fresh = await store.run_command(command_id, "append", payload(i), body)
        if not fresh:
            raise BenchError(f"command {command_id} was not fresh")

    return write


def sqlite_raw_writer(conn: sqlite3.Connection, session: str) -> Writer:
    async def write(i: int) -> None:
        values = row(session, i, f"{session}-{i}")
        encoded = (*values[:-1], values[-1].isoformat(timespec="microseconds"))
        await anyio.to_thread.run_sync(conn.execute, "BEGIN IMMEDIATE")
        conn.execute(SQLITE_INSERT, encoded)
        await anyio.to_thread.run_sync(conn.execute, "COMMIT")

    return write


def pg_raw_writer(conn: Any, session: str) -> Writer:
    async def write(i: int) -> None:
        async with conn.transaction():
            await conn.execute(PG_INSERT, *row(session, i, f"{session}-{i}"))

    return write


async def measure(rows: int, store_write: Writer, raw_write: Writer) -> tuple[float, float]:
    """Rates (rows/s) of both writers, interleaved in chunks, after a short warm-up."""
    for i in range(WARMUP):
        await raw_write(rows + i)
        await store_write(rows + i)
    spent = {"store": 0.0, "raw": 0.0}
    bounds = [rows * k // CHUNKS for k in range(CHUNKS + 1)]
    for lo, hi in pairwise(bounds):
        for name, write in (("raw", raw_write), ("store", store_write)):
            started = time.perf_counter()
            for i in range(lo, hi):
                await write(i)
            spent[name] += time.perf_counter() - started
    return rows / spent["store"], rows / spent["raw"]


async def verify(store: Store, session: str, expected: int) -> None:
    """Every exactly-once append landed once, with gapless sequence numbers."""
    got = [e.seq for e in await store.replay(session, 0, limit=expected + 1)]
    if got != list(range(1, expected + 1)):
        raise BenchError(f"{session}: expected seqs 1..{expected}, got {len(got)} events")


# --- backends -----------------------------------------------------------------------------------


async def bench_sqlite(rows: int) -> Result:
    with tempfile.TemporaryDirectory(prefix="acp-bench-") as tmp:
        path = Path(tmp) / "bench.db"
        store = await open_store(f"sqlite:///{path}", SystemClock(), migrate=True)
        raw = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
        try:
            raw.execute("PRAGMA synchronous=FULL")
            mode = raw.execute("PRAGMA journal_mode").fetchone()[0]
            sync = raw.execute("PRAGMA synchronous").fetchone()[0]
            if (mode, sync) != ("wal", 2):
                raise BenchError(f"sqlite durability is {mode}/{sync}, expected wal/2 (FULL)")
            store_rate, raw_rate = await measure(
                rows, exactly_once_writer(store, "store"), sqlite_raw_writer(raw, "raw")
            )
            await verify(store, "store", rows + WARMUP)
        finally:
            raw.close()
            await store.close()
    return Result("sqlite", rows, store_rate, raw_rate, store_rate / raw_rate,
                  "WAL, synchronous=FULL")  # fmt: skip


async def connect_admin(admin_url: str) -> Any:
    import asyncpg

    try:
        return await asyncpg.connect(admin_url, timeout=5)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise BenchError(
            f"PostgreSQL at {admin_url} is unreachable ({exc or type(exc).__name__}); "
            "start it, point --pg at it, or pass --sqlite-only"
        ) from exc


async def bench_postgres(rows: int, admin_url: str) -> Result:
    import asyncpg

    admin = await connect_admin(admin_url)
    name = f"acp_bench_{uuid.uuid4().hex[:10]}"
    url = f"{admin_url.rpartition('/')[0]}/{name}"
    try:
        synchronous_commit = await admin.fetchval("SHOW synchronous_commit")
        await admin.execute(f'CREATE DATABASE "{name}"')
        store = await open_store(url, SystemClock(), migrate=True)
        raw = await asyncpg.connect(url)
        try:
            store_rate, raw_rate = await measure(
                rows, exactly_once_writer(store, "store"), pg_raw_writer(raw, "raw")
            )
            await verify(store, "store", rows + WARMUP)
        finally:
            await raw.close()
            await store.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    return Result("postgres", rows, store_rate, raw_rate, store_rate / raw_rate,
                  f"synchronous_commit={synchronous_commit}")  # fmt: skip


# --- output -------------------------------------------------------------------------------------


def table(results: list[Result]) -> str:
    head = f"{'backend':<9} {'rows':>6} {'exactly-once/s':>15} {'raw INSERT/s':>13} {'ratio':>6}"
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r.backend:<9} {r.rows:>6} {r.exactly_once_per_s:>15.0f} {r.raw_per_s:>13.0f} "
            f"{r.ratio:>6.2f}   ({r.durability})"
        )
    lines.append("ratio = exactly-once appends per second / raw INSERTs per second (1 row per tx)")
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> list[Result]:
    if not args.sqlite_only:
        await (await connect_admin(args.pg)).close()  # fail before any work, not after SQLite
    results = [await bench_sqlite(args.rows)]
    if not args.sqlite_only:
        results.append(await bench_postgres(args.rows, args.pg))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=2000, help="rows per writer and backend")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--sqlite-only", action="store_true", help="skip Postgres")
    parser.add_argument(
        "--pg",
        default=os.environ.get("ACP_BENCH_PG") or os.environ.get("ACP_TEST_PG") or DEFAULT_PG,
        help="Postgres admin URL; a temporary database is created and dropped there",
    )
    args = parser.parse_args(argv)
    if args.rows < CHUNKS:
        parser.error(f"--rows must be at least {CHUNKS}")
    try:
        results = anyio.run(run, args)
    except (BenchError, SupervisorError) as exc:
        print(f"bench/store.py: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"rows": args.rows, "results": [asdict(r) for r in results]}, indent=2))
    else:
        print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
