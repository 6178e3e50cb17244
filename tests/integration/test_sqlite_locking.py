"""SQLite writes never block the event loop on another process's lock: BEGIN IMMEDIATE runs on
the loop when the lock is free and waits in a thread only when someone else holds it."""

from __future__ import annotations

import sqlite3
import threading
import time

import anyio
import pytest

from supervisor.store import NewEvent, open_store
from supervisor.store.sqlite import parse_sqlite_url
from supervisor.timing.clock import SystemClock

pytestmark = pytest.mark.anyio


async def test_a_write_waits_for_another_process_then_commits(sqlite_url: str) -> None:
    store = await open_store(sqlite_url, SystemClock(), migrate=True)
    other = sqlite3.connect(
        parse_sqlite_url(sqlite_url)[0], isolation_level=None, check_same_thread=False
    )
    other.execute("BEGIN IMMEDIATE")
    release = threading.Timer(0.4, lambda: other.execute("ROLLBACK"))
    release.start()
    ticks = 0

    async def ticker() -> None:  # the loop stays free while the write waits
        nonlocal ticks
        while True:
            await anyio.sleep(0.02)
            ticks += 1

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            started = time.monotonic()
            seq = await store.append(NewEvent(kind="X", session_id="s"))
            waited = time.monotonic() - started
            tg.cancel_scope.cancel()
        assert seq == 1
        assert 0.3 <= waited < 5
        assert ticks >= 10, "the event loop was blocked while the write waited"
    finally:
        release.join()
        other.close()
        await store.close()


async def test_opening_waits_for_a_lock_another_process_holds_for_a_moment(sqlite_url: str) -> None:
    """A daemon restarted after a crash opens the database while a CLI read or another open
    holds a lock for a moment (rebuilding the WAL index, switching to WAL): it waits, in a
    thread, instead of exiting with "database is locked"."""
    store = await open_store(sqlite_url, SystemClock(), migrate=True)
    await store.append(NewEvent(kind="X", session_id="s"))
    await store.close()
    other = sqlite3.connect(
        parse_sqlite_url(sqlite_url)[0], isolation_level=None, check_same_thread=False
    )
    other.execute("PRAGMA locking_mode=EXCLUSIVE")  # holds the file against every reader
    other.execute("BEGIN EXCLUSIVE")
    other.execute("SELECT count(*) FROM events").fetchall()

    def let_go() -> None:
        other.execute("COMMIT")
        other.close()  # an exclusive-mode connection lets go of the file when it closes

    release = threading.Timer(0.4, let_go)
    release.start()
    try:
        started = time.monotonic()
        with anyio.fail_after(10):
            reopened = await open_store(sqlite_url, SystemClock())
        try:
            assert time.monotonic() - started >= 0.3
            assert [e.kind for e in await reopened.replay("s")] == ["X"]
        finally:
            await reopened.close()
    finally:
        release.join()
        other.close()
