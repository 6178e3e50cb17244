"""Waiting on a condition in tests, never on a fixed sleep.

A test that sleeps and then asserts races a loaded CI machine: the daemon, the row or the file
it expects may just be late. These helpers poll a probe until it returns something truthy,
return that value, and after a generous deadline fail naming what was awaited.

    row = await eventually(lambda: store.get_action("c1"), "action c1 recorded")
    pid = eventually_sync(read_pid, "the child's pid file", abort=daemon_exited)

A sleep that stays in a test is a negative check's window ("nothing starts within 0.5 s"),
time deliberately let pass, or work simulated inside a worker: there is no condition to await.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

import anyio

T = TypeVar("T")

WITHIN = 20.0  # seconds: generous on a loaded 2-core CI box, and a dead thing still fails
EVERY = 0.05  # seconds between probes: prompt enough, without spinning the CPU others need


def _failure(why: str, what: str, context: Callable[[], str] | None) -> AssertionError:
    message = f"{why} waiting for {what}"
    if context is not None:
        message += "\n" + context()
    return AssertionError(message)


@overload
async def eventually(
    probe: Callable[[], Awaitable[T | None]],
    what: str,
    *,
    within: float = WITHIN,
    every: float = EVERY,
    abort: Callable[[], str | None] | None = None,
    context: Callable[[], str] | None = None,
) -> T: ...


@overload
async def eventually(
    probe: Callable[[], T | None],
    what: str,
    *,
    within: float = WITHIN,
    every: float = EVERY,
    abort: Callable[[], str | None] | None = None,
    context: Callable[[], str] | None = None,
) -> T: ...


async def eventually(
    probe: Callable[[], Any],
    what: str,
    *,
    within: float = WITHIN,
    every: float = EVERY,
    abort: Callable[[], str | None] | None = None,
    context: Callable[[], str] | None = None,
) -> Any:
    """Poll `probe` (sync or async) until it returns something truthy; return that.

    `what` names the condition in the failure. `abort` returns a reason to fail at once (the
    daemon died: no point waiting out the deadline); `context` adds to the failure (a log's
    tail). The probe gets one last look after the deadline, so a stalled machine that kept the
    loop from polling does not fail a condition that holds."""
    deadline = time.monotonic() + within
    while True:
        value = probe()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if abort is not None and (reason := abort()):
            raise _failure(f"{reason} while", what, context)
        if time.monotonic() >= deadline:
            raise _failure(f"timed out after {within:g}s", what, context)
        await anyio.sleep(every)


def eventually_sync(
    probe: Callable[[], T | None],
    what: str,
    *,
    within: float = WITHIN,
    every: float = EVERY,
    abort: Callable[[], str | None] | None = None,
    context: Callable[[], str] | None = None,
) -> T:
    """`eventually` for synchronous tests (a daemon as a subprocess, a server in a thread).

    It blocks the calling thread: inside an async test that is a stuck event loop, on purpose."""
    deadline = time.monotonic() + within
    while True:
        value = probe()
        if value:
            return value
        if abort is not None and (reason := abort()):
            raise _failure(f"{reason} while", what, context)
        if time.monotonic() >= deadline:
            raise _failure(f"timed out after {within:g}s", what, context)
        time.sleep(every)
