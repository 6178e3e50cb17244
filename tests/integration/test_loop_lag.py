"""What keeps bench/loop_lag.py's heavy reads from holding the event loop, checked without
timing anything: the scorecard's groups are objects the collector stops walking, a clean
recovery scan lets the loop turn, and the benchmark's kept store is reused as it says."""

from __future__ import annotations

import gc
import importlib.util
import sqlite3
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType

import anyio
import pytest

from supervisor.events import ACTION_DENIED, CYCLE_COMPLETED
from supervisor.governance.approvals import Approvals
from supervisor.governance.escalation import EscalationChain
from supervisor.ops import scorecard
from supervisor.runtime import recovery
from supervisor.store import NewEvent, Store
from supervisor.timing.clock import VirtualClock
from tests import storetools

pytestmark = pytest.mark.anyio

FLEET = "loop-lag"
BENCH = Path(__file__).resolve().parents[2] / "bench" / "loop_lag.py"


async def _window_with_events(store: Store, clock: VirtualClock, key: str) -> str:
    start = clock.now()
    session, _ = await store.open_window(fleet=FLEET, key=key, starts_at=start,
                                         ends_at=start + timedelta(hours=1), max_cost=None,
                                         max_actions=None, by="test")  # fmt: skip
    async with storetools.transaction(store) as tx:
        for n in range(30):
            denied = n % 3 == 0
            await store.append_in(tx, NewEvent(
                kind=ACTION_DENIED if denied else CYCLE_COMPLETED, session_id=session.id,
                reason="policy" if denied else None, worker="w",
            ))  # fmt: skip
    return session.id


async def test_the_scorecards_groups_leave_the_collector(store: Store, clock: VirtualClock) -> None:
    sessions = [await _window_with_events(store, clock, key) for key in ("a", "b")]
    tallies = await store.event_tallies(FLEET)
    gc.collect()
    assert {c[0] for c in tallies.counts} >= set(sessions)
    assert not any(gc.is_tracked(c) for c in tallies.counts)  # a full collection skips them
    card = await scorecard.compute(store, FLEET)
    assert card.total["cycles"] == 40 and card.total["denials"] == 20
    assert card.denials_by_reason == {"policy": 20}
    assert [w["cycles"] for w in card.windows] == [20, 20]


async def test_a_clean_scan_lets_the_loop_turn(store: Store, clock: VirtualClock) -> None:
    """Its reads run on the loop's connection and its RECOVERY event is buffered: without a
    yield, scans back to back would keep every other task waiting."""
    approvals = Approvals(store, EscalationChain(timeout=3600.0, initial_tier="ops"), FLEET)
    turned: list[int] = []

    async def other_task() -> None:
        turned.append(len(turned))

    async with anyio.create_task_group() as tg:
        tg.start_soon(other_task)
        report = await recovery.scan(store, fleet=FLEET, approvals=approvals, host_switch=None,
                                     by="test", started_before=clock.now(), host="h",
                                     approvals_due=False, live_after=clock.now(), owner="o")  # fmt: skip
        assert turned, "the scan returned before any other task ran"
    assert report.repairs == 0


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_loop_lag", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _events(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("SELECT count(*) FROM events").fetchone()[0])
    finally:
        conn.close()


async def test_the_benchs_kept_store_is_seeded_once_and_copied(tmp_path: Path) -> None:
    bench = _bench()
    now = datetime.now(UTC)
    keep = tmp_path / "kept.db"
    first = await bench.kept_sqlite(keep, tmp_path / "run1.db", 10_000, 1_000, now)
    seeded = keep.stat().st_mtime_ns
    again = await bench.kept_sqlite(keep, tmp_path / "run2.db", 10_000, 1_000, now)
    assert again == first and keep.stat().st_mtime_ns == seeded  # reused, not seeded again
    assert _events(tmp_path / "run1.db") == _events(tmp_path / "run2.db") == _events(keep)
    await bench.kept_sqlite(keep, tmp_path / "run3.db", 12_000, 1_000, now)  # another shape
    assert _events(tmp_path / "run3.db") == _events(keep) > _events(tmp_path / "run1.db")
