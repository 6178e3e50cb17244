"""The clocks (supervisor.timing.clock): the virtual clock is a deterministic discrete-event scheduler.

Spawned tasks run one at a time, in the order they are due; ties go to whoever spawned or slept
first. `ring(event)` wakes a sleeper at the current virtual time. A cancelled sleeper never stalls
the clock. Virtual time never goes backwards. The system clock's sleep ends early when woken.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import anyio
import pytest

from supervisor.timing.clock import SystemClock, VirtualClock

pytestmark = pytest.mark.anyio

T0 = datetime(2026, 11, 1, tzinfo=UTC)
M = timedelta(minutes=1)

Trace = list[tuple[str, datetime]]


async def run_tasks(
    clock: VirtualClock,
    tasks: list[tuple[str, Callable[..., Awaitable[Any]]]],
    until: datetime,
) -> None:
    """Spawn `tasks` on the clock, let virtual time run to `until`, then cancel what is left
    (what the daemon does at the end of a horizon)."""
    async with anyio.create_task_group() as tg:
        for name, fn in tasks:
            clock.spawn(tg, fn, name=name)
        await clock.sleep_until(until)
        tg.cancel_scope.cancel()


def sleeper(clock: VirtualClock, trace: Trace, name: str, offsets: list[timedelta]) -> Any:
    async def task() -> None:
        trace.append((name, clock.now()))
        for offset in offsets:
            await clock.sleep_until(T0 + offset)
            trace.append((name, clock.now()))

    return task


async def test_spawned_tasks_start_in_spawn_order_at_the_current_time() -> None:
    clock = VirtualClock(T0)
    trace: Trace = []
    names = [f"t{i}" for i in range(8)]
    await run_tasks(clock, [(n, sleeper(clock, trace, n, [])) for n in names], T0 + M)
    assert trace == [(n, T0) for n in names]


async def test_tasks_wake_in_due_order_and_ties_go_to_the_earlier_sleeper() -> None:
    clock = VirtualClock(T0)
    trace: Trace = []
    await run_tasks(
        clock,
        [
            ("a", sleeper(clock, trace, "a", [10 * M, 30 * M])),
            ("b", sleeper(clock, trace, "b", [5 * M, 10 * M])),
            ("c", sleeper(clock, trace, "c", [10 * M])),
        ],
        T0 + 60 * M,
    )
    assert trace == [
        ("a", T0), ("b", T0), ("c", T0),
        ("b", T0 + 5 * M),
        # three sleepers due at +10m: a and c slept at T0 (a first), b slept at +5m
        ("a", T0 + 10 * M), ("c", T0 + 10 * M), ("b", T0 + 10 * M),
        ("a", T0 + 30 * M),
    ]  # fmt: skip
    assert clock.now() == T0 + 60 * M


async def test_only_one_task_runs_at_a_time_even_across_real_awaits() -> None:
    """A task that awaits real I/O (here: a real sleep) keeps its turn; time does not move."""
    clock = VirtualClock(T0)
    active = 0
    peak = 0
    seen: list[tuple[str, datetime, datetime]] = []

    def worker(name: str, every: timedelta) -> Any:
        async def task() -> None:
            nonlocal active, peak
            for k in range(1, 6):
                await clock.sleep_until(T0 + every * k)
                active += 1
                peak = max(peak, active)
                before = clock.now()
                await anyio.sleep(0.002)  # real time passes, virtual time must not
                await anyio.lowlevel.checkpoint()
                seen.append((name, before, clock.now()))
                active -= 1

        return task

    await run_tasks(clock, [("x", worker("x", 3 * M)), ("y", worker("y", 2 * M)),
                            ("z", worker("z", 3 * M))], T0 + 20 * M)  # fmt: skip
    assert peak == 1
    assert all(before == after for _n, before, after in seen)
    assert len(seen) == 15
    # due order; at the tie +6m, x and z (asleep since +3m, x first) before y (asleep since +4m)
    order = [(n, at) for n, at, _ in seen]
    assert order == sorted(order, key=lambda e: e[1])
    assert [n for n, at in order if at == T0 + 6 * M] == ["x", "z", "y"]


def scenario(seed: int) -> Callable[[], Awaitable[Trace]]:
    async def go() -> Trace:
        clock = VirtualClock(T0)
        trace: Trace = []
        rng = random.Random(seed)

        def task(name: str) -> Any:
            async def body() -> None:
                for _ in range(20):
                    # a coarse grid makes many ties; ties must still be ordered deterministically
                    step = timedelta(minutes=rng.choice([0, 1, 1, 2, 5]))
                    await clock.sleep_until(clock.now() + step)
                    trace.append((name, clock.now()))
                    if rng.random() < 0.3:
                        await anyio.lowlevel.checkpoint()  # a real scheduling point in the turn

            return body

        await run_tasks(clock, [(f"w{i}", task(f"w{i}")) for i in range(10)], T0 + 24 * 60 * M)
        return trace

    return go


async def test_the_same_inputs_give_the_same_sequence() -> None:
    first = await scenario(7)()
    second = await scenario(7)()
    assert len(first) == 200
    assert first == second
    assert first != await scenario(8)()
    times = [at for _n, at in first]
    assert times == sorted(times)  # wake-ups are in time order


async def test_ring_wakes_a_sleeper_early_at_the_current_virtual_time() -> None:
    clock = VirtualClock(T0)
    wake = anyio.Event()
    got: list[tuple[bool, datetime]] = []
    trace: Trace = []

    async def long_sleeper() -> None:
        reached = await clock.sleep_until(T0 + 60 * M, wake)
        got.append((reached, clock.now()))

    async def ringer() -> None:
        await clock.sleep_until(T0 + 10 * M)
        clock.ring(wake)
        trace.append(("ringer", clock.now()))
        await clock.sleep_until(T0 + 11 * M)
        trace.append(("ringer", clock.now()))

    await run_tasks(clock, [("sleeper", long_sleeper), ("ringer", ringer)], T0 + 90 * M)
    # woken at +10m (not at +60m), told the instant was not reached, before the ringer's +11m
    assert got == [(False, T0 + 10 * M)]
    assert trace == [("ringer", T0 + 10 * M), ("ringer", T0 + 11 * M)]


async def test_ring_wakes_every_sleeper_on_the_event_in_sleep_order() -> None:
    clock = VirtualClock(T0)
    wake = anyio.Event()
    woken: list[tuple[str, bool, datetime]] = []

    def waiter(name: str, until: timedelta) -> Any:
        async def task() -> None:
            reached = await clock.sleep_until(T0 + until, wake)
            woken.append((name, reached, clock.now()))

        return task

    async def ringer() -> None:
        await clock.sleep_until(T0 + 5 * M)
        clock.ring(wake)

    await run_tasks(clock, [("a", waiter("a", 50 * M)), ("b", waiter("b", 20 * M)),
                            ("r", ringer)], T0 + 60 * M)  # fmt: skip
    assert woken == [("a", False, T0 + 5 * M), ("b", False, T0 + 5 * M)]


async def test_sleep_on_an_event_already_set_returns_at_once() -> None:
    clock = VirtualClock(T0)
    wake = anyio.Event()
    clock.ring(wake)
    assert await clock.sleep_until(T0 + 60 * M, wake) is False
    assert clock.now() == T0


async def test_a_sleeper_reached_before_the_ring_reports_true() -> None:
    clock = VirtualClock(T0)
    wake = anyio.Event()
    assert await clock.sleep_until(T0 + 5 * M, wake) is True
    assert clock.now() == T0 + 5 * M


async def test_cancelling_a_sleeping_task_does_not_stall_the_clock() -> None:
    clock = VirtualClock(T0)
    scope = anyio.CancelScope()
    trace: Trace = []

    async def victim() -> None:
        with scope:
            await clock.sleep_until(T0 + 60 * M)
            trace.append(("victim", clock.now()))  # never: cancelled first
        trace.append(("victim-cancelled", clock.now()))

    async def killer() -> None:
        await clock.sleep_until(T0 + 5 * M)
        scope.cancel()
        await clock.sleep_until(T0 + 30 * M)
        trace.append(("killer", clock.now()))
        await clock.sleep_until(T0 + 120 * M)
        trace.append(("killer", clock.now()))

    async def bystander() -> None:
        for k in range(1, 6):
            await clock.sleep_until(T0 + 25 * k * M)
            trace.append(("bystander", clock.now()))

    with anyio.fail_after(5):
        await run_tasks(clock, [("victim", victim), ("killer", killer), ("bystander", bystander)],
                        T0 + 180 * M)  # fmt: skip
    assert not [e for e in trace if e[0] == "victim"]
    assert [e for e in trace if e[0] == "victim-cancelled"]
    # everyone else still runs one at a time, in due order, at the right instants
    assert [e for e in trace if e[0] != "victim-cancelled"] == [
        ("bystander", T0 + 25 * M), ("killer", T0 + 30 * M), ("bystander", T0 + 50 * M),
        ("bystander", T0 + 75 * M), ("bystander", T0 + 100 * M), ("killer", T0 + 120 * M),
        ("bystander", T0 + 125 * M),
    ]  # fmt: skip
    assert clock.now() == T0 + 180 * M


async def test_a_sleeper_woken_and_cancelled_at_once_gives_its_turn_back() -> None:
    """The killer cancels a task whose wake-up is the next one due, and sleeps on without
    yielding: the victim's turn is handed out before its cancellation is delivered."""
    clock = VirtualClock(T0)
    scope = anyio.CancelScope()
    trace: Trace = []

    async def killer() -> None:
        await clock.sleep_until(T0 + 10 * M)
        scope.cancel()
        await clock.sleep_until(T0 + 20 * M)
        trace.append(("killer", clock.now()))
        await clock.sleep_until(T0 + 40 * M)
        trace.append(("killer", clock.now()))

    async def victim() -> None:
        with scope:
            await clock.sleep_until(T0 + 15 * M)
            trace.append(("victim", clock.now()))
        trace.append(("victim-cancelled", clock.now()))

    async def bystander() -> None:
        for k in (25, 30, 35):
            await clock.sleep_until(T0 + k * M)
            trace.append(("bystander", clock.now()))

    with anyio.fail_after(5):
        await run_tasks(clock, [("killer", killer), ("victim", victim), ("bystander", bystander)],
                        T0 + 60 * M)  # fmt: skip
    assert ("victim", T0 + 15 * M) not in trace
    assert [e for e in trace if e[0] != "victim-cancelled"] == [
        ("killer", T0 + 20 * M), ("bystander", T0 + 25 * M), ("bystander", T0 + 30 * M),
        ("bystander", T0 + 35 * M), ("killer", T0 + 40 * M),
    ]  # fmt: skip
    assert clock.now() == T0 + 60 * M


