"""Console page render time with a large event log: the overview and approvals pages (the aim:
at most 200 ms each with a million events in the store), plus the windows page and the
overview's JSON for reference.

    python bench/console.py [--events N] [--requests R] [--backend sqlite|postgres] [--json]

The store gets a month of daily windows, N events spread over them (mostly action and cycle
events, with denials, approvals, restarts and alerts among them) and a share of action rows,
approvals pending and decided, workers and a host. Bulk rows go in with the driver's bulk path
(sqlite3 executemany, asyncpg COPY); everything the console reads is then read through the real
app (Starlette over httpx's ASGI transport, the same code uvicorn serves), logged in as a viewer.
Each page is fetched R times after two warm-up fetches; the figures are median, p95 and max.

Postgres runs in a temporary database on --pg (default $ACP_BENCH_PG, else $ACP_TEST_PG, else
postgresql://postgres@127.0.0.1:5432/postgres), dropped afterwards.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx

from supervisor import events as ev
from supervisor.actions import Action
from supervisor.config import Config, load_config
from supervisor.console.app import create_app
from supervisor.console.auth import OperatorsFile, Role
from supervisor.governance.approvals import Approvals
from supervisor.logging import configure
from supervisor.store import Store, open_store, system_stream
from supervisor.store.sqlite import parse_sqlite_url
from supervisor.timing.clock import SystemClock

FLEET = "bench"
DAYS = 30
WORKERS = 20
PAGES = ("/", "/approvals", "/windows", "/api/v1/overview")
AIM_MS = 200.0
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
EVENT_COLUMNS = ("session_id", "seq", "kind", "reason", "payload", "state_bearing", "command_id",
                 "correlation_id", "worker", "agent_id", "created_at")  # fmt: skip
ACTION_COLUMNS = ("command_id", "fleet", "session_id", "worker", "name", "params", "risk", "cost",
                  "critical", "safe_to_retry", "status", "rule", "started_at", "finished_at")  # fmt: skip
# Kind mix of a busy fleet: what the daemon mostly writes, and the rarer kinds the console counts.
MIX = ((ev.ACTION_STARTED, None, 30), (ev.ACTION_SUCCEEDED, None, 28), (ev.CYCLE_COMPLETED, None, 30),
       (ev.ACTION_DENIED, "policy", 5), (ev.ACTION_DENIED, "budget", 1), (ev.APPROVAL_REQUESTED, None, 2),
       (ev.APPROVAL_GRANTED, None, 2), (ev.WORKER_RESTARTED, None, 1), (ev.CHECKPOINT, None, 1))  # fmt: skip


def _rows(
    n: int, sessions: list[Any], rng: random.Random
) -> tuple[list[tuple[Any, ...]], dict[str, int]]:
    kinds = [(k, r) for k, r, w in MIX for _ in range(w)]
    seqs = {s.id: 1000 for s in sessions}  # above what open_window already wrote
    rows = []
    for i in range(n):
        s = sessions[i * len(sessions) // n]
        kind, reason = kinds[rng.randrange(len(kinds))]
        seqs[s.id] += 1
        at = s.starts_at + timedelta(seconds=(i % 86_000))
        rows.append((s.id, seqs[s.id], kind, reason, '{"bench":true}', True, f"c{i}", None,
                     f"worker-{i % WORKERS}", None, at))  # fmt: skip
    return rows, seqs


def _action_rows(n: int, sessions: list[Any]) -> list[tuple[Any, ...]]:
    out = []
    for i in range(n):
        s = sessions[i * len(sessions) // n]
        at = s.starts_at + timedelta(seconds=i % 86_000)
        out.append((f"c{i}", FLEET, s.id, f"worker-{i % WORKERS}", "support.reply", "{}", "low", 0.01,
                    False, False, "succeeded", "risk:low", at, at))  # fmt: skip
    return out


def _iso(row: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(v.astimezone(UTC).isoformat(timespec="microseconds") if isinstance(v, datetime)
                 else (int(v) if isinstance(v, bool) else v) for v in row)  # fmt: skip


async def _bulk(store: Store, url: str, events: list[tuple[Any, ...]], seqs: dict[str, int],
                actions: list[tuple[Any, ...]]) -> None:  # fmt: skip
    if store.dialect == "sqlite":
        conn = sqlite3.connect(parse_sqlite_url(url)[0])
        try:
            with conn:
                conn.executemany(f"INSERT INTO events ({', '.join(EVENT_COLUMNS)}) VALUES "
                                 f"({', '.join('?' * len(EVENT_COLUMNS))})", map(_iso, events))  # fmt: skip
                conn.executemany(f"INSERT INTO actions ({', '.join(ACTION_COLUMNS)}) VALUES "
                                 f"({', '.join('?' * len(ACTION_COLUMNS))})", map(_iso, actions))  # fmt: skip
                conn.executemany("UPDATE streams SET last_seq = ? WHERE id = ?",
                                 [(v, k) for k, v in seqs.items()])  # fmt: skip
            conn.execute("ANALYZE")
        finally:
            conn.close()
        return
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.copy_records_to_table("events", records=events, columns=list(EVENT_COLUMNS))
        await conn.copy_records_to_table("actions", records=actions, columns=list(ACTION_COLUMNS))
        await conn.executemany("UPDATE streams SET last_seq = $1 WHERE id = $2",
                               [(v, k) for k, v in seqs.items()])  # fmt: skip
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


async def populate(store: Store, url: str, n_events: int, seed: int) -> None:
    rng = random.Random(seed)
    clock_now = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    first = clock_now - timedelta(days=DAYS - 1)
    sessions = []
    for d in range(DAYS):
        start = first + timedelta(days=d)
        s, _ = await store.open_window(fleet=FLEET, key=start.isoformat(), starts_at=start,
                                       ends_at=start + timedelta(days=1), max_cost=500.0,
                                       max_actions=100_000, by="bench")  # fmt: skip
        sessions.append(s)
        if d < DAYS - 1:
            await store.close_window(s.id, by="bench")
    approvals = Approvals(store, load_config(None, env={}).approvals, FLEET)
    for i in range(300):
        row = await approvals.request(key=f"bench-{i}", action=Action("support.refund", {"i": i}, risk="high"),
                                      worker=f"worker-{i % WORKERS}", session_id=sessions[-1].id,
                                      escalate_now=False, correlation_id=None)  # fmt: skip
        if i >= 50:
            await approvals.decide(row.id, approve=i % 3 != 0, by="bench", reason="bench")
    for w in range(WORKERS):
        await store.record_worker(fleet=FLEET, name=f"worker-{w}", host="bench-host",
                                  state="running", restarts=w % 3, last_error=None, cycle=700,
                                  session_id=sessions[-1].id, at=store.clock.now())  # fmt: skip
    for i in range(200):  # a busy system stream: recoveries and alerts
        await store.append(
            store_event(
                ev.RECOVERY if i % 4 else ev.ALERT, "clean" if i % 4 else "worker_quarantined"
            )
        )
    events, seqs = _rows(n_events, sessions, rng)
    await _bulk(store, url, events, seqs, _action_rows(n_events // 4, sessions))


def store_event(kind: str, reason: str) -> Any:
    from supervisor.store import NewEvent

    return NewEvent(kind=kind, session_id=system_stream(FLEET), reason=reason, payload={})


async def measure(
    store: Store, config: Config, secret: str, requests: int
) -> dict[str, dict[str, float]]:
    app = create_app(config, store)
    out: dict[str, dict[str, float]] = {}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://bench"
    ) as c:
        r = await c.post("/api/v1/login", json={"name": "bench", "secret": secret})
        r.raise_for_status()
        for path in PAGES:
            times = []
            for i in range(requests + 2):
                t0 = time.perf_counter()
                resp = await c.get(path)
                elapsed = (time.perf_counter() - t0) * 1000
                if resp.status_code != 200:
                    raise SystemExit(f"bench/console.py: {path} answered {resp.status_code}")
                if i >= 2:
                    times.append(elapsed)
            times.sort()
            out[path] = {"median_ms": statistics.median(times),
                         "p95_ms": times[min(len(times) - 1, int(len(times) * 0.95))],
                         "max_ms": times[-1]}  # fmt: skip
    return out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="acp-bench-console-"))
    admin = args.pg or os.environ.get("ACP_BENCH_PG") or os.environ.get("ACP_TEST_PG") or DEFAULT_PG
    db_name = f"acp_bench_console_{uuid.uuid4().hex[:8]}"
    if args.backend == "sqlite":
        url = f"sqlite:///{tmp / 'console.db'}"
    else:
        import asyncpg

        conn = await asyncpg.connect(admin)
        await conn.execute(f'CREATE DATABASE "{db_name}"')
        await conn.close()
        url = f"{admin.rpartition('/')[0]}/{db_name}"
    try:
        store = await open_store(url, SystemClock(), migrate=True)
        try:
            t0 = time.perf_counter()
            await populate(store, url, args.events, args.seed)
            fill_s = time.perf_counter() - t0
            config = dataclasses.replace(
                load_config(None, env={}, db=url, state_dir=tmp), fleet=FLEET
            )
            ops = OperatorsFile(config.console.operators_path(tmp))
            secret = ops.add("bench", Role.VIEWER, created_at="")
            figures = await measure(store, config, secret, args.requests)
        finally:
            await store.close()
    finally:
        if args.backend == "postgres":
            import asyncpg

            conn = await asyncpg.connect(admin)
            await conn.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
            await conn.close()
    return {"backend": args.backend, "events": args.events, "requests": args.requests,
            "fill_seconds": round(fill_s, 1), "pages": figures, "aim_ms": AIM_MS}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--backend", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--pg", help="Postgres admin URL")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    configure(level="warning", stream=sys.stderr)
    result = anyio.run(main_async, args)
    if args.json:
        print(json.dumps(result, sort_keys=True))
        return 0
    print(f"console pages, {args.backend}, {result['events']:,} events "
          f"(filled in {result['fill_seconds']} s), {args.requests} requests each")  # fmt: skip
    for path, f in result["pages"].items():
        verdict = "" if path not in ("/", "/approvals") else (
            "  within aim" if f["p95_ms"] <= AIM_MS else f"  OVER the {AIM_MS:.0f} ms aim")  # fmt: skip
        print(f"  {path:<18} median {f['median_ms']:7.1f} ms  p95 {f['p95_ms']:7.1f} ms  "
              f"max {f['max_ms']:7.1f} ms{verdict}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
