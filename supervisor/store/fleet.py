"""The fleet aggregate: hosts, leases (leader and worker slots) and worker rows.

Lease times come from the caller, read from the database's clock (`db_now`): every host then
compares expiries with the same clock, whatever its own says."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .base import Fence, Row, StoreCore, plain_row
from .records import HostStatus


@dataclass(frozen=True, slots=True)
class HostRecord:
    """One host's row: the incarnation (instance, pid) that holds its host id, and its beat."""

    fleet: str
    host_id: str
    instance: str
    pid: int
    started_at: datetime
    heartbeat_at: datetime
    status: HostStatus

    @classmethod
    def from_row(cls, row: Row) -> HostRecord:
        return cls(
            fleet=row["fleet"], host_id=row["host_id"], instance=row["instance"],
            pid=int(row["pid"]), started_at=row["started_at"], heartbeat_at=row["heartbeat_at"],
            status=HostStatus(row["status"]),
        )  # fmt: skip

    def fresh(self, after: datetime) -> bool:
        """Running, with a heartbeat later than `after` (the lease time ago)."""
        return self.status == HostStatus.RUNNING and self.heartbeat_at > after

    def as_dict(self) -> dict[str, Any]:
        return {**plain_row({k: getattr(self, k) for k in self.__slots__}),
                "status": self.status.value}  # fmt: skip


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """A lease: `leader:<fleet>` or `slot:<fleet>:<instance>`, held by `<host_id>/<instance>`."""

    name: str
    holder: str
    token: int
    expires_at: datetime

    @classmethod
    def from_row(cls, row: Row) -> LeaseRecord:
        return cls(name=row["name"], holder=row["holder"], token=int(row["token"]),
                   expires_at=row["expires_at"])  # fmt: skip

    @property
    def host_id(self) -> str:
        return self.holder.split("/")[0]

    @property
    def is_leader(self) -> bool:
        return self.name.startswith("leader:")

    @property
    def slot(self) -> str | None:
        """The worker instance of a slot lease, None for the leader lease."""
        return self.name.split(":", 2)[2] if self.name.startswith("slot:") else None

    def as_dict(self) -> dict[str, Any]:
        return plain_row({k: getattr(self, k) for k in self.__slots__})


@dataclass(frozen=True, slots=True)
class HostView:
    """A host with what it holds now: whether it leads, and its worker slots."""

    host: HostRecord
    leader: bool
    slots: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {**self.host.as_dict(), "leader": self.leader, "slots": list(self.slots)}


@dataclass(frozen=True, slots=True)
class WorkerRecord:
    """A worker instance as its host last reported it (cycle -1: it never ran a cycle)."""

    fleet: str
    name: str
    host: str
    state: str  # the fleet's WorkerStatus.state: starting | running | backoff | stopped | ...
    restarts: int
    last_error: str | None
    cycle: int
    session_id: str | None
    updated_at: datetime

    @classmethod
    def from_row(cls, row: Row) -> WorkerRecord:
        return cls(
            fleet=row["fleet"], name=row["name"], host=row["host"], state=row["state"],
            restarts=int(row["restarts"]), last_error=row["last_error"], cycle=int(row["cycle"]),
            session_id=row["session_id"], updated_at=row["updated_at"],
        )  # fmt: skip

    def as_dict(self) -> dict[str, Any]:
        return plain_row({k: getattr(self, k) for k in self.__slots__})


class FleetRepo(StoreCore):
    # -- hosts --------------------------------------------------------------------------------

    async def get_host(self, *, fleet: str, host_id: str) -> HostRecord | None:
        row = await self._fetchrow("get_host", fleet, host_id)
        return HostRecord.from_row(row) if row else None

    async def list_hosts(self, fleet: str) -> list[HostRecord]:
        return [HostRecord.from_row(r) for r in await self._fetchall("list_hosts", fleet)]

    async def take_host(
        self, *, fleet: str, host_id: str, instance: str, pid: int, at: datetime,
        replaces: str | None = None,
    ) -> None:  # fmt: skip
        """This incarnation takes the host row (running, heartbeat `at`). `replaces`: the dead
        incarnation it follows, whose leases are released in the same transaction, so its
        workers and duties restart now rather than after the lease time."""
        async with self._transaction() as tx:
            if replaces is not None:
                await tx.execute("release_holder_leases", at, f"{host_id}/{replaces}")
            await tx.execute("upsert_host", fleet, host_id, instance, pid, at, at)

    async def beat_host(self, *, fleet: str, host_id: str, instance: str, at: datetime) -> bool:
        """Renew the host row's heartbeat; False when another incarnation has taken it over."""
        async with self._transaction() as tx:
            mine = await tx.fetchrow("host_heartbeat", at, fleet, host_id, instance)
        return mine is not None

    async def stop_host(
        self, *, fleet: str, host_id: str, instance: str, holder: str, leases: Sequence[str],
        at: datetime,
    ) -> None:  # fmt: skip
        """Give `leases` back and mark the host stopped, in one transaction."""
        async with self._transaction() as tx:
            for name in leases:
                await tx.execute("release_lease", at, name, holder)
            await tx.execute("host_stopped", at, fleet, host_id, instance)

    async def live_host_count(self, *, fleet: str, after: datetime) -> int:
        """Hosts running with a heartbeat later than `after`."""
        row = await self._fetchrow("live_hosts", fleet, after)
        return int(row["n"]) if row else 0

    # -- leases -------------------------------------------------------------------------------

    async def acquire_lease(
        self, *, name: str, holder: str, expires_at: datetime, now: datetime
    ) -> Fence | None:
        """Take or renew a lease (free, expired by `now`, or already `holder`'s) until
        `expires_at`. The token goes up whenever the holder changes; None when another holds it."""
        async with self._transaction() as tx:
            row = await tx.fetchrow("acquire_lease", name, holder, expires_at, now)
        return Fence(name, holder, int(row["token"])) if row else None

    async def release_lease(self, *, name: str, holder: str, at: datetime) -> None:
        """Expire the lease at `at` if `holder` still holds it, so another host takes it now."""
        async with self._transaction() as tx:
            await tx.execute("release_lease", at, name, holder)

    async def list_leases(self, fleet: str) -> list[LeaseRecord]:
        """The fleet's leases, expired ones included, by name."""
        rows = await self._fetchall("list_leases", f"%:{fleet}%")
        return [LeaseRecord.from_row(r) for r in rows]

    async def host_views(self, fleet: str) -> list[HostView]:
        """Each host with the unexpired leases it holds (by the database's clock)."""
        hosts = await self.list_hosts(fleet)
        leases = await self.list_leases(fleet)
        now = await self.db_now()
        views = []
        for host in hosts:
            held = [x for x in leases if x.host_id == host.host_id and x.expires_at > now]
            slots = tuple(sorted(s for x in held if (s := x.slot) is not None))
            views.append(HostView(host, any(x.is_leader for x in held), slots))
        return views

    # -- workers ------------------------------------------------------------------------------

    async def record_worker(
        self, *, fleet: str, name: str, host: str, state: str, restarts: int,
        last_error: str | None, cycle: int, session_id: str | None, at: datetime,
    ) -> None:  # fmt: skip
        """Upsert a worker instance's row (what `status` and the console show)."""
        async with self._transaction() as tx:
            await tx.execute("upsert_worker", fleet, name, host, state, restarts, last_error,
                             cycle, session_id, at)  # fmt: skip

    async def list_workers(self, fleet: str) -> list[WorkerRecord]:
        return [WorkerRecord.from_row(r) for r in await self._fetchall("list_workers", fleet)]
