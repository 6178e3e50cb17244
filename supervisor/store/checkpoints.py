"""The checkpoints aggregate: each worker's saved state and its resume point."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .. import events as ev
from ..actions import canonical_json
from .base import NewEvent, Row, StoreCore, json_object, system_stream, unreadable


@dataclass(frozen=True, slots=True)
class Checkpoint:
    id: int
    fleet: str
    worker: str
    cycle: int
    session_id: str | None
    state: dict[str, Any]
    counters: dict[str, Any]
    last_seq: int
    created_at: datetime

    @classmethod
    def from_row(cls, row: Row) -> Checkpoint:
        what = f"checkpoint {row['id']}"
        try:
            return cls(
                id=int(row["id"]), fleet=row["fleet"], worker=row["worker"],
                cycle=int(row["cycle"]), session_id=row["session_id"],
                state=json_object(row["state"]),
                counters=json_object(row["counters"]), last_seq=int(row["last_seq"]),
                created_at=row["created_at"],
            )  # fmt: skip
        except (TypeError, ValueError) as exc:
            raise unreadable(what, exc) from exc

    def as_dict(self) -> dict[str, Any]:
        # Without the fleet: a listing is always of one fleet (`checkpoints list --json`).
        return {"id": self.id, "worker": self.worker, "cycle": self.cycle,
                "session_id": self.session_id, "state": self.state, "counters": self.counters,
                "last_seq": self.last_seq, "created_at": self.created_at.isoformat()}  # fmt: skip


class CheckpointsRepo(StoreCore):
    async def save_checkpoint(
        self, *, fleet: str, worker: str, cycle: int, session_id: str | None,
        state: Mapping[str, Any], counters: Mapping[str, Any],
        pending: Iterable[tuple[NewEvent, datetime]] = (),
    ) -> int:  # fmt: skip
        """Insert a checkpoint and its CHECKPOINT event; returns its id. `pending` telemetry of
        the cycles it covers commits with it, so after a crash the cycles re-run from this
        checkpoint are exactly those not recorded."""
        async with self._transaction() as tx:
            await self.append_many_in(tx, list(pending))
            seq_row = await tx.fetchrow("stream_seq", session_id) if session_id else None
            last_seq = int(seq_row["last_seq"]) if seq_row else 0
            row = await tx.fetchrow(
                "insert_checkpoint", fleet, worker, cycle, session_id,
                canonical_json(dict(state)), canonical_json(dict(counters)), last_seq,
                self.clock.now(),
            )  # fmt: skip
            assert row is not None
            checkpoint_id = int(row["id"])
            await self.append_in(
                tx,
                NewEvent(kind=ev.CHECKPOINT, session_id=session_id or system_stream(fleet),
                         payload={"checkpoint": checkpoint_id, "cycle": cycle}, worker=worker),
            )  # fmt: skip
        return checkpoint_id

    async def get_checkpoint(self, checkpoint_id: int) -> Checkpoint | None:
        row = await self._fetchrow("get_checkpoint", checkpoint_id)
        return Checkpoint.from_row(row) if row else None

    async def resume_point(self, *, fleet: str, worker: str) -> Checkpoint | None:
        """The checkpoint a worker starts from: the one an operator restored, else its latest."""
        async with self.backend.reader() as tx:
            pinned = await tx.fetchrow("get_resume_point", fleet, worker)
            if pinned is not None:
                row = await tx.fetchrow("get_checkpoint", pinned["checkpoint_id"])
                if row is not None:
                    return Checkpoint.from_row(row)
            row = await tx.fetchrow("latest_checkpoint", fleet, worker)
        return Checkpoint.from_row(row) if row else None

    async def clear_resume_point(self, *, fleet: str, worker: str, checkpoint_id: int) -> None:
        """The worker started from `checkpoint_id`: drop that pin (a newer restore stays)."""
        async with self._transaction() as tx:
            await tx.execute("clear_resume_point", fleet, worker, checkpoint_id)

    async def list_checkpoints(self, fleet: str, *, limit: int = 1000) -> list[Checkpoint]:
        """Newest first."""
        rows = await self._fetchall("list_checkpoints", fleet, limit)
        return [Checkpoint.from_row(r) for r in rows]

    async def restore_checkpoint(
        self, *, fleet: str, checkpoint_id: int, by: str
    ) -> Checkpoint | None:
        """Pin a checkpoint as its worker's resume point, with the ROLLBACK event, in one
        transaction; None when the fleet has no such checkpoint. Effects are not undone."""
        async with self._transaction() as tx:
            row = await tx.fetchrow("get_checkpoint", checkpoint_id)
            if row is None or row["fleet"] != fleet:
                return None
            checkpoint = Checkpoint.from_row(row)
            await tx.execute("set_resume_point", fleet, checkpoint.worker, checkpoint_id)
            await self.append_in(
                tx,
                NewEvent(
                    kind=ev.ROLLBACK, session_id=system_stream(fleet),
                    payload={"checkpoint": checkpoint_id, "cycle": checkpoint.cycle, "by": by,
                             "note": "effects after this checkpoint are not undone"},
                    worker=checkpoint.worker,
                ),
            )  # fmt: skip
        return checkpoint
