"""The tests' waiting helpers (tests/waiting.py): they return what the probe found, and fail,
naming what was awaited, once the deadline passed or the abort check gave a reason. A helper
that passed without its condition would hide every race it is meant to remove."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.waiting import eventually, eventually_sync

pytestmark = pytest.mark.anyio


def counting(after: int) -> tuple[Callable[[], list[int] | None], list[int]]:
    """A probe that holds from its `after`-th call on, returning the calls so far."""
    calls: list[int] = []

    def probe() -> list[int] | None:
        calls.append(len(calls) + 1)
        return list(calls) if len(calls) >= after else None

    return probe, calls


async def test_eventually_returns_the_value_of_a_sync_probe_once_it_holds() -> None:
    probe, calls = counting(after=3)
    assert await eventually(probe, "the third call", every=0.01) == [1, 2, 3]
    assert len(calls) == 3  # it stops polling once the condition holds


async def test_eventually_awaits_an_async_probe() -> None:
    sync_probe, _ = counting(after=2)

    async def probe() -> list[int] | None:
        return sync_probe()

    assert await eventually(probe, "the second call", every=0.01) == [1, 2]


async def test_eventually_fails_after_the_deadline_naming_what_was_awaited() -> None:
    probe, calls = counting(after=10**9)
    started = time.monotonic()
    with pytest.raises(AssertionError, match=r"timed out after 0.2s waiting for the green light"):
        await eventually(probe, "the green light", within=0.2, every=0.02)
    assert time.monotonic() - started >= 0.2
    assert len(calls) >= 2  # it polled meanwhile, and looked once more at the deadline


async def test_eventually_aborts_at_once_with_the_reason_and_adds_context() -> None:
    probe, calls = counting(after=10**9)
    started = time.monotonic()
    with pytest.raises(AssertionError) as info:
        await eventually(probe, "the daemon ready", abort=lambda: "daemon exited (3)",
                         context=lambda: "log tail: boom")  # fmt: skip
    assert str(info.value) == "daemon exited (3) while waiting for the daemon ready\nlog tail: boom"
    assert time.monotonic() - started < 5  # not the default 20 s deadline
    assert calls == [1]


async def test_a_falsy_value_is_not_an_answer() -> None:
    with pytest.raises(AssertionError, match="waiting for a non-empty list"):
        await eventually(lambda: [], "a non-empty list", within=0.05, every=0.01)


def test_eventually_sync_returns_the_value_once_it_holds() -> None:
    probe, calls = counting(after=3)
    assert eventually_sync(probe, "the third call", every=0.01) == [1, 2, 3]
    assert len(calls) == 3


def test_eventually_sync_fails_after_the_deadline_naming_what_was_awaited() -> None:
    probe, _ = counting(after=10**9)
    started = time.monotonic()
    with pytest.raises(AssertionError, match=r"timed out after 0.2s waiting for the pid file\nctx"):
        eventually_sync(probe, "the pid file", within=0.2, every=0.02, context=lambda: "ctx")
    assert time.monotonic() - started >= 0.2


def test_eventually_sync_aborts_at_once_with_the_reason() -> None:
    probe, calls = counting(after=10**9)
    with pytest.raises(AssertionError, match=r"^child exited \(1\) while waiting for the port$"):
        eventually_sync(probe, "the port", abort=lambda: "child exited (1)")
    assert calls == [1]
