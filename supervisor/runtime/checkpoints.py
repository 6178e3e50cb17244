"""Checkpoints: each worker's state every N cycles, its restart and rollback point.

A fleet's view of the store's checkpoints aggregate (supervisor/store/checkpoints.py)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from ..errors import NotFound
from ..store import NewEvent, Store
from ..store.checkpoints import Checkpoint

__all__ = ["Checkpoint", "Checkpoints"]


class Checkpoints:
    def __init__(self, store: Store, fleet: str) -> None:
        self.store = store
        self.fleet = fleet

    async def save(
        self,
        worker: str,
        *,
        cycle: int,
        session_id: str | None,
        state: Mapping[str, Any],
        counters: Mapping[str, Any],
        pending: list[tuple[NewEvent, datetime]] | None = None,
    ) -> int:
        """Insert a checkpoint; `pending` telemetry of the cycles it covers commits with it, so
        after a crash the cycles re-run from this checkpoint are exactly those not recorded."""
        return await self.store.save_checkpoint(
            fleet=self.fleet, worker=worker, cycle=cycle, session_id=session_id, state=state,
            counters=counters, pending=pending or (),
        )  # fmt: skip

    async def resume_point(self, worker: str) -> Checkpoint | None:
        """A restored checkpoint if an operator chose one, else the latest."""
        return await self.store.resume_point(fleet=self.fleet, worker=worker)

    async def consumed(self, worker: str, checkpoint_id: int) -> None:
        await self.store.clear_resume_point(
            fleet=self.fleet, worker=worker, checkpoint_id=checkpoint_id
        )

    async def list(self, limit: int = 1000) -> list[Checkpoint]:
        return await self.store.list_checkpoints(self.fleet, limit=limit)

    async def restore(self, checkpoint_id: int, *, by: str) -> Checkpoint:
        """Make a checkpoint the worker's resume point. Effects already done are not undone."""
        checkpoint = await self.store.restore_checkpoint(
            fleet=self.fleet, checkpoint_id=checkpoint_id, by=by
        )
        if checkpoint is None:
            raise NotFound(f"unknown checkpoint {checkpoint_id}")
        return checkpoint
