"""The kill switches as stored: the fleet, session and worker switches, which of them reach an
action, the engage protocol's write, and each host's replay mark for its host switch.

What is decided here is decided from what the caller passes (`SwitchTarget`: the action's
worker, window and criticality, and the host's switch file to read), never by calling back into
the gate."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from datetime import datetime

from ..killswitch.hostfile import HostSwitchFile
from ..killswitch.modes import Mode, host_verdict, permits, strictest
from .base import NewEvent, Row, StoreCore, Tx


@dataclass(frozen=True, slots=True)
class SwitchRecord:
    scope: str  # fleet | session | worker
    target: str  # '' for the fleet; a session id; a worker instance or configured name
    mode: Mode  # an unknown stored mode reads as halt_all: a forged row fails closed
    stored_mode: str  # the text as stored, for display
    reason: str | None = None
    changed_by: str | None = None
    updated_at: datetime | None = None

    @classmethod
    def from_row(cls, row: Row) -> SwitchRecord:
        try:
            mode = Mode(row["mode"])
        except ValueError:
            mode = Mode.HALT_ALL
        return cls(scope=row["scope"], target=row["target"], mode=mode, stored_mode=row["mode"],
                   reason=row.get("reason"), changed_by=row.get("changed_by"),
                   updated_at=row.get("updated_at"))  # fmt: skip

    @classmethod
    def of(cls, scope: str, target: str, mode: str) -> SwitchRecord:
        """A record from its three deciding fields (tests, and rows built by hand)."""
        return cls.from_row({"scope": scope, "target": target, "mode": mode})


@dataclass(frozen=True, slots=True)
class SwitchTarget:
    """Which store switches reach one action: the fleet's, its window's, and its worker's by
    instance name or, as `group`, by the configured name of a replicated worker."""

    worker: str
    session_id: str
    group: str | None = None
    critical: bool = False
    # The host's switch file, read again where the verdict is taken (a file, not the gate).
    host: HostSwitchFile | None = None
    # Why the fleet's own switch cannot be read, when it cannot (then it counts as halt_all).
    fleet_unknown: str | None = None

    def reached_by(self, record: SwitchRecord) -> bool:
        return (
            record.scope == "fleet"
            or (record.scope == "session" and record.target == self.session_id)
            or (record.scope == "worker" and record.target in (self.worker, self.group))
        )


def fleet_unknown_verdict(reason: str) -> str:
    """The verdict while the fleet's own switch cannot be read: it counts as halt_all."""
    return f"fleet switch unknown ({reason}): halt_all"


def switch_verdict(records: Sequence[SwitchRecord], target: SwitchTarget) -> str | None:
    """The verdict on starting an action: None when the switches permit it, else the host's
    verdict (when `target.host` is given) or the store's strictest mode and the scopes that
    forbid it (only the engaged switches that reach it explain it)."""
    if target.fleet_unknown is not None:
        return fleet_unknown_verdict(target.fleet_unknown)
    if target.host is not None:
        problem = host_verdict(target.host.read(), critical=target.critical)
        if problem is not None:
            return problem
    reaching = [r for r in records if target.reached_by(r)]
    mode = strictest(*(r.mode for r in reaching))
    if permits(mode, critical=target.critical):
        return None
    scopes = sorted({r.scope for r in reaching if r.stored_mode != Mode.DISENGAGED.value})
    return f"{mode.value} ({', '.join(scopes)})"


def host_permits(target: SwitchTarget) -> bool:
    """Whether the host's switch file (read now) and the fleet switch's state let the action
    start: the part of `switch_verdict` that no row holds."""
    return switch_verdict((), target) is None


def host_lets_finish(target: SwitchTarget, *, halt_all_stops: bool) -> bool:
    """Whether the host's switch file (read now) and the fleet switch's state let a finished
    effect's outcome be recorded as done: the part of `stopping_switch` no row holds."""
    return stopping_switch((), target, halt_all_stops=halt_all_stops) is None


def stops_in_flight(mode: Mode, *, halt_all_stops: bool) -> bool:
    """Whether `mode` stops effects already running, not only new ones: emergency always,
    halt_all when the fleet is configured so (`halt_in_flight = "terminate"`)."""
    return mode is Mode.EMERGENCY or (mode is Mode.HALT_ALL and halt_all_stops)


