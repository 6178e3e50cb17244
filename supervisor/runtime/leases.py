"""Several hosts, one fleet: host registration and heartbeat, the leader lease that holds the
singleton duties (rotation, recovery, escalation, alerts), and leased worker slots.

Leases are rows with an expiry timed by the database's clock (Postgres `now()`), renewed on every
heartbeat. A host that dies stops renewing; after the lease time another host takes its leases
over. Every write of a singleton duty runs under a Fence (lease name, holder, token), checked in
the same transaction, so a host that lost its lease cannot write late.
"""

from __future__ import annotations

import math
import os
import uuid
from datetime import datetime, timedelta

import structlog

from ..errors import UsageError
from ..store import Store
from ..store.base import Fence
from ..store.records import HostStatus

log = structlog.get_logger(__name__)


def slot_lease(fleet: str, instance: str) -> str:
    return f"slot:{fleet}:{instance}"


def leader_lease(fleet: str) -> str:
    return f"leader:{fleet}"


def _alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (permission errors: it does)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


class Coordinator:
    def __init__(
        self, store: Store, *, fleet: str, host_id: str, lease_ttl: float, heartbeat: float
    ) -> None:
        if lease_ttl <= heartbeat:
            raise UsageError(
                f"lease time ({lease_ttl}s) must be longer than the heartbeat ({heartbeat}s)"
            )
        self.store = store
        self.fleet = fleet
        self.host_id = host_id
        self.instance = uuid.uuid4().hex[:12]
        self.holder = f"{host_id}/{self.instance}"
        self.ttl = timedelta(seconds=lease_ttl)
        self.heartbeat = heartbeat
        self.leader: Fence | None = None
        self.slots: dict[str, Fence] = {}
        self.last_beat: datetime | None = None

    @property
    def is_leader(self) -> bool:
        return self.leader is not None

    async def register(self) -> None:
        """Refuse a second live daemon with the same host id; else take the host row."""
        now = await self.store.db_now()
        host = await self.store.get_host(fleet=self.fleet, host_id=self.host_id)
        if host is not None and host.fresh(now - self.ttl) and _alive(host.pid):
            # (A recorded pid that no longer exists here is this host's previous incarnation,
            # killed or crashed: the restart replaces it. Refusing would keep a crashed host
            # down, since exit 2 is not restarted by systemd. Should the row belong to another
            # machine misconfigured with the same host id, its next heartbeat finds it taken.)
            age = (now - host.heartbeat_at).total_seconds()
            raise UsageError(
                f"host id {self.host_id!r} is already running in fleet {self.fleet!r} "
                f"(pid {host.pid}, heartbeat {age:.1f}s ago): give each host its own host_id"
            )
        # The previous incarnation's leases go with it (its pid is gone), so workers and duties
        # restart now rather than after the lease time.
        dead = (
            host.instance
            if host is not None
            and host.status == HostStatus.RUNNING
            and host.instance != self.instance
            else None
        )
        await self.store.take_host(fleet=self.fleet, host_id=self.host_id,
                                   instance=self.instance, pid=os.getpid(), at=now,
                                   replaces=dead)  # fmt: skip
        self.last_beat = now

    async def _acquire(self, name: str, now: datetime) -> Fence | None:
        return await self.store.acquire_lease(
            name=name, holder=self.holder, expires_at=now + self.ttl, now=now
        )

    async def beat(self, slots: list[str]) -> tuple[list[str], list[str]]:
        """Renew, take over and balance. Returns (slots gained, slots to give up)."""
        now = await self.store.db_now()
        if not await self.store.beat_host(
            fleet=self.fleet, host_id=self.host_id, instance=self.instance, at=now
        ):
            raise UsageError(f"host id {self.host_id!r} was taken over by another daemon")
        self.last_beat = now
        was_leader = self.is_leader
        self.leader = await self._acquire(leader_lease(self.fleet), now)
        if self.is_leader != was_leader:
            log.info(
                "lease.leader",
                held=self.is_leader,
                token=self.leader.token if self.leader else None,
            )
        lost = []
        for instance in list(self.slots):
            fence = await self._acquire(slot_lease(self.fleet, instance), now)
            if fence is None:
                lost.append(instance)
                del self.slots[instance]
        live = await self.store.live_host_count(fleet=self.fleet, after=now - self.ttl)
        hosts = max(1, live)
        fair = math.ceil(len(slots) / hosts)
        gained: list[str] = []
        # A host-specific order spreads first picks across hosts.
        order = sorted(slots, key=lambda s: hash((self.holder, s)))
        for instance in order:
            if len(self.slots) >= fair:
                break
            if instance in self.slots:
                continue
            fence = await self._acquire(slot_lease(self.fleet, instance), now)
            if fence is not None:
                self.slots[instance] = fence
                gained.append(instance)
        excess = len(self.slots) - fair
        shed = sorted(self.slots)[:excess] if excess > 0 else []
        for instance in [s for s in self.slots if s not in slots]:
            shed.append(instance)  # removed from the config
        return gained, lost + shed

    async def release(self, instance: str) -> None:
        fence = self.slots.pop(instance, None)
        if fence is None:
            return
        now = await self.store.db_now()
        await self.store.release_lease(name=fence.lease, holder=self.holder, at=now)

    async def stop(self) -> None:
        """Give every lease back at once, so other hosts take over without waiting."""
        now = await self.store.db_now()
        held = [*self.slots.values(), *([self.leader] if self.leader else [])]
        await self.store.stop_host(fleet=self.fleet, host_id=self.host_id, instance=self.instance,
                                   holder=self.holder, leases=[f.lease for f in held],
                                   at=now)  # fmt: skip
        self.slots.clear()
        self.leader = None
