"""Postgres aborts one of two transactions that wait on each other (a deadlock). Nothing of it
was written, so the store runs it again instead of failing the work: two hosts' twins of one
alert, say, that took the ledger row and the stream row in opposite orders (a host of the last
release and one of this, during a rolling upgrade)."""

from __future__ import annotations

import anyio
import pytest

from supervisor.store import open_store
from supervisor.store.base import COMMAND_TRIES
from supervisor.timing.clock import SystemClock

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]


async def test_a_transaction_aborted_for_a_deadlock_is_run_again(pg_url: str) -> None:
    stores = [await open_store(pg_url, SystemClock()) for _ in range(2)]
    first_claims = [anyio.Event(), anyio.Event()]
    claimed: dict[int, list[bool]] = {0: [], 1: []}

    async def twin(i: int) -> None:
        store = stores[i]
        mine, theirs = f"k{i}", f"k{1 - i}"

        async def attempt(n: int) -> None:
            claimed[i].clear()
            async with store.backend.transaction() as tx:
                for key in (mine, theirs):
                    row = await tx.fetchrow("claim_command", key, "test", "h", "{}",
                                            store.clock.now())  # fmt: skip
                    claimed[i].append(row is not None)
                    if n == 0 and key == mine:
                        # Each holds its own row, then asks for the other's: a cycle.
                        first_claims[i].set()
                        await first_claims[1 - i].wait()

        await store.retrying(attempt, what="claims", tries=COMMAND_TRIES)

    try:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(twin, 0)
                tg.start_soon(twin, 1)
    finally:
        for store in stores:
            await store.close()
    # The survivor claimed both rows; the one Postgres aborted ran again and found them taken.
    assert sorted(map(tuple, claimed.values())) == [(False, False), (True, True)]
