"""`Daemon._duty`, the one loop every singleton duty runs through: the schedule, the leader
check, the fence and the handling of a store failure, on the virtual clock."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest

from supervisor.errors import StoreUnavailable
from supervisor.runtime.daemon import DUTY_OVER, Daemon, Duty, DutyOver
from supervisor.timing.clock import VirtualClock

pytestmark = pytest.mark.anyio

T0 = datetime(2026, 11, 1, tzinfo=UTC)
M = timedelta(minutes=1)


class Host:
    """The parts of a daemon `_duty` uses: its clock, whether it leads, the fence, the alert."""

    def __init__(self, *, leading: bool = True) -> None:
        self.clock = VirtualClock(T0)
        self.stopping = anyio.Event()
        self.leading = leading
        self.fenced = 0
        self.alerts: list[tuple[str, str]] = []

    def _leading(self) -> bool:
        return self.leading

    @contextmanager
    def _fenced(self) -> Iterator[None]:
        self.fenced += 1
        yield

    async def _state_write_failed(self, duty: str, exc: Exception) -> None:
        self.alerts.append((duty, str(exc)))


async def drive(host: Host, duty: Duty, until: datetime) -> None:
    async with anyio.create_task_group() as tg:
        host.clock.spawn(tg, Daemon._duty, host, duty, name=duty.name)  # type: ignore[arg-type]
        await host.clock.sleep_until(until)
        tg.cancel_scope.cancel()


def every(host: Host, minutes: int) -> Any:
    return lambda: host.clock.now() + minutes * M


async def test_the_leader_runs_on_schedule_under_the_fence() -> None:
    host = Host()
    ran: list[datetime] = []

    async def run() -> None:
        ran.append(host.clock.now())

    await drive(host, Duty("d", run, every(host, 10)), T0 + 35 * M)
    assert ran == [T0 + 10 * M, T0 + 20 * M, T0 + 30 * M]  # not `first`: it waits once first
    assert host.fenced == 3


async def test_a_follower_never_runs_the_work() -> None:
    host = Host(leading=False)
    ran: list[datetime] = []

    async def run() -> None:
        ran.append(host.clock.now())

    await drive(host, Duty("d", run, every(host, 10), first=True), T0 + 35 * M)
    assert ran == [] and host.fenced == 0


async def test_a_store_failure_alerts_and_the_duty_goes_on_after_its_retry() -> None:
    host = Host()
    ran: list[datetime] = []

    async def run() -> None:
        ran.append(host.clock.now())
        if len(ran) == 1:
            raise StoreUnavailable("connection refused")

    await drive(host, Duty("d", run, every(host, 10), retry=60.0, first=True), T0 + 12 * M)
    assert ran == [T0, T0 + M, T0 + 11 * M]  # retried a minute later, then on its schedule
    assert host.alerts == [("d", "connection refused")]


async def test_the_run_sets_the_next_time_and_ends_the_duty() -> None:
    host = Host()
    ran: list[datetime] = []

    async def run() -> datetime | DutyOver:
        ran.append(host.clock.now())
        return DUTY_OVER if len(ran) == 3 else host.clock.now() + 5 * M

    await drive(host, Duty("d", run, every(host, 60), first=True), T0 + 120 * M)
    assert ran == [T0, T0 + 5 * M, T0 + 10 * M]


async def test_a_wake_cuts_the_sleep_short_and_on_wake_runs_first() -> None:
    host = Host()
    events = [anyio.Event()]  # what Approvals.changed is: replaced once it has rung
    seen: list[tuple[str, datetime]] = []

    async def run() -> None:
        seen.append(("run", host.clock.now()))

    async def ring_later() -> None:
        await host.clock.sleep_until(T0 + 3 * M)
        host.clock.ring(events[-1])

    def rearm() -> None:
        seen.append(("woke", host.clock.now()))
        events.append(anyio.Event())

    duty = Duty("d", run, every(host, 60), wake=lambda: events[-1], on_wake=rearm)
    async with anyio.create_task_group() as tg:
        host.clock.spawn(tg, Daemon._duty, host, duty, name="d")  # type: ignore[arg-type]
        host.clock.spawn(tg, ring_later, name="ring")
        await host.clock.sleep_until(T0 + 4 * M)
        tg.cancel_scope.cancel()
    assert seen == [("woke", T0 + 3 * M), ("run", T0 + 3 * M)]
