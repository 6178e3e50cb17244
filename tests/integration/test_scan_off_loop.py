"""Scans over the event log (the scorecard, a replay page) leave the event loop free.

The lag test is relative (the loop's worst lag against the scorecard's own duration), so it
holds on a loaded machine; the store is grown until the scorecard takes long enough to tell.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import anyio
import pytest

from supervisor.events import ACTION_DENIED, CYCLE_COMPLETED
from supervisor.ops import scorecard
from supervisor.store import NewEvent, Store, open_store
from supervisor.store.base import Backend
from supervisor.timing.clock import VirtualClock
from tests import storetools
from tests.waiting import eventually

pytestmark = pytest.mark.anyio

FLEET = "lagtest"
T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
MIN_SCORECARD = 0.2  # seconds: below this the lag comparison says nothing
TICK = 0.005


async def _windows(store: Store, n: int) -> list[str]:
    ids = []
    for i in range(n):
        start = T0 + timedelta(hours=i)
        session, _ = await store.open_window(fleet=FLEET, key=f"w{i}", starts_at=start,
                                             ends_at=start + timedelta(hours=1), max_cost=None,
                                             max_actions=None, by="test")  # fmt: skip
        ids.append(session.id)
    return ids


def _grow(path: Path, sessions: list[str], count: int, offset: int) -> None:
    """`count` more events, spread over the windows, straight into the table (setup at a speed
    the store's append path is not meant for). Seqs start above `offset` and the window's
    WINDOW_OPENED (nothing appends to these streams afterwards)."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("BEGIN")
        for i, sid in enumerate(sessions):
            per = count // len(sessions)
            conn.execute(
                "WITH RECURSIVE n(k) AS (SELECT 1 UNION ALL SELECT k + 1 FROM n WHERE k < ?) "
                "INSERT INTO events (session_id, seq, kind, reason, payload, state_bearing, "
                "worker, created_at) SELECT ?, ? + k, CASE WHEN k % 5 = 0 THEN ? ELSE ? END, "
                "CASE WHEN k % 5 = 0 THEN 'policy' END, '{}', 0, 'w' || (k % 7), ? FROM n",
                (per, sid, offset + 1, ACTION_DENIED, CYCLE_COMPLETED,
                 (T0 + timedelta(hours=i, minutes=1)).isoformat()),
            )  # fmt: skip
        conn.execute("COMMIT")


@pytest.fixture
async def big_store(tmp_path: Path) -> AsyncIterator[tuple[Store, float]]:
    """A SQLite store whose scorecard takes at least MIN_SCORECARD (grown until it does), and
    that duration, measured on the loop the way the scorecard ran before."""
    path = tmp_path / "big.db"
    store = await open_store(f"sqlite:///{path}", VirtualClock(T0), migrate=True)
    try:
        sessions = await _windows(store, 40)
        total, step = 0, 200_000
        while True:
            _grow(path, sessions, step, total)
            total += step
            t0 = time.perf_counter()
            await scorecard.compute(store, FLEET)
            took = time.perf_counter() - t0
            if took >= 1.5 * MIN_SCORECARD or total >= 1_600_000:
                break
            step = total  # double
        yield store, took
    finally:
        await store.close()


async def _worst_lag_while(work: Callable[[], Awaitable[object]]) -> tuple[float, float]:
    """(worst lag of a 5 ms ticker, the work's duration) while `work()` runs."""
    lags: list[float] = []
    done = anyio.Event()

    async def ticker() -> None:
        while not done.is_set():
            t0 = time.perf_counter()
            await anyio.sleep(TICK)
            lags.append(time.perf_counter() - t0 - TICK)

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        # the ticker is measuring before the work starts, not from some moment during it
        await eventually(lambda: lags, "the ticker's first tick", every=TICK)
        t0 = time.perf_counter()
        await work()
        took = time.perf_counter() - t0
        done.set()
    return max(lags), took


async def test_scorecard_leaves_the_loop_free(big_store: tuple[Store, float]) -> None:
    store, _ = big_store
    worst, took = await _worst_lag_while(partial(scorecard.compute, store, FLEET))
    assert took >= MIN_SCORECARD, f"scorecard took {took:.3f}s: the store is too small to tell"
    assert worst < took / 4, f"loop stalled {worst * 1000:.0f} ms in a {took * 1000:.0f} ms card"


async def test_scorecard_off_the_loop_equals_on_the_loop(
    big_store: tuple[Store, float], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _ = big_store
    off = await scorecard.compute(store, FLEET)
    shadow_off = await scorecard.shadow(store, FLEET)
    # The backend-neutral path: the same queries on the loop's own connection.
    monkeypatch.setattr(
        store.backend, "read_off_loop", partial(Backend.read_off_loop, store.backend)
    )
    on = await scorecard.compute(store, FLEET)
    assert off.as_dict() == on.as_dict()
    assert await scorecard.shadow(store, FLEET) == shadow_off
    assert off.total["cycles"] > 100_000 and off.total["denials"] > 0
    assert len(off.windows) == 40


async def test_replay_pages_off_the_loop_equal_on_the_loop(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both backends; 2,500 events: several of Postgres's cursor pages, in order, decoded."""
    session, _ = await store.open_window(fleet=FLEET, key="r", starts_at=T0,
                                         ends_at=T0 + timedelta(hours=1), max_cost=None,
                                         max_actions=None, by="test")  # fmt: skip
    async with storetools.transaction(store) as tx:
        for n in range(2500):
            await store.append_in(tx, NewEvent(kind=CYCLE_COMPLETED, session_id=session.id,
                                               payload={"n": n}, worker="w"))  # fmt: skip
    off = await store.replay(session.id, 0, 10_000)
    later = await store.replay(session.id, 1000, 700)
    monkeypatch.setattr(
        store.backend, "read_off_loop", partial(Backend.read_off_loop, store.backend)
    )
    assert await store.replay(session.id, 0, 10_000) == off
    assert [e.seq for e in later] == list(range(1001, 1701))
    assert [e.payload.get("n") for e in off[1:]] == list(range(2500))  # after WINDOW_OPENED
    assert off[0].created_at.tzinfo is not None
