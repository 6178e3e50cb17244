"""Test workers for the recovery acceptance tests and the drills.

Imported by the daemon subprocess as `tests.recovery_workers:Name` (cwd and PYTHONPATH are the
repo root), and in-process by the drills.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import anyio

from supervisor.actions import Action
from supervisor.errors import ActionDenied, ApprovalPending
from supervisor.runtime.worker import ActionAlreadyDone, CycleContext, Worker


class TickWorker(Worker):
    """One low-risk action per cycle through the gate (the default effect: one effect-log line)."""

    async def cycle(self, ctx: CycleContext) -> None:
        action = Action(name="tick.ping", params={"cycle": ctx.cycle}, risk="low")
        with contextlib.suppress(ActionDenied):
            await ctx.dispatch(action)


class ApprovalWorker(Worker):
    """Asks, every cycle, for the same high-risk release (one idempotency key): the approval
    stays pending until someone decides or its deadline denies it."""

    async def cycle(self, ctx: CycleContext) -> None:
        key = str(self.params.get("key", "release-1"))
        try:
            async with ctx.guard(
                "release.deploy", params={"release": key}, idempotency_key=key, risk="high"
            ) as permit:
                ctx.record_effect("release.deploy", permit.command_id)
        except (ApprovalPending, ActionDenied, ActionAlreadyDone):
            pass


class SlowJobWorker(Worker):
    """One long job under a fixed key: its effect writes the effect log, touches `marker`, then
    sleeps `sleep` seconds (long enough to be killed in the middle). Not safe to retry."""

    async def cycle(self, ctx: CycleContext) -> None:
        marker = Path(self.params["marker"])
        sleep = float(self.params.get("sleep", 60.0))
        action = Action(name="job.long", params={"job": "long-1"}, risk="low")

        async def effect(command_id: str) -> Any:
            ctx.record_effect(action.name, command_id)
            await anyio.Path(marker).write_text(command_id)
            await anyio.sleep(sleep)
            return {"done": True}

        with contextlib.suppress(ActionDenied):
            await ctx.dispatch(action, effect, key="long-job-1")


class RogueWorker(Worker):
    """Misbehaves on purpose: writes effects straight to the effect log, never through the gate,
    so the kill switch cannot stop it. The kill-switch drill must catch it."""

    async def cycle(self, ctx: CycleContext) -> None:
        ctx.effects.record({"worker": ctx.worker, "action": "rogue.write", "cycle": ctx.cycle,
                            "at": ctx.clock.now().isoformat()})  # fmt: skip
