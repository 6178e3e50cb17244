"""The runs aggregate: one row per `run`, continuous or a horizon, its start and end."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .. import events as ev
from ..actions import derive_id
from .base import NewEvent, Row, StoreCore, Tx, system_stream
from .records import RunStatus


@dataclass(frozen=True, slots=True)
class RunRecord:
    id: str
    fleet: str
    horizon: str
    simulated: bool
    seed: int
    starts_at: datetime
    ends_at: datetime
    status: RunStatus
    created_at: datetime
    finished_at: datetime | None

    @classmethod
    def from_row(cls, row: Row) -> RunRecord:
        return cls(
            id=row["id"], fleet=row["fleet"], horizon=row["horizon"],
            simulated=bool(row["simulated"]), seed=int(row["seed"]), starts_at=row["starts_at"],
            ends_at=row["ends_at"], status=RunStatus(row["status"]), created_at=row["created_at"],
            finished_at=row["finished_at"],
        )  # fmt: skip


class RunsRepo(StoreCore):
    async def get_run(self, run_id: str) -> RunRecord | None:
        row = await self._fetchrow("get_run", run_id)
        return RunRecord.from_row(row) if row else None

    async def unfinished_run(
        self, *, fleet: str, horizon: str, simulated: bool
    ) -> RunRecord | None:
        """The newest run of this horizon still running (a crashed one, to resume)."""
        row = await self._fetchrow("unfinished_run", fleet, horizon, simulated)
        return RunRecord.from_row(row) if row else None

    async def last_run(self, *, fleet: str, simulated: bool) -> RunRecord | None:
        """The run that ends last, finished or not."""
        row = await self._fetchrow("latest_run", fleet, simulated)
        return RunRecord.from_row(row) if row else None

    async def start_run(
        self, *, run_id: str, fleet: str, horizon: str, simulated: bool, seed: int,
        starts_at: datetime, ends_at: datetime, created_at: datetime,
    ) -> bool:  # fmt: skip
        """The run's row and its RUN_STARTED event, once per run id, in one transaction: a
        crash cannot leave a run without its start. True if this call started it.

        The event is stamped by the store's clock: a simulated run sets its virtual clock
        first. The command id and operation are those `once` gave the event on its own."""
        command_id = derive_id("run.started", run_id)

        async def body(tx: Tx) -> dict[str, Any]:
            await tx.execute("insert_run", run_id, fleet, horizon, simulated, seed, starts_at,
                             ends_at, created_at)  # fmt: skip
            await self.append_in(
                tx,
                NewEvent(kind=ev.RUN_STARTED, session_id=system_stream(fleet),
                         payload={"run": run_id, "horizon": horizon, "simulated": simulated,
                                  "seed": seed, "start": starts_at.isoformat(),
                                  "end": ends_at.isoformat()}),
            )  # fmt: skip
            return {}

        _r, fresh = await self.run_command(command_id, f"once:{ev.RUN_STARTED}", {}, body)
        return fresh

    async def finish_run(self, *, run_id: str, fleet: str, at: datetime) -> bool:
        """Mark a running run finished at `at`, with its RUN_FINISHED event, in one
        transaction. True if this call finished it (False: already finished, or unknown)."""
        async with self._transaction() as tx:
            if await tx.fetchrow("finish_run", at, run_id) is None:
                return False
            await self.append_in(tx, NewEvent(kind=ev.RUN_FINISHED,
                                              session_id=system_stream(fleet),
                                              payload={"run": run_id}))  # fmt: skip
        return True
