#!/usr/bin/env python
"""What a simulated month's SQL costs inside the daemon, and what the same statements cost
back to back.

    python bench/sqlfloor.py [--workers 10] [--horizon month] [--json]

1. Runs `run --horizon H --simulate` with N support agents (bench/horizon.py's config) as a
   subprocess whose `sqlite3.connect` hands out a connection that times and records every
   statement of the store's connection (the SQL text and its parameters).
2. Replays that stream into a new database in this process, one statement after another with
   nothing in between: the same statements, the same parameters, the same transactions.

Printed: the statement count, the seconds inside SQLite during the run, the seconds of the
replay, and the statements that cost most both ways. The difference is what the interleaving
costs: between two statements the daemon runs its own Python (the gate, the workers, the
event loop), which evicts SQLite's pages and code from the CPU's caches, so each statement
starts cold. It says how much a design that runs a batch's statements together could win,
before anyone builds it.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from horizon import START, config_text, environment  # noqa: E402

# Run in the daemon's process before the supervisor is imported: every connection records.
RECORDER = """
import atexit, pickle, sqlite3, sys, time, runpy
_out = sys.argv.pop(1)
_log = []
_clock = time.perf_counter

class _Recording(sqlite3.Connection):
    def execute(self, sql, params=(), /):
        t = _clock()
        try:
            return super().execute(sql, params)
        finally:
            _log.append((id(self), sql, params, _clock() - t))

    def executemany(self, sql, rows, /):
        rows = list(rows)
        t = _clock()
        try:
            return super().executemany(sql, rows)
        finally:
            _log.append((id(self), "\\x00many", (sql, rows), _clock() - t))

    def executescript(self, script, /):
        t = _clock()
        try:
            return super().executescript(script)
        finally:
            _log.append((id(self), "\\x00script", script, _clock() - t))

_connect = sqlite3.connect
def _recording_connect(*args, **kwargs):
    kwargs.setdefault("factory", _Recording)
    return _connect(*args, **kwargs)
sqlite3.connect = _recording_connect

@atexit.register
def _dump():
    with open(_out, "wb") as f:
        pickle.dump(_log, f)

sys.argv[0] = "supervisor"
runpy.run_module("supervisor", run_name="__main__", alter_sys=True)
"""

Statement = tuple[str, Any, float]  # sql, params, seconds inside the daemon


def record(workers: int, horizon: str, folder: Path) -> tuple[list[Statement], float]:
    config = folder / "bench.toml"
    config.write_text(config_text(workers, False))
    state = folder / "state"
    out = folder / "statements.pickle"
    argv = [sys.executable, "-c", RECORDER, str(out), "--config", str(config), "--state-dir",
            str(state), "--db", f"sqlite:///{state / 'simulate.db'}?synchronous=normal",
            "--log-level", "warning", "run", "--horizon", horizon, "--simulate", "--start",
            START, "--json"]  # fmt: skip
    t0 = time.perf_counter()
    done = subprocess.run(argv, cwd=folder, env=environment(), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"the run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    with open(out, "rb") as f:
        log: list[tuple[int, str, Any, float]] = pickle.load(f)
    # The store's connection is the one with most statements (readers and the checkpointer's
    # own connection run beside it and are left out: they would not replay in order).
    counts: dict[int, int] = defaultdict(int)
    for conn, *_ in log:
        counts[conn] += 1
    main = max(counts, key=lambda c: counts[c])
    return [(sql, params, took) for conn, sql, params, took in log if conn == main], wall


def replay(statements: list[Statement], path: Path) -> dict[str, float]:
    """Seconds per statement text, replayed back to back (what the SQL costs with warm caches)."""
    conn = sqlite3.connect(path, isolation_level=None)
    spent: dict[str, float] = defaultdict(float)
    clock = time.perf_counter
    try:
        for sql, params, _took in statements:
            t = clock()
            if sql == "\x00many":
                conn.executemany(params[0], params[1])
            elif sql == "\x00script":
                conn.executescript(params)
            else:
                conn.execute(sql, params).fetchall()
            spent[sql] += clock() - t
    finally:
        conn.close()
    return spent


def label(sql: str) -> str:
    text = "executescript" if sql == "\x00script" else " ".join(sql.split())
    return text[:60]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=10)
    parser.add_argument("--horizon", default="month", choices=["hour", "day", "week", "month"])
    parser.add_argument("--top", type=int, default=8, help="statements listed")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="acp-bench-sqlfloor-") as tmp:
        statements, wall = record(args.workers, args.horizon, Path(tmp))
        inside: dict[str, float] = defaultdict(float)
        for sql, _params, took in statements:
            inside[sql] += took
        alone = replay(statements, Path(tmp) / "replay.db")
    in_daemon, replayed = sum(inside.values()), sum(alone.values())
    top = sorted(inside, key=lambda s: -inside[s])[: args.top]
    result = {
        "workers": args.workers, "horizon": args.horizon, "run_wall_s": round(wall, 3),
        "statements": len(statements), "sql_in_daemon_s": round(in_daemon, 3),
        "sql_back_to_back_s": round(replayed, 3),
        "interleaving_cost_s": round(in_daemon - replayed, 3),
        "top": [{"statement": label(s), "in_daemon_s": round(inside[s], 3),
                 "back_to_back_s": round(alone[s], 3)} for s in top],
    }  # fmt: skip
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"simulated {args.horizon}, {args.workers} workers: the run took {wall:.2f} s; "
          f"{len(statements):,} statements on the store's connection")  # fmt: skip
    print(f"inside SQLite during the run: {in_daemon:.3f} s; the same statements back to back: "
          f"{replayed:.3f} s; interleaving costs {in_daemon - replayed:.3f} s "
          f"({(in_daemon - replayed) / wall:.0%} of the run)")  # fmt: skip
    print(f"{'in run s':>9} {'alone s':>8}  statement")
    for s in top:
        print(f"{inside[s]:>9.3f} {alone[s]:>8.3f}  {label(s)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