async def test_a_task_that_survives_its_cancellation_rejoins_the_schedule() -> None:
    """A task whose sleep was cancelled holds no turn; when it sleeps again it is woken in due
    order like everyone else, and the clock's turn count stays right (nothing runs twice)."""
    clock = VirtualClock(T0)
    scope = anyio.CancelScope()
    trace: Trace = []
    peak = 0
    active = 0

    async def mark(name: str) -> None:
        nonlocal peak, active
        active += 1
        peak = max(peak, active)
        trace.append((name, clock.now()))
        await anyio.sleep(0.001)
        active -= 1

    async def survivor() -> None:
        with scope:
            await clock.sleep_until(T0 + 60 * M)
        for k in (12, 22, 32):
            await clock.sleep_until(T0 + k * M)
            await mark("survivor")

    async def killer() -> None:
        await clock.sleep_until(T0 + 5 * M)
        scope.cancel()
        for k in (10, 20, 30):
            await clock.sleep_until(T0 + k * M)
            await mark("killer")

    with anyio.fail_after(5):
        await run_tasks(clock, [("survivor", survivor), ("killer", killer)], T0 + 60 * M)
    assert trace == [
        ("killer", T0 + 10 * M), ("survivor", T0 + 12 * M), ("killer", T0 + 20 * M),
        ("survivor", T0 + 22 * M), ("killer", T0 + 30 * M), ("survivor", T0 + 32 * M),
    ]  # fmt: skip
    assert peak == 1
    assert clock.now() == T0 + 60 * M


