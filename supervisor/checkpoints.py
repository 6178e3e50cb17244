"""Checkpoints: each worker's state every N cycles, its restart and rollback point."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from . import events as ev
from .actions import canonical_json
from .errors import NotFound
from .store import NewEvent, Store, system_stream
from .store.base import Row


@dataclass(frozen=True, slots=True)
class Checkpoint:
    id: int
    worker: str
    cycle: int
    session_id: str | None
    state: dict[str, Any]
    counters: dict[str, Any]
    last_seq: int
    created_at: datetime

    @classmethod
    def from_row(cls, row: Row) -> Checkpoint:
        return cls(
            id=int(row["id"]), worker=row["worker"], cycle=int(row["cycle"]),
            session_id=row["session_id"], state=json.loads(row["state"]),
            counters=json.loads(row["counters"]), last_seq=int(row["last_seq"]),
            created_at=row["created_at"],
        )  # fmt: skip

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "worker": self.worker, "cycle": self.cycle,
                "session_id": self.session_id, "state": self.state, "counters": self.counters,
                "last_seq": self.last_seq, "created_at": self.created_at.isoformat()}  # fmt: skip


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
        async with self.store.transaction() as tx:
            for event, at in pending or ():
                await self.store.append_in(tx, event, at)
            seq_row = await tx.fetchrow("stream_seq", session_id) if session_id else None
            last_seq = int(seq_row["last_seq"]) if seq_row else 0
            row = await tx.fetchrow(
                "insert_checkpoint", self.fleet, worker, cycle, session_id,
                canonical_json(dict(state)), canonical_json(dict(counters)), last_seq,
                self.store.clock.now(),
            )  # fmt: skip
            assert row is not None
            checkpoint_id = int(row["id"])
            await self.store.append_in(
                tx,
                NewEvent(kind=ev.CHECKPOINT, session_id=session_id or system_stream(self.fleet),
                         payload={"checkpoint": checkpoint_id, "cycle": cycle}, worker=worker),
            )  # fmt: skip
        return checkpoint_id

    async def resume_point(self, worker: str) -> Checkpoint | None:
        """A restored checkpoint if an operator chose one, else the latest."""
        pinned = await self.store.fetchrow("get_resume_point", self.fleet, worker)
        if pinned is not None:
            row = await self.store.fetchrow("get_checkpoint", pinned["checkpoint_id"])
            if row is not None:
                return Checkpoint.from_row(row)
        row = await self.store.fetchrow("latest_checkpoint", self.fleet, worker)
        return Checkpoint.from_row(row) if row else None

    async def consumed(self, worker: str, checkpoint_id: int) -> None:
        async with self.store.transaction() as tx:
            await tx.execute("clear_resume_point", self.fleet, worker, checkpoint_id)

    async def list(self, limit: int = 1000) -> list[Checkpoint]:
        rows = await self.store.fetchall("list_checkpoints", self.fleet, limit)
        return [Checkpoint.from_row(r) for r in rows]

    async def restore(self, checkpoint_id: int, *, by: str) -> Checkpoint:
        """Make a checkpoint the worker's resume point. Effects already done are not undone."""
        row = await self.store.fetchrow("get_checkpoint", checkpoint_id)
        if row is None or row["fleet"] != self.fleet:
            raise NotFound(f"unknown checkpoint {checkpoint_id}")
        checkpoint = Checkpoint.from_row(row)
        async with self.store.transaction() as tx:
            await tx.execute("set_resume_point", self.fleet, checkpoint.worker, checkpoint_id)
            await self.store.append_in(
                tx,
                NewEvent(
                    kind=ev.ROLLBACK, session_id=system_stream(self.fleet),
                    payload={"checkpoint": checkpoint_id, "cycle": checkpoint.cycle, "by": by,
                             "note": "effects after this checkpoint are not undone"},
                    worker=checkpoint.worker,
                ),
            )  # fmt: skip
        return checkpoint
