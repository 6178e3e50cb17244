"""An effect that declares a parameter gets the command_id; one that declares none is called
bare. The fast answer for plain functions must agree with inspect.signature everywhere."""

from __future__ import annotations

import functools
import inspect
from typing import Any

import pytest

from supervisor.runtime.worker import _takes_arguments


async def bare() -> None: ...


async def with_id(command_id: str) -> None: ...


async def star(*args: Any) -> None: ...


async def keyword_only(*, key: int = 1) -> None: ...


class Effects:
    async def method(self) -> None: ...

    async def method_with_id(self, command_id: str) -> None: ...

    async def __call__(self, command_id: str) -> None: ...


CASES = [bare, with_id, star, keyword_only, Effects().method, Effects().method_with_id,
         Effects(), functools.partial(with_id, "x"), lambda: None, lambda cid: None]  # fmt: skip


@pytest.mark.parametrize("effect", CASES)
def test_the_fast_answer_agrees_with_inspect(effect: Any) -> None:
    assert _takes_arguments(effect) is (len(inspect.signature(effect).parameters) >= 1)