async def test_cancelling_the_whole_group_ends_promptly() -> None:
    clock = VirtualClock(T0)

    async def forever() -> None:
        while True:
            await clock.sleep_until(clock.now() + M)

    with anyio.fail_after(5):
        await run_tasks(clock, [(f"f{i}", forever) for i in range(5)], T0 + 600 * M)
    assert clock.now() == T0 + 600 * M


async def test_time_never_goes_backwards() -> None:
    clock = VirtualClock(T0)
    mono0 = clock.monotonic()
    # a sleep into the past returns at once and leaves the clock where it is
    assert await clock.sleep_until(T0 - 60 * M) is True
    assert clock.now() == T0
    await clock.sleep_until(T0 + 30 * M)
    assert clock.now() == T0 + 30 * M
    assert clock.monotonic() - mono0 == 30 * 60
    assert await clock.sleep_until(T0 + 10 * M) is True
    assert clock.now() == T0 + 30 * M
    with pytest.raises(ValueError):
        clock.advance(-M)
    clock.advance(M)
    assert clock.now() == T0 + 31 * M
    assert clock.monotonic() - mono0 == 31 * 60


async def test_observed_times_are_monotonic_across_many_tasks() -> None:
    clock = VirtualClock(T0)
    seen: list[tuple[datetime, float]] = []
    rng = random.Random(3)

    def task() -> Any:
        async def body() -> None:
            for _ in range(30):
                await clock.sleep_until(T0 + timedelta(seconds=rng.randrange(0, 7200)))
                seen.append((clock.now(), clock.monotonic()))

        return body

    await run_tasks(clock, [(f"r{i}", task()) for i in range(6)], T0 + 3 * 60 * M)
    assert seen == sorted(seen)
    assert len(seen) == 180


