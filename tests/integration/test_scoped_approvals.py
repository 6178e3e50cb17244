"""`approvals approve --scope window --max-uses N --max-cost C`: one decision covers later actions
of the same name by the same worker for the rest of the window, within its limits."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from supervisor.actions import Action
from supervisor.approvals import Approvals
from supervisor.clock import VirtualClock
from supervisor.errors import ApprovalPending, UsageError
from supervisor.escalation import EscalationChain
from supervisor.gate import Gate
from supervisor.governance import ModelGovernor, TokenBudgets
from supervisor.killswitch import HostSwitchFile
from supervisor.policy import Policy
from supervisor.store import Store

pytestmark = pytest.mark.anyio


async def test_a_window_scoped_approval_covers_later_actions_within_its_limits(
    store: Store, clock: VirtualClock, tmp_path: Path
) -> None:
    gate = Gate(store=store, fleet="f", policy=Policy.from_config(None),
                approvals=Approvals(store, EscalationChain.from_config(None), "f"),
                host_switch=HostSwitchFile(tmp_path / "ks.json", b"s"),
                token_budgets=TokenBudgets.from_config(None), models=ModelGovernor.from_config(None),
                timezone=ZoneInfo("UTC"))  # fmt: skip
    start = clock.now().replace(minute=0, second=0, microsecond=0)
    session, _ = await store.open_window(fleet="f", key="w", starts_at=start,
                                         ends_at=start + timedelta(hours=1), max_cost=None,
                                         max_actions=None, by="t")  # fmt: skip
    ran: list[int] = []

    def deploy(n: int) -> Action:
        return Action("deploy.service", params={"build": n}, risk="high", cost=2.0)

    async def effect() -> None:
        ran.append(1)

    with pytest.raises(ApprovalPending) as first:
        await gate.run(deploy(1), effect, worker="ops", session=session, command_id="d1")
    await gate.approvals.decide(first.value.approval_id, approve=True, by="lead", reason="release day",
                                scope="window", max_uses=2, max_cost=4.0)  # fmt: skip

    for n in (2, 3):  # covered: two uses, 4.0 of cost
        outcome = await gate.run(deploy(n), effect, worker="ops", session=session, command_id=f"d{n}")
        assert outcome.status == "succeeded"
    assert len(ran) == 2
    with pytest.raises(ApprovalPending):  # the limit is spent: a new request
        await gate.run(deploy(4), effect, worker="ops", session=session, command_id="d4")
    with pytest.raises(ApprovalPending):  # another worker is not covered
        await gate.run(deploy(5), effect, worker="other", session=session, command_id="d5")
    row = await store.fetchrow("get_approval", first.value.approval_id)
    assert row is not None and (row["used_count"], row["used_cost"]) == (2, 4.0)
    assert len(ran) == 2


@pytest.mark.parametrize("bound", [float("nan"), float("inf"), -1.0])
async def test_a_non_finite_cost_bound_is_refused_and_the_approval_stays_pending(
    store: Store, clock: VirtualClock, tmp_path: Path, bound: float
) -> None:
    gate = Gate(store=store, fleet="f", policy=Policy.from_config(None),
                approvals=Approvals(store, EscalationChain.from_config(None), "f"),
                host_switch=HostSwitchFile(tmp_path / "ks.json", b"s"),
                token_budgets=TokenBudgets.from_config(None), models=ModelGovernor.from_config(None),
                timezone=ZoneInfo("UTC"))  # fmt: skip
    start = clock.now().replace(minute=0, second=0, microsecond=0)
    session, _ = await store.open_window(fleet="f", key="w", starts_at=start,
                                         ends_at=start + timedelta(hours=1), max_cost=None,
                                         max_actions=None, by="t")  # fmt: skip
    action = Action("deploy.service", params={"build": 1}, risk="high", cost=2.0)

    async def effect() -> None:
        return None

    with pytest.raises(ApprovalPending) as pending:
        await gate.run(action, effect, worker="ops", session=session, command_id="d1")
    with pytest.raises(UsageError, match="finite"):
        await gate.approvals.decide(pending.value.approval_id, approve=True, by="lead",
                                    reason="r", scope="window", max_cost=bound)  # fmt: skip
    row = await store.fetchrow("get_approval", pending.value.approval_id)
    assert row is not None and row["status"] == "pending"
