"""Workers for acceptance tests. The daemon subprocess loads them as
`tests.acceptance.workers_fixture:<Class>` (it runs with the repository root on PYTHONPATH)."""

from __future__ import annotations

from supervisor.errors import ActionDenied, ApprovalPending
from supervisor.runtime.worker import ActionAlreadyDone, CycleContext, Worker


def refund_workers(replicas: int) -> str:
    """Config for `replicas` RetryingWorkers whose support.* actions need an approval."""
    return f"""
[[policy.rules]]
name = "refunds-need-approval"
action = "support.*"
outcome = "require_approval"

[[workers]]
name = "refunder"
class = "tests.acceptance.workers_fixture:RetryingWorker"
replicas = {replicas}
"""


class RetryingWorker(Worker):
    """Every cycle, asks for the same guarded action under one idempotency key per instance, the
    way a real agent retries a job until it is approved, refused or done. The effect is one line
    in the effect log, so a test can count how often it really ran."""

    async def cycle(self, ctx: CycleContext) -> None:
        job = str(self.params.get("job", "refund"))
        key = f"{ctx.fleet}:{self.name}:{job}"
        try:
            async with ctx.guard(
                str(self.params.get("action", "support.refund")), params={"job": job},
                idempotency_key=key, risk="medium",
            ) as permit:  # fmt: skip
                ctx.record_effect("support.refund", permit.command_id, approval=permit.approval_id)
        except (ApprovalPending, ActionDenied, ActionAlreadyDone):
            return
