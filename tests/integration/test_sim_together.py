"""A simulation's workers due on the same slot run side by side (VirtualClock `together`), and
their writes share COMMITs, while the run stays deterministic: the store keeps every COMMIT,
checkpoint and scan on the event loop (Backend.keep_on_loop), so nothing the tasks wait for
ends on its own time."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest

from supervisor.config import default_config_text, load_config
from supervisor.runtime.daemon import Daemon
from supervisor.store import NewEvent, open_store
from supervisor.store import sqlite as sqlite_backend
from supervisor.timing.clock import SystemClock
from tests.integration.test_horizons import NOV1

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parents[2]
DAY_SLOTS = 96  # a simulated day: a cycle every 15 minutes (DESIGN.md horizon table)


def _fleet_config_text(workers: int) -> str:
    text = default_config_text()
    head = text[: text.index("[[workers]]")]
    return head + (
        f'[[workers]]\nname = "support"\nclass = "workers.support:SupportAgent"\n'
        f"replicas = {workers}\n"
    )


async def test_workers_due_together_share_commits_in_a_simulation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ten workers on the same hourly slot: one at a time, each of their writes was a COMMIT
    of its own (136,000 in a month of 100 workers); side by side they share them."""
    members: Counter[int] = Counter()
    threads: set[int] = set()
    commit_batch = sqlite_backend.SQLiteBackend._commit_batch

    async def counted(self: sqlite_backend.SQLiteBackend) -> None:
        if self._batch is not None:
            members[self._batch.members] += 1
        threads.add(threading.get_ident())
        await commit_batch(self)

    monkeypatch.setattr(sqlite_backend.SQLiteBackend, "_commit_batch", counted)
    (tmp_path / "supervisor.toml").write_text(_fleet_config_text(10))
    config = load_config(tmp_path / "supervisor.toml", env={}, state_dir=tmp_path / "state",
                         db=f"sqlite:///{tmp_path / 'sim.db'}?synchronous=normal")  # fmt: skip
    daemon = Daemon(config, horizon="day", simulate=True, start=NOV1, seed=3, env={},
                    install_signals=False)  # fmt: skip
    card = await daemon.run()
    assert card is not None and card.total["cycles"] == 10 * DAY_SLOTS
    commits = sum(members.values())
    writes = sum(n * k for n, k in members.items())
    assert getattr(daemon.clock, "together", False)
    assert writes >= 2 * card.total["actions_started"]
    assert writes / commits > 3, f"{writes} writes in {commits} COMMITs"
    assert threads == {threading.get_ident()}, "every COMMIT on the loop's thread"
    # The hourly recovery scan runs at the instant a window ends, beside the rotation that
    # closes it: it leaves that window to the rotation (not closed as "recovered").
    conn = sqlite3.connect(tmp_path / "sim.db")
    try:
        statuses = Counter(r[0] for r in conn.execute("SELECT status FROM sessions"))
    finally:
        conn.close()
    assert statuses == Counter({"closed": 24})


def _run_simulation(folder: Path, hash_seed: str) -> list[tuple[Any, ...]]:
    folder.mkdir()
    (folder / "supervisor.toml").write_text(_fleet_config_text(8))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACP_")}
    env.pop("NOTIFY_SOCKET", None)
    env["PYTHONHASHSEED"] = hash_seed
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    db = folder / "sim.db"
    done = subprocess.run(
        [sys.executable, "-m", "supervisor", "--config", str(folder / "supervisor.toml"),
         "--state-dir", str(folder / "state"), "--db", f"sqlite:///{db}?synchronous=normal",
         "run", "--horizon", "day", "--simulate", "--start", "2026-11-01T00:00:00Z", "--json"],
        cwd=folder, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["total"]["cycles"] == 8 * DAY_SLOTS
    conn = sqlite3.connect(db)
    try:
        return conn.execute(
            "SELECT session_id, seq, kind, reason, command_id, correlation_id, worker, payload,"
            " created_at FROM events ORDER BY id"
        ).fetchall()
    finally:
        conn.close()


@pytest.mark.acceptance
def test_side_by_side_workers_write_the_same_log_on_every_run(tmp_path: Path) -> None:
    """Promise 8 with workers side by side: two runs of the same simulated day, in processes
    with different string hashing, write the same events in the same order, row for row."""
    first = _run_simulation(tmp_path / "a", "1")
    second = _run_simulation(tmp_path / "b", "2")
    assert len(first) > 500
    assert first == second


async def test_a_store_kept_on_the_loop_uses_no_thread(tmp_path: Path) -> None:
    """keep_on_loop: COMMITs of batches, checkpoints and the scans of read_off_loop all run on
    the loop's thread (each used a worker thread before), and a write batch still commits."""
    from tests.integration.test_group_commit import _backend, _WatchedCommits

    url = f"sqlite:///{tmp_path / 'loop.db'}"  # synchronous=full: COMMITs of batches in threads
    store = await open_store(url, SystemClock(), migrate=True)
    backend = _backend(store)
    assert backend.keep_on_loop()
    watched = _WatchedCommits(backend._require())
    backend._conn = watched  # type: ignore[assignment]
    backend._checkpoint_every = 10
    seen: list[int] = []
    try:
        async with anyio.create_task_group() as tg:
            for n in range(60):
                tg.start_soon(store.append, NewEvent(kind="X", session_id="s", payload={"n": n}))

        def then(rows: list[list[Any]]) -> int:
            seen.append(threading.get_ident())
            return len(rows[0])

        count = await store.read_off_loop([("replay_events", ("s", 0, 1000))], then)
    finally:
        backend._conn = watched._conn
        await store.close()
    loop = threading.get_ident()
    assert count == 60
    assert len(watched.threads) < 60, "the writers shared COMMITs"
    assert set(watched.threads) == {loop}
    assert watched.checkpoints and set(watched.checkpoints) == {loop}
    assert seen == [loop]


async def test_workers_that_wait_on_real_time_keep_one_turn_at_a_time(tmp_path: Path) -> None:
    """An in-process worker whose cycle waits on something real (a network call, a real
    sleep) does not say it awaits only the gate: its simulation runs one worker at a time, so
    its events come in the same order however long each wait took (side by side they did
    not: a review saw 134 of 157 rows differ between two runs)."""
    text = _fleet_config_text(4).replace(
        "workers.support:SupportAgent", "tests.fleet_workers:RealWait"
    )
    runs = []
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "supervisor.toml").write_text(text)
        config = load_config(folder / "supervisor.toml", env={}, state_dir=folder / "state",
                             db=f"sqlite:///{folder / 'sim.db'}?synchronous=normal")  # fmt: skip
        daemon = Daemon(config, horizon="hour", simulate=True, start=NOV1, seed=3, env={},
                        install_signals=False)  # fmt: skip
        assert await daemon.run() is not None
        assert not getattr(daemon.clock, "together", True)
        conn = sqlite3.connect(folder / "sim.db")
        try:
            runs.append(conn.execute("SELECT session_id, seq, kind, command_id, worker, payload"
                                     " FROM events ORDER BY id").fetchall())  # fmt: skip
        finally:
            conn.close()
    assert len(runs[0]) > 20
    assert runs[0] == runs[1]
