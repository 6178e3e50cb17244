"""Injected time (promise 8). No other module reads the time by itself.

`now()` is the UTC wall clock (windows, deadlines, records); `monotonic()` measures durations.
`sleep_until()` is the only way to wait for a wall-clock instant, and `spawn()` the only way to
start a task that waits on it.

The system clock sleeps. The virtual clock is a discrete-event scheduler: exactly one of its tasks
runs at a time, and when that task sleeps (or ends) the clock jumps to the earliest wake-up and
runs its owner; ties go to whoever asked first. The same code therefore runs a month in seconds,
and the same inputs give the same sequence of events.
"""

from __future__ import annotations

import contextvars
import heapq
import itertools
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup

# A long wall-clock sleep is cut into slices so a wall-clock step (NTP, suspend) is noticed.
_MAX_SLICE = 30.0


class Clock(Protocol):
    virtual: bool

    def now(self) -> datetime: ...

    def monotonic(self) -> float: ...

    async def sleep_until(self, when: datetime, wake: anyio.Event | None = None) -> bool:
        """Wait until `when` or until `wake` is set. True when the instant was reached."""
        ...

    def spawn(
        self, tg: TaskGroup, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any, name: str
    ) -> None:
        """Start a task that may sleep on this clock."""
        ...

    def ring(self, wake: anyio.Event) -> None:
        """Set `wake` and wake whoever sleeps on it now (on either clock)."""
        ...


class SystemClock:
    virtual = False

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep_until(self, when: datetime, wake: anyio.Event | None = None) -> bool:
        while True:
            remaining = (when - self.now()).total_seconds()
            if remaining <= 0:
                # An instant already past still yields once: a worker behind its schedule (or
                # with no cadence) whose cycle never waits would otherwise keep the loop from
                # every other task: signals, the kill switch's watch, the store's commits.
                await anyio.lowlevel.checkpoint()
                return True
            if wake is not None and wake.is_set():
                return False
            with anyio.move_on_after(min(remaining, _MAX_SLICE)):
                if wake is None:
                    await anyio.sleep_forever()
                else:
                    await wake.wait()
                    return False

    def spawn(
        self, tg: TaskGroup, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any, name: str
    ) -> None:
        tg.start_soon(fn, *args, name=name)

    def ring(self, wake: anyio.Event) -> None:
        wake.set()


class _Sleeper:
    __slots__ = ("cancelled", "event", "fired", "when")

    def __init__(self, when: datetime) -> None:
        self.when = when
        self.event = anyio.Event()
        self.cancelled = False
        self.fired = False


class VirtualClock:
    """Deterministic simulated time. The task that creates it is its first runner.

    Tasks take turns: time moves on only when no task runs. By default one sleeper is woken
    at a time. `together`: every sleeper due at the same instant is woken at once, so a fleet's
    workers due on the same slot run side by side and their writes share COMMITs (a simulated
    month of 100 workers made 136,000 COMMITs of one transaction each). That interleaving is
    the event loop's, the same on every run, only while nothing the tasks wait for finishes on
    its own time: a thread, a subprocess, a network. The daemon asks for it only with
    in-process workers on a store that then keeps its work on the loop (Backend.keep_on_loop)."""

    virtual = True

    def __init__(self, start: datetime, *, together: bool = False) -> None:
        if start.tzinfo is None:
            raise ValueError("the virtual clock needs an aware start instant")
        self.together = together
        self._now = start.astimezone(UTC)
        self._mono = 0.0
        self._heap: list[tuple[datetime, int, _Sleeper]] = []
        self._order = itertools.count()
        self._running = 1
        self._waiting: dict[int, list[_Sleeper]] = {}
        # Set in a task that was cancelled while asleep: it holds no turn (its cleanup runs
        # beside the turn holder), so it must not give one back when it sleeps again or ends.
        self._turnless: contextvars.ContextVar[bool] = contextvars.ContextVar(
            f"virtual-clock-turnless-{id(self)}", default=False
        )

    def now(self) -> datetime:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    def _set(self, when: datetime) -> None:
        if when > self._now:
            self._mono += (when - self._now).total_seconds()
            self._now = when

    def _enqueue(self, when: datetime) -> _Sleeper:
        sleeper = _Sleeper(max(when, self._now))
        heapq.heappush(self._heap, (sleeper.when, next(self._order), sleeper))
        return sleeper

    def _release(self) -> None:
        """The running task stops running; if none runs now, wake the earliest sleeper."""
        if not self._turnless.get():
            self._running -= 1
        self._dispatch()

    def _dispatch(self) -> None:
        """While no task runs, wake the earliest sleeper; `together`, every other one due at
        the instant it was woken for too."""
        woken: datetime | None = None
        while self._heap and (self._running == 0 or (self.together and self._heap[0][0] == woken)):
            when, _n, sleeper = heapq.heappop(self._heap)
            if sleeper.cancelled or sleeper.fired:
                continue
            sleeper.fired = True
            self._set(when)
            self._running += 1
            sleeper.event.set()
            woken = when

    async def _wait(self, sleeper: _Sleeper) -> None:
        try:
            await sleeper.event.wait()
        except BaseException:
            if sleeper.event.is_set():
                self._running -= 1  # woken and cancelled at once: give the turn back
                self._dispatch()
            else:
                sleeper.cancelled = True
            self._turnless.set(True)
            raise
        self._turnless.set(False)  # woken: this task holds the turn

    async def sleep_until(self, when: datetime, wake: anyio.Event | None = None) -> bool:
        if wake is not None and wake.is_set():
            return False
        sleeper = self._enqueue(when)
        if wake is not None:
            self._waiting.setdefault(id(wake), []).append(sleeper)
        self._release()
        try:
            await self._wait(sleeper)
        finally:
            if wake is not None:
                waiters = self._waiting.get(id(wake), [])
                if sleeper in waiters:
                    waiters.remove(sleeper)
                if not waiters:
                    self._waiting.pop(id(wake), None)
        return self._now >= when and not (wake is not None and wake.is_set())

    def ring(self, wake: anyio.Event) -> None:
        wake.set()
        # Sleepers on `wake` get a second, earlier turn at "now"; whichever turn comes first
        # wakes them and the other is skipped.
        for sleeper in self._waiting.pop(id(wake), []):
            if not sleeper.fired and not sleeper.cancelled:
                heapq.heappush(self._heap, (self._now, next(self._order), sleeper))

    def spawn(
        self, tg: TaskGroup, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any, name: str
    ) -> None:
        # Queued now, in the spawner's order, so start order does not depend on the event loop.
        sleeper = self._enqueue(self._now)

        async def runner() -> None:
            self._turnless.set(False)  # not inherited from the spawner's context
            await self._wait(sleeper)
            try:
                await fn(*args)
            finally:
                self._release()

        tg.start_soon(runner, name=name)

    def advance(self, delta: timedelta) -> None:
        """Move time forward by hand (tests of code that does not sleep)."""
        if delta < timedelta(0):
            raise ValueError("time does not go backwards")
        self._set(self._now + delta)
