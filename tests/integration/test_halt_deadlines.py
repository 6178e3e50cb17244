"""What a halt does to approval deadlines (docs/design.md): the chain keeps moving and the
deadline still denies by default; an approval decided during the halt runs only after it."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from supervisor import events as ev
from supervisor.actions import Action
from supervisor.errors import ActionDenied, ApprovalPending
from supervisor.governance.approvals import Approvals
from supervisor.governance.budgets import ModelGovernor, TokenBudgets
from supervisor.governance.escalation import EscalationChain
from supervisor.governance.gate import Gate
from supervisor.governance.policy import Policy
from supervisor.killswitch import HostSwitchFile, Mode
from supervisor.store import Session, Store
from supervisor.store.records import ApprovalStatus
from supervisor.timing.clock import VirtualClock
from tests import storetools

pytestmark = pytest.mark.anyio
SECRET = b"halt-deadline-secret"
CHAIN = {"timeout": "60m", "escalation": [{"after": "15m", "tier": "oncall"}]}


async def setup(
    store: Store, clock: VirtualClock, tmp_path: Path
) -> tuple[Gate, HostSwitchFile, Session]:
    switch = HostSwitchFile(tmp_path / "killswitch.json", SECRET)
    approvals = Approvals(store, EscalationChain.from_config(CHAIN), "f")
    gate = Gate(store=store, fleet="f", policy=Policy.from_config(None), approvals=approvals,
                host_switch=switch, token_budgets=TokenBudgets.from_config(None),
                models=ModelGovernor.from_config(None), timezone=ZoneInfo("UTC"))  # fmt: skip
    start = clock.now().replace(minute=0, second=0, microsecond=0)
    session, _ = await store.open_window(fleet="f", key="w", starts_at=start,
                                         ends_at=start + timedelta(days=1), max_cost=None,
                                         max_actions=None, by="test")  # fmt: skip
    return gate, switch, session


async def kinds(store: Store, session: Session) -> list[str]:
    return [e.kind for e in await store.replay(session.id)]


async def test_deadline_denies_by_default_during_a_halt(
    store: Store, clock: VirtualClock, tmp_path: Path
) -> None:
    gate, switch, session = await setup(store, clock, tmp_path)
    risky = Action("db.migrate", params={"to": 7}, risk="high")
    with pytest.raises(ApprovalPending) as pending:
        await gate.run(risky, _effect, worker="w", session=session, command_id="c1")
    switch.write(Mode.HALT_ALL, reason="incident", by="op", at=clock.now().isoformat())

    clock.advance(timedelta(minutes=16))
    assert (await gate.approvals.escalate_due())["escalated"] == 1
    clock.advance(timedelta(minutes=45))
    assert (await gate.approvals.escalate_due())["expired"] == 1
    row = await store.approval(pending.value.approval_id)
    assert row is not None and row.status == ApprovalStatus.EXPIRED
    assert kinds_in(await kinds(store, session), ev.APPROVAL_ESCALATED, ev.APPROVAL_EXPIRED)


async def test_approved_during_a_halt_runs_only_after_disengage(
    store: Store, clock: VirtualClock, tmp_path: Path
) -> None:
    gate, switch, session = await setup(store, clock, tmp_path)
    risky = Action("db.migrate", params={"to": 8}, risk="high")
    with pytest.raises(ApprovalPending) as pending:
        await gate.run(risky, _effect, worker="w", session=session, command_id="c2")
    switch.write(Mode.HALT_ALL, reason="incident", by="op", at=clock.now().isoformat())
    await gate.approvals.decide(pending.value.approval_id, approve=True, by="op", reason="ok")
    ran: list[str] = []

    async def effect() -> str:
        ran.append("x")
        return "done"

    with pytest.raises(ActionDenied) as denied:
        await gate.run(risky, effect, worker="w", session=session, command_id="c2")
    assert denied.value.reason == "killswitch" and ran == []
    switch.write(Mode.DISENGAGED, reason="over", by="op", at=clock.now().isoformat())
    outcome = await gate.run(risky, effect, worker="w", session=session, command_id="c2")
    assert outcome.status == "succeeded" and ran == ["x"]


def kinds_in(kinds: list[str], *wanted: str) -> bool:
    return all(k in kinds for k in wanted)


async def _effect() -> None:
    raise AssertionError("the effect must not run while the approval is pending")


async def test_an_action_halted_at_the_last_look_runs_after_disengage(
    store: Store, clock: VirtualClock, tmp_path: Path
) -> None:
    gate, switch, session = await setup(store, clock, tmp_path)
    action = Action("notes.write", params={"n": 1}, risk="low", cost=1.0)
    ran: list[int] = []

    async def effect() -> int:
        ran.append(1)
        return 1

    permit, _ = await gate.admit(action, worker="w", session=session, command_id="h1")
    assert permit is not None
    switch.write(Mode.HALT_ALL, reason="incident", by="op", at=clock.now().isoformat())
    with pytest.raises(ActionDenied):
        await gate.last_look(action, worker="w", session=session, command_id="h1")
    row = await store.get_action("h1")
    assert row is not None and row.status == "halted" and ran == []
    switch.write(Mode.DISENGAGED, reason="over", by="op", at=clock.now().isoformat())
    outcome = await gate.run(action, effect, worker="w", session=session, command_id="h1")
    assert outcome.status == "succeeded" and not outcome.replayed and ran == [1]
    fresh = await store.get_session(session.id)
    assert fresh is not None and fresh.used_actions == 1 and fresh.used_cost == 1.0


async def test_no_start_after_the_window_ends_even_if_rotation_is_late(
    store: Store, clock: VirtualClock, tmp_path: Path
) -> None:
    gate, _switch, session = await setup(store, clock, tmp_path)
    clock.advance(session.ends_at - clock.now())  # the window's end: nobody rotated it yet
    with pytest.raises(ActionDenied) as denied:
        await gate.run(Action("notes.write", params={"n": 9}), _effect, worker="w", session=session,
                       command_id="late")  # fmt: skip
    assert denied.value.reason == "no_window"
    # and the reservation statement itself refuses, whatever the caller checked before
    assert await storetools.fetchrow(store, "get_action", "late") is None
    async with storetools.transaction(store) as tx:
        assert await tx.fetchrow("reserve_budget", session.id, 0.0, clock.now()) is None
