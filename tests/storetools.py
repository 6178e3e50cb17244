"""What tests need of the store beyond its operations: a switch target for direct calls of the
actions aggregate, and raw access to rows (to forge what an adversary would, or to read a
column no operation returns). The daemon never does either."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

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
