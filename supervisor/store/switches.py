"""The kill switches as stored: the fleet, session and worker switches, the engage protocol's
lock, and each host's replay mark for its host switch."""

from __future__ import annotations

from .base import StoreCore


class SwitchesRepo(StoreCore):
    async def host_switch_mark(self, fleet: str, host: str) -> int:
        """The highest host kill-switch seq this host ever accepted (0: none)."""
        row = await self._fetchrow("host_switch_mark", fleet, host)
        return int(row["seq"]) if row is not None else 0

    async def raise_host_switch_mark(self, fleet: str, host: str, seq: int) -> None:
        async with self._transaction() as tx:
            await tx.execute("raise_host_switch_mark", fleet, host, seq, self.clock.now())