def test_the_virtual_clock_needs_an_aware_start() -> None:
    with pytest.raises(ValueError):
        VirtualClock(datetime(2026, 11, 1))
    clock = VirtualClock(datetime(2026, 11, 1, 1, tzinfo=ZoneInfo("Europe/Berlin")))
    assert clock.now() == datetime(2026, 11, 1, 0, tzinfo=UTC)
    assert clock.now().tzinfo == UTC


async def test_system_clock_sleep_until_returns_false_when_woken() -> None:
    clock = SystemClock()
    wake = anyio.Event()

    async def ring_soon() -> None:
        await anyio.sleep(0.05)
        clock.ring(wake)

    async with anyio.create_task_group() as tg:
        tg.start_soon(ring_soon)
        t0 = time.monotonic()
        reached = await clock.sleep_until(clock.now() + timedelta(seconds=30), wake)
        elapsed = time.monotonic() - t0
    assert reached is False
    assert elapsed < 5


async def test_system_clock_sleep_until_returns_true_at_the_instant() -> None:
    clock = SystemClock()
    target = clock.now() + timedelta(milliseconds=50)
    assert await clock.sleep_until(target, anyio.Event()) is True
    assert clock.now() >= target
    # already past, and already woken
    assert await clock.sleep_until(clock.now() - timedelta(seconds=1)) is True
    wake = anyio.Event()
    wake.set()
    assert await clock.sleep_until(clock.now() + timedelta(seconds=30), wake) is False


async def test_system_clock_yields_for_an_instant_already_past() -> None:
    """A worker with no cadence (every slot already due) must not keep the loop to itself: the
    daemon's other tasks (signals, the kill switch's watch) run between its cycles."""
    clock = SystemClock()
    ran = anyio.Event()

    async def other_task() -> None:
        ran.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(other_task)
        for _ in range(3):
            assert await clock.sleep_until(clock.now() - timedelta(seconds=1)) is True
        assert ran.is_set()
