"""A nightly maintenance agent: prune logs, clear the cache, rotate keys.

Each task carries one idempotency key per local day, so a run retried later that day finds the
same approval and, once approved, runs the task exactly once. Every task needs approval.
"""

from __future__ import annotations

from typing import Any

from supervisor.errors import ActionDenied, ApprovalPending
from supervisor.runtime.worker import ActionAlreadyDone, CycleContext, Worker

TASKS = ("prune_logs", "clear_cache", "rotate_keys")


class MaintenanceAgent(Worker):
    awaits_only_the_gate = True  # its effects are in-process records

    def __init__(self, name: str, params: dict[str, Any]) -> None:
        super().__init__(name, params)
        self.done: dict[str, str] = {}  # task -> last day it ran

    async def cycle(self, ctx: CycleContext) -> None:
        day = ctx.session.starts_at.date().isoformat()
        for task in TASKS:
            key = f"{ctx.fleet}:{self.name}:{task}:{day}"
            try:
                async with ctx.guard(
                    f"maintenance.{task}", params={"day": day}, idempotency_key=key, risk="medium"
                ) as permit:
                    ctx.record_effect(f"maintenance.{task}", permit.command_id, day=day)
                self.done[task] = day
            except (ApprovalPending, ActionDenied, ActionAlreadyDone):
                continue

    def snapshot(self) -> dict[str, Any]:
        return {"done": dict(self.done)}

    def restore(self, state: dict[str, Any]) -> None:  # type: ignore[override]
        self.done = dict(state.get("done", {}))