def stopping_switch(
    records: Sequence[SwitchRecord], target: SwitchTarget, *, halt_all_stops: bool
) -> str | None:
    """The first switch that stops this action's effect in flight, or None: the fleet's own
    switch when it cannot be read, the host file (when `target.host` is given), the store's."""
    if target.fleet_unknown is not None and stops_in_flight(
        Mode.HALT_ALL, halt_all_stops=halt_all_stops
    ):
        return fleet_unknown_verdict(target.fleet_unknown)
    if target.host is not None:
        mode = target.host.read().mode
        if stops_in_flight(mode, halt_all_stops=halt_all_stops):
            return f"host {mode.value}"
    for r in records:
        if target.reached_by(r) and stops_in_flight(r.mode, halt_all_stops=halt_all_stops):
            return f"{r.scope} {r.mode.value}"
    return None


class SwitchCache:
    """The fleet's switch rows as last read, and the stamp they were read under. Every action
    reads the switches three times (its started record, the last look, its outcome); on a
    backend that can tell when rows changed under it (SQLite: another connection's commit, a
    rollback) an unchanged stamp answers without the read. This store's own switch writes
    count in `writes`."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], tuple[Hashable, list[SwitchRecord]]] = {}
        self.writes = 0
        # Postgres: the rows of each fleet with the fingerprint the database gave them; a
        # one-statement start or outcome passes it, and writes nothing if the rows moved since.
        self.prints: dict[str, tuple[str, list[SwitchRecord]]] = {}

    def wrote(self) -> None:
        """This store changed switch rows: nothing read before may answer again."""
        self.writes += 1
        self.prints.clear()


async def switches_with_print(
    tx: Tx, fleet: str, cache: SwitchCache
) -> tuple[str, list[SwitchRecord]]:
    """The fleet's switch rows and their fingerprint, read afresh (one statement, one snapshot;
    Postgres only) and kept in `cache.prints`, which the caller looks in first."""
    rows = await tx.fetchall("switches_with_print", fleet)
    known = rows[0]["print"], [SwitchRecord.from_row(r) for r in rows if r["scope"] is not None]
    cache.prints[fleet] = known
    return known


async def switches_in(
    tx: Tx, fleet: str, cache: SwitchCache, *, ordered: bool = False
) -> list[SwitchRecord]:
    """The fleet's switches as this transaction sees them: on Postgres under the fleet's shared
    switch lock unless `ordered` (a listing); from `cache` when the stamp says nothing moved."""
    query = "kill_switches" if ordered else "kill_switches_for_start"
    stamp = await tx.change_stamp()
    key = (fleet, query)
    if stamp is not None:
        seen = cache.rows.get(key)
        if seen is not None and seen[0] == (stamp, cache.writes):
            return seen[1]
    records = [SwitchRecord.from_row(r) for r in await tx.fetchall(query, fleet)]
    if stamp is not None:
        cache.rows[key] = ((stamp, cache.writes), records)
    return records


class SwitchesRepo(StoreCore):
    async def kill_switches(self, fleet: str) -> list[SwitchRecord]:
        """Every store switch of the fleet, in scope and target order."""
        async with self.backend.reader() as tx:
            return await switches_in(tx, fleet, self.switch_cache, ordered=True)

    async def ensure_fleet_switch(self, fleet: str) -> None:
        """The fleet's switch row, disengaged, unless it exists: the row an engage locks."""
        async with self._transaction() as tx:
            await tx.execute("ensure_fleet_switch", fleet, self.clock.now())
            self.switch_cache.wrote()  # after the write: no read before it stays cached

    async def set_switches(
        self, *, fleet: str, scope: str, targets: Sequence[str], mode: Mode, reason: str | None,
        by: str, event: NewEvent,
    ) -> None:  # fmt: skip
        """An engage (or disengage) of store switches, with its event (who and why), in one
        transaction. It locks the fleet's switch row first: starts and outcomes in flight hold
        it shared, so this returns only after them, and no start begins after it returns."""
        async with self._transaction() as tx:
            await tx.execute("ensure_fleet_switch", fleet, self.clock.now())
            await tx.execute("lock_fleet_switch", fleet)
            for each in targets:
                await tx.execute("upsert_kill_switch", fleet, scope, each, mode.value, reason,
                                 by, self.clock.now())  # fmt: skip
            self.switch_cache.wrote()  # after the writes: no read before them stays cached
            await self.append_in(tx, event)
            await self.backend.notify_in(tx, "acp_killswitch", fleet)

    async def host_switch_mark(self, fleet: str, host: str) -> int:
        """The highest host kill-switch seq this host ever accepted (0: none)."""
        row = await self._fetchrow("host_switch_mark", fleet, host)
        return int(row["seq"]) if row is not None else 0

    async def raise_host_switch_mark(self, fleet: str, host: str, seq: int) -> None:
        async with self._transaction() as tx:
            await tx.execute("raise_host_switch_mark", fleet, host, seq, self.clock.now())
