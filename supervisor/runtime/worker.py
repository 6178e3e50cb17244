"""The in-process worker API: subclass `Worker`, write `async def cycle(self, ctx)`.

Actions go through the context, never around it: `await ctx.dispatch(action, effect)` or

    async with ctx.guard("maintenance.rotate_keys", params={...}, idempotency_key=key) as permit:
        ...  # the side effect; runs only when approved, once per key

`guard` raises ApprovalPending while an approval is pending, ActionDenied when refused,
ActionExpired past the deadline and ActionAlreadyDone when the key already has an outcome.
The fleet counts these as governed outcomes, not crashes.
"""

from __future__ import annotations

import inspect
import json
import os
import random
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

from ..actions import Action, Risk, derive_id
from ..errors import GovernedRefusal
from ..governance.approvals import Permit
from ..governance.gate import Effect, Gate, Outcome
from ..store import Session
from ..timing.clock import Clock


class ActionAlreadyDone(GovernedRefusal):
    """The idempotency key already has a recorded outcome; the block did not run again."""

    reason = "already_done"

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(f"command {outcome.command_id} already {outcome.status}")
        self.outcome = outcome


class Worker:
    """Base class of in-process workers. State to keep across restarts goes in snapshot().

    `awaits_only_the_gate`: the class's cycles await nothing but the gate and the store (no
    network, no thread, no real sleep). A simulation whose workers all say so may run those due
    on one slot side by side (VirtualClock `together`); one that waits on anything real must
    keep one turn at a time, or how the workers interleave would follow its waits' real
    durations, and two runs would write their events in different orders (promise 8)."""

    awaits_only_the_gate: ClassVar[bool] = False

    def __init__(self, name: str, params: Mapping[str, Any]) -> None:
        self.name = name
        self.params = dict(params)

    async def cycle(self, ctx: CycleContext) -> None:
        raise NotImplementedError

    def snapshot(self) -> dict[str, Any]:
        return {}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Called with the last checkpoint's snapshot before the first cycle after a restart."""

    async def close(self) -> None:
        """Called when the instance stops or is replaced after a crash."""


class EffectLog:
    """An append-only JSON-lines file of effects, independent of the store.

    It is how tests and the soak count effects from outside the ledger: a command_id that shows
    up twice here is an effect that ran twice. Not fsynced: it is a test witness, not a record.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def record(self, entry: Mapping[str, Any]) -> None:
        line = json.dumps(dict(entry), sort_keys=True) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            # One write(2) with O_APPEND: whole lines, and they survive the process being killed.
            os.write(fd, line.encode())
        finally:
            os.close(fd)


@dataclass
class CycleContext:
    fleet: str
    worker: str
    cycle: int
    session: Session
    gate: Gate
    clock: Clock
    rng: random.Random
    effects: EffectLog
    correlation_id: str
    _index: int = field(default=0, repr=False)

    @property
    def now(self) -> datetime:
        return self.clock.now()

    def _command_id(self, key: str | None) -> str:
        if key is not None:
            return derive_id(self.fleet, "key", key)
        self._index += 1
        return derive_id(self.fleet, self.worker, str(self.cycle), str(self._index))

    async def sleep(self, seconds: float) -> None:
        """Wait inside a cycle; a kill-switch change wakes it at once, and a halt raises
        ActionDenied(reason="killswitch") instead of letting the worker carry on."""
        from datetime import timedelta

        from ..errors import ActionDenied

        until = self.clock.now() + timedelta(seconds=seconds)
        while self.clock.now() < until:
            woke = self.gate.switch_changed
            if await self.clock.sleep_until(until, woke):
                return
            problem = self.gate.halted(worker=self.worker, session_id=self.session.id)
            if problem is not None:
                raise ActionDenied(f"kill switch while waiting: {problem}", reason="killswitch")

    def record_effect(self, action: str, command_id: str, **detail: Any) -> dict[str, Any]:
        entry = {"fleet": self.fleet, "worker": self.worker, "cycle": self.cycle,
                 "action": action, "command_id": command_id, "session": self.session.id,
                 "at": self.clock.now().isoformat(), **detail}  # fmt: skip
        self.effects.record(entry)
        return entry

    async def dispatch(
        self,
        action: Action,
        effect: Effect | Callable[[str], Awaitable[Any]] | None = None,
        *,
        key: str | None = None,
        pending_cap: int | None = None,
    ) -> Outcome:
        """Run `action` through the gate. Without an effect, the effect is a line in the effect log.
        `pending_cap`: refuse (reason approval_cap) a new approval past that many pending."""
        command_id = self._command_id(key)

        async def default_effect() -> Any:
            return self.record_effect(action.name, command_id)

        run: Effect = default_effect if effect is None else _bind(effect, command_id)
        return await self.gate.run(
            action, run, worker=self.worker, session=self.session, command_id=command_id,
            correlation_id=self.correlation_id, pending_cap=pending_cap,
        )  # fmt: skip

    @asynccontextmanager
    async def guard(
        self,
        action: str | Action,
        *,
        params: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        agent_id: str | None = None,
        risk: Risk = "high",
        cost: float = 0.0,
        critical: bool = False,
    ) -> AsyncIterator[Permit]:
        if isinstance(action, str):
            action = Action(name=action, params=dict(params or {}), risk=risk, cost=cost,
                            critical=critical, agent_id=agent_id)  # fmt: skip
        command_id = self._command_id(idempotency_key)
        async with self.gate.attempt(
            action, worker=self.worker, session=self.session, command_id=command_id,
            approval_key=idempotency_key, correlation_id=self.correlation_id,
        ) as attempt:  # fmt: skip
            if attempt.replay is not None:
                raise ActionAlreadyDone(attempt.replay)
            assert attempt.permit is not None
            yield attempt.permit


def _bind(effect: Callable[..., Awaitable[Any]], command_id: str) -> Effect:
    if _takes_arguments(effect):
        return lambda: effect(command_id)
    return effect


def _takes_arguments(effect: Callable[..., Any]) -> bool:
    """Whether `effect` declares any parameter. A plain function (the usual effect, a closure
    made each cycle) answers from its code object: `inspect.signature` cost about 25 us per
    action. Anything else (a bound method, a partial, a callable object) asks inspect."""
    if isinstance(effect, types.FunctionType):
        code = effect.__code__
        flags = code.co_flags & (inspect.CO_VARARGS | inspect.CO_VARKEYWORDS)
        return bool(code.co_argcount or code.co_kwonlyargcount or flags)
    try:
        return len(inspect.signature(effect).parameters) >= 1
    except (TypeError, ValueError):
        return False
