"""`policy replay` at scale: one window holding a million events, decided again by a candidate.

    .venv/bin/python bench/replay.py [--events 1000000] [--rules 20] [--json]

A SQLite store (a temporary file, migrated by the store itself) is seeded straight through the
driver with one daily window of N events: per ten events, three actions that ran (ACTION_STARTED,
ACTION_SUCCEEDED and their action rows), one policy denial and one approval request (each with
the recorded proposal, as the gate writes them), and two CYCLE_COMPLETED events that replay must
skip. Seeding is setup, not measured.

Measured, on a freshly opened store: the read (`Store.proposal_rows` plus decoding into
proposals) and the decisions (`replay.replay` with a candidate of --rules rules, the last of
which matches) separately, and the whole `run_replay` as `policy replay --window ID` calls it,
in wall-clock and CPU seconds (on a shared machine the CPU figure is the steadier one).
The goal: seconds, not minutes, at a million events. The mix is a worst case for replay: half
the events are proposals (a real window also holds cycles, checkpoints, outcomes).
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import anyio  # noqa: E402

from supervisor.actions import canonical_json, derive_id  # noqa: E402
from supervisor.config import Candidate, load_config  # noqa: E402
from supervisor.governance.policy import Policy  # noqa: E402
from supervisor.governance.replay import load_window, replay, run_replay  # noqa: E402
from supervisor.store import open_store  # noqa: E402
from supervisor.timing.clock import SystemClock  # noqa: E402

FLEET = "default"
START = datetime(2026, 11, 2, tzinfo=UTC)
RISKS = ("low", "medium", "high", "critical")


def ts(seconds: float) -> str:
    return (START + timedelta(seconds=seconds)).isoformat(timespec="microseconds")


def seed(path: Path, events: int) -> str:
    """Fill one window with `events` events; returns its session id."""
    sid = derive_id("session", FLEET, "bench-window")
    db = sqlite3.connect(path)
    db.execute(
        "INSERT INTO sessions (id, fleet, window_key, starts_at, ends_at, status, opened_by, "
        "opened_at) VALUES (?, ?, ?, ?, ?, 'closed', 'bench', ?)",
        (sid, FLEET, "2026-11-02", ts(0), ts(86400), ts(0)),
    )
    ev_rows: list[tuple[Any, ...]] = []
    act_rows: list[tuple[Any, ...]] = []
    seq = 0
    identity = canonical_json({"team": "support", "user": "ann"})

    def event(kind: str, reason: str | None, payload: dict[str, Any], cid: str | None,
              at: float) -> None:  # fmt: skip
        nonlocal seq
        seq += 1
        ev_rows.append((sid, seq, kind, reason, canonical_json(payload), 1, cid, None, "w1",
                        None, ts(at)))  # fmt: skip

    group = 0
    while seq + 10 <= events:
        at = group * 86400 / (events / 10)
        risk = RISKS[group % 4]
        for k in range(3):
            cid = derive_id("bench", str(group), str(k))
            params = {"case": group, "k": k}
            act_rows.append((cid, FLEET, sid, "w1", "support.resolve_case", canonical_json(params),
                             risk, 0.05, 0, 0, "succeeded", f"risk:{risk}", ts(at), ts(at),
                             identity, "small-1", 100, "allow"))  # fmt: skip
            event("ACTION_STARTED", None, {"action": "support.resolve_case", "risk": risk}, cid, at)
            event("ACTION_SUCCEEDED", None, {"status": "succeeded", "error": None}, cid, at)
        proposal = {"risk": "critical", "params": {"case": group}, "cost": 0.05, "tokens": 100,
                    "model": "small-1", "identity": {"team": "support", "user": "ann"}}  # fmt: skip
        event("ACTION_DENIED", "policy", {**proposal, "action": "db.delete_user", "rule": "risk:critical",
              "why": "risk critical: deny", "decision": "deny", "detail": "-"},
              derive_id("bench-deny", str(group)), at)  # fmt: skip
        event("APPROVAL_REQUESTED", None, {**proposal, "risk": "high", "action": "ops.restart",
              "rule": "risk:high", "why": "risk high", "decision": "require_approval",
              "command_id": derive_id("bench-approval", str(group))}, None, at)  # fmt: skip
        event("CYCLE_COMPLETED", None, {"cycle": group}, None, at)
        event("CYCLE_COMPLETED", None, {"cycle": group}, None, at)
        group += 1
    db.executemany(f"INSERT INTO events (session_id, seq, kind, reason, payload, state_bearing, "
                   f"command_id, correlation_id, worker, agent_id, created_at) VALUES "
                   f"({', '.join('?' * 11)})", ev_rows)  # fmt: skip
    db.executemany(f"INSERT INTO actions (command_id, fleet, session_id, worker, name, params, "
                   f"risk, cost, critical, safe_to_retry, status, rule, started_at, finished_at, "
                   f"identity, model, tokens, decision) VALUES ({', '.join('?' * 18)})",
                   act_rows)  # fmt: skip
    db.execute("INSERT INTO streams (id, last_seq) VALUES (?, ?)", (sid, seq))
    db.commit()
    db.close()
    return sid


def candidate(rules: int) -> Candidate:
    """`rules` rules; only the last one matches anything (every proposal walks all of them)."""
    section: dict[str, Any] = {"rules": [
        {"name": f"r{i}", "action": f"never.{i}.*", "outcome": "deny"} for i in range(rules - 1)
    ] + [{"name": "medium-approval", "risk": "medium", "outcome": "require_approval"}]}  # fmt: skip
    base = load_config(None)
    return Candidate(
        "bench-candidate", Policy.from_config(section), base.models, base.token_budgets
    )


async def measure(events: int, rules: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="acp-replay-bench-") as tmp:
        path = Path(tmp) / "bench.db"
        url = f"sqlite:///{path}"
        store = await open_store(url, SystemClock(), migrate=True)
        await store.close()
        t0 = time.perf_counter()
        sid = seed(path, events)
        seeded = time.perf_counter() - t0
        config = load_config(None, db=url, state_dir=tmp)
        cand = candidate(rules)
        store = await open_store(url, SystemClock())
        try:
            session = await store.get_session(sid)
            assert session is not None
            t0 = time.perf_counter()
            counts: Counter[str] = Counter()
            proposals = await load_window(store, session, counts)
            read = time.perf_counter() - t0
            t0 = time.perf_counter()
            report = replay(cand, [(session, proposals)], config.timezone)
            decide = time.perf_counter() - t0
            t0, c0 = time.perf_counter(), time.process_time()
            again = await run_replay(store, config, cand, ids=[sid], since=None)
            whole, cpu = time.perf_counter() - t0, time.process_time() - c0
        finally:
            await store.close()
        assert again.counts["proposals"] == report.counts["proposals"]
        return {
            "events": events,
            "proposals": report.counts["proposals"],
            "rules": rules,
            "seed_s": round(seeded, 2),
            "read_s": round(read, 2),
            "decide_s": round(decide, 2),
            "replay_s": round(whole, 2),
            "replay_cpu_s": round(cpu, 2),
            "decisions_per_s": round(report.counts["proposals"] / decide),
            "changed": report.changed,
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--rules", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = anyio.run(measure, args.events, args.rules)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:16} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
