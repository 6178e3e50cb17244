"""What tests need of the store beyond its operations: a switch target for direct calls of the
actions aggregate, and raw access to rows (to forge what an adversary would, or to read a
column no operation returns). The daemon never does either."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import anyio.to_thread

from supervisor.store import Store, Tx
from supervisor.store.switches import SwitchTarget

# No store switch is engaged where this is used: the target only has to be well-formed.
NO_SWITCH_TARGET = SwitchTarget(worker="w", session_id="s")


async def fetchrow(store: Store, name: str, *args: Any) -> dict[str, Any] | None:
    """One row of a named query, read outside any operation."""
    async with store.backend.reader() as tx:
        return await tx.fetchrow(name, *args)


async def fetchall(store: Store, name: str, *args: Any) -> list[dict[str, Any]]:
    async with store.backend.reader() as tx:
        return await tx.fetchall(name, *args)


@asynccontextmanager
async def transaction(store: Store) -> AsyncIterator[Tx]:
    """A raw write transaction: for a test that forges rows the store would never write."""
    async with store.backend.transaction() as tx:
        yield tx


async def write_switch(
    store: Store, fleet: str, scope: str, target: str, mode: str, reason: str, by: str,
    at: datetime,
) -> None:  # fmt: skip
    """A switch row written as another process would (a CLI's engage, an adversary's forgery):
    on SQLite through a connection of its own, so this store learns of it the way it learns of
    theirs (the connection's data_version moves), not through its own writes."""
    if store.dialect != "sqlite":
        async with store.backend.transaction() as tx:
            await tx.execute("upsert_kill_switch", fleet, scope, target, mode, reason, by, at)
        return
    from supervisor.store.queries import load_queries
    from supervisor.store.sqlite import SQLiteBackend

    backend = store.backend
    assert isinstance(backend, SQLiteBackend)
    sql = load_queries("sqlite")["upsert_kill_switch"]

    def write() -> None:
        conn = sqlite3.connect(backend.path, timeout=10, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(sql, (fleet, scope, target, mode, reason, by,
                               at.astimezone(UTC).isoformat(timespec="microseconds")))  # fmt: skip
            conn.execute("COMMIT")
        finally:
            conn.close()

    # The store's own connection may hold the write lock (an open batch) until its COMMIT.
    await anyio.to_thread.run_sync(write)
