"""A fleet-scope engage on Postgres reaches a busy fleet: starts and outcomes that always overlap
(fifty workers back to back) must not keep the engage's lock from it until it times out. The
row lock they used to share queued nobody; the switch lock is now fair."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

from supervisor.store import Store, open_store
from supervisor.timing.clock import SystemClock
from tests import storetools
from tests.waiting import eventually

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[2]
FLEET = "default"


async def test_an_engage_is_not_starved_by_starts_that_always_overlap(
    pg_url: str, tmp_path: Path
) -> None:
    # Five hosts' pools, as a fleet of five: more starts in flight than one pool holds.
    stores = [await open_store(pg_url, SystemClock()) for _ in range(5)]
    store = stores[0]
    reads = 0
    stop = anyio.Event()

    now = store.clock.now()
    session, _ = await store.open_window(fleet=FLEET, key="w", starts_at=now - timedelta(minutes=1),
                                         ends_at=now + timedelta(hours=1), max_cost=None,
                                         max_actions=None, by="pytest")  # fmt: skip

    async def start_after_start(store: Store) -> None:
        """What a start does: read the switches under their lock, then queue for the window's
        row (every start reserves on it) while still holding the switches' lock; the holder of
        the window's row takes a moment (a busy host) before it commits."""
        nonlocal reads
        while not stop.is_set():
            async with storetools.transaction(store) as tx:
                await tx.fetchall("kill_switches_for_start", FLEET)
                await tx.fetchrow("reserve_budget", session.id, 0.0, store.clock.now())
                await anyio.sleep(0.01)
                reads += 1

    env = {k: v for k, v in os.environ.items() if not k.startswith("ACP_")}
    argv = [sys.executable, "-m", "supervisor", "--db", pg_url, "--state-dir", str(tmp_path),
            "killswitch", "engage", "--scope", "fleet", "--mode", "halt_all", "--reason", "drill",
            "--by", "pytest"]  # fmt: skip
    try:
        async with anyio.create_task_group() as tg:
            for each in stores:
                for _ in range(10):
                    tg.start_soon(start_after_start, each)
            # The starts overlap from here on: as many done as there are loops (each holds the
            # window's row 10 ms, so about half a second on an idle machine, later on a busy one).
            await eventually(lambda: reads >= 50, "fifty starts through the window's row")
            busy = reads
            began = time.monotonic()

            def engage() -> subprocess.CompletedProcess[str]:
                return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True,
                                      timeout=60)  # fmt: skip

            done = await anyio.to_thread.run_sync(engage)
            took = time.monotonic() - began
            stop.set()
        assert reads > busy, "the starts did not run while the engage waited"
        assert done.returncode == 0, done.stderr
        assert took < 10, f"the engage took {took:.1f}s behind the starts"
        rows = await storetools.fetchall(store, "kill_switches", FLEET)
        assert [(r["scope"], r["mode"]) for r in rows if r["scope"] == "fleet"] == [
            ("fleet", "halt_all")
        ]
    finally:
        for each in stores:
            await each.close()
