"""The gate against a real store, on both backends: every check in order, each asserted from the
store (events, action rows, budgets), never from the gate's return value alone."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import anyio
import pytest

from supervisor import events as ev
from supervisor.actions import Action
from supervisor.errors import (
    ActionDenied,
    ActionExpired,
    ApprovalPending,
    IdempotencyConflict,
    StateWriteError,
)
from supervisor.governance.approvals import Approvals
from supervisor.governance.budgets import ModelGovernor, TokenBudgets
from supervisor.governance.escalation import EscalationChain
from supervisor.governance.gate import Gate, Outcome
from supervisor.governance.policy import Policy
from supervisor.killswitch import HostSwitchFile, Mode
from supervisor.runtime.recovery import resolve_in_doubt
from supervisor.store import Event, NewEvent, Session, Store
from supervisor.store.records import ApprovalStatus
from supervisor.store.switches import switches_in
from supervisor.store.tokens import TokenKey
from supervisor.timing.clock import VirtualClock
from tests import storetools

pytestmark = pytest.mark.anyio

FLEET = "gate-it"
SECRET = b"gate-integration-secret"
AT = "2026-11-02T09:00:00+00:00"


@dataclass
class Rig:
    """A gate wired like the daemon wires it, over one open window, with a counting effect."""

    store: Store
    clock: VirtualClock
    gate: Gate
    approvals: Approvals
    switch: HostSwitchFile
    session: Session
    effects: list[str] = field(default_factory=list)

    async def run(
        self,
        action: Action,
        command_id: str,
        *,
        worker: str = "w1",
        session: Session | None = None,
        fail: bool = False,
    ) -> Outcome:
        async def effect() -> dict[str, Any]:
            self.effects.append(command_id)
            if fail:
                raise RuntimeError("effect blew up")
            return {"done": command_id}

        return await self.gate.run(
            action, effect, worker=worker, session=session or self.session, command_id=command_id
        )

    async def refused(
        self, action: Action, command_id: str, reason: str, **kw: Any
    ) -> ActionDenied:
        """Run, expect a refusal with `reason`, and check the effect did not run."""
        before = len(self.effects)
        with pytest.raises(ActionDenied) as info:
            await self.run(action, command_id, **kw)
        assert info.value.reason == reason, info.value
        assert len(self.effects) == before, "a refused action ran its effect"
        return info.value

    async def events(self, kind: str | None = None, session: Session | None = None) -> list[Event]:
        found = await self.store.replay((session or self.session).id)
        return [e for e in found if kind is None or e.kind == kind]

    async def denials(self, reason: str) -> list[Event]:
        return [e for e in await self.events(ev.ACTION_DENIED) if e.reason == reason]

    def engage(self, mode: Mode) -> None:
        self.switch.write(mode, reason="test", by="pytest", at=AT)

    async def store_switch(self, scope: str, target: str, mode: str, fleet: str = FLEET) -> None:
        await storetools.write_switch(self.store, fleet, scope, target, mode, "test", "pytest",
                                      self.clock.now())  # fmt: skip

    async def reload_session(self) -> Session:
        session = await self.store.get_session(self.session.id)
        assert session is not None
        return session


async def build_rig(
    store: Store,
    clock: VirtualClock,
    tmp_path: Path,
    *,
    policy: Mapping[str, Any] | None = None,
    approvals: Mapping[str, Any] | None = None,
    tokens: list[Mapping[str, Any]] | None = None,
    models: Mapping[str, Any] | None = None,
    max_actions: int | None = None,
    max_cost: float | None = None,
    secret: bytes | None = SECRET,
) -> Rig:
    approvals_ = Approvals(store, EscalationChain.from_config(approvals), FLEET)
    switch = HostSwitchFile(tmp_path / "state" / "killswitch.json", secret)
    gate = Gate(store=store, fleet=FLEET, policy=Policy.from_config(policy), approvals=approvals_,
                host_switch=switch, token_budgets=TokenBudgets.from_config(tokens),
                models=ModelGovernor.from_config(models), timezone=ZoneInfo("UTC"))  # fmt: skip
    session, _ = await store.open_window(
        fleet=FLEET, key="2026-11-02T09", starts_at=clock.now(),
        ends_at=clock.now() + timedelta(hours=1), max_cost=max_cost, max_actions=max_actions,
        by="pytest",
    )  # fmt: skip
    return Rig(store, clock, gate, approvals_, switch, session)


MakeRig = Callable[..., Awaitable[Rig]]


@pytest.fixture
def make_rig(store: Store, clock: VirtualClock, tmp_path: Path) -> MakeRig:
    """build_rig over this test's store, clock and directory; keyword arguments as build_rig."""
    return functools.partial(build_rig, store, clock, tmp_path)


@pytest.fixture
async def rig(make_rig: MakeRig) -> Rig:
    return await make_rig()


def act(name: str = "demo.do", risk: str = "low", **kw: Any) -> Action:
    params = kw.pop("params", {"n": 1})
    return Action(name=name, params=params, risk=risk, **kw)  # type: ignore[arg-type]


# --- kill switch: the host file ---------------------------------------------------------------


@pytest.mark.parametrize("mode", [Mode.HALT_ALL, Mode.EMERGENCY])
async def test_host_halt_refuses_every_action_with_an_event(rig: Rig, mode: Mode) -> None:
    rig.engage(mode)
    for i, critical in enumerate((False, True)):
        await rig.refused(act(critical=critical), f"c{i}", "killswitch")
    denied = await rig.denials("killswitch")
    assert {e.command_id for e in denied} == {"c0", "c1"}
    assert all(mode.value in e.payload["detail"] for e in denied)
    assert await rig.events(ev.ACTION_STARTED) == []
    assert await rig.store.get_action("c0") is None


async def test_halt_noncritical_lets_only_critical_actions_through(rig: Rig) -> None:
    rig.engage(Mode.HALT_NONCRITICAL)
    await rig.refused(act(), "normal", "killswitch")
    outcome = await rig.run(act(critical=True), "vital")
    assert outcome.status == "succeeded"
    assert rig.effects == ["vital"]
    started = await rig.events(ev.ACTION_STARTED)
    assert [e.command_id for e in started] == ["vital"]


async def test_disengage_lets_actions_run_again(rig: Rig) -> None:
    rig.engage(Mode.HALT_ALL)
    await rig.refused(act(), "a", "killswitch")
    rig.engage(Mode.DISENGAGED)
    assert (await rig.run(act(), "b")).status == "succeeded"
    assert rig.effects == ["b"]


def _tamper(switch: HostSwitchFile) -> str:
    doc = json.loads(switch.path.read_bytes())
    doc["mode"] = "disengaged"
    doc["reason"] = "nothing to see"
    _install(switch.path, doc)
    return "bad signature"


def _unsigned(switch: HostSwitchFile) -> str:
    doc = json.loads(switch.path.read_bytes())
    doc.pop("sig")
    doc["mode"] = "disengaged"
    _install(switch.path, doc)
    return "unsigned"


def _replayed(switch: HostSwitchFile) -> str:
    # A validly signed *disengaged* file from earlier, copied back after newer changes.
    old = switch.path.read_bytes()
    switch.write(Mode.HALT_ALL, reason="incident", by="oncall", at=AT)
    switch.write(Mode.DISENGAGED, reason="over", by="oncall", at=AT)
    tmp = switch.path.with_name("old.json")
    tmp.write_bytes(old)
    os.replace(tmp, switch.path)
    return "replayed"


def _install(path: Path, doc: Mapping[str, Any]) -> None:
    tmp = path.with_name("tampered.json")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


@pytest.mark.parametrize(
    "spoil", [_tamper, _unsigned, _replayed], ids=["tampered", "unsigned", "replayed"]
)
async def test_unverifiable_switch_file_halts(rig: Rig, spoil: Any) -> None:
    rig.engage(Mode.DISENGAGED)  # a valid file first: actions run
    assert (await rig.run(act(critical=True), "before")).status == "succeeded"
    problem = spoil(rig.switch)
    # Even a critical action: an unverifiable file counts as halt_all.
    await rig.refused(act(critical=True), "after", "killswitch")
    [denied] = await rig.denials("killswitch")
    assert problem in denied.payload["detail"], denied.payload
    assert rig.effects == ["before"]


async def test_switch_file_without_secret_halts(make_rig: MakeRig) -> None:
    rig = await make_rig(secret=None)
    HostSwitchFile(rig.switch.path, SECRET).write(Mode.DISENGAGED, reason="ok", by="op", at=AT)
    await rig.refused(act(), "x", "killswitch")


# --- kill switch: store scopes ------------------------------------------------------------------


async def test_worker_switch_refuses_only_that_worker(rig: Rig) -> None:
    await rig.store_switch("worker", "w1", "halt_all")
    await rig.refused(act(), "w1-a", "killswitch", worker="w1")
    assert (await rig.run(act(), "w2-a", worker="w2")).status == "succeeded"
    [denied] = await rig.denials("killswitch")
    assert denied.worker == "w1" and "worker" in denied.payload["detail"]
    await rig.store_switch("worker", "w1", "disengaged")
    assert (await rig.run(act(), "w1-b", worker="w1")).status == "succeeded"
    assert rig.effects == ["w2-a", "w1-b"]


async def test_an_engage_through_this_store_reaches_the_next_action(rig: Rig) -> None:
    """The switch rows an action decided on are remembered (SQLite: while nothing moved);
    an engage written through this very store (the console's) must not be answered from
    what was remembered before it."""
    assert (await rig.run(act(), "before", worker="w1")).status == "succeeded"
    event = NewEvent(kind=ev.KILLSWITCH_ENGAGED, session_id=rig.session.id,
                     payload={"scope": "worker", "target": "w1"})  # fmt: skip
    await rig.store.set_switches(fleet=FLEET, scope="worker", targets=["w1"], mode=Mode.HALT_ALL,
                                 reason="test", by="pytest", event=event)  # fmt: skip
    await rig.refused(act(), "after", "killswitch", worker="w1")
    assert rig.effects == ["before"]


async def test_a_switch_write_rolled_back_is_not_remembered(rig: Rig) -> None:
    """A transaction of this store wrote a switch, read the rows back (remembered), then
    rolled back: the rows remembered are not the database's, and the next action reads again."""
    assert (await rig.run(act(), "before", worker="w1")).status == "succeeded"
    with pytest.raises(RuntimeError):
        async with storetools.transaction(rig.store) as tx:
            await tx.execute("upsert_kill_switch", FLEET, "worker", "w1", "halt_all", "test",
                             "pytest", rig.clock.now())  # fmt: skip
            rig.store.switch_cache.wrote()  # as set_switches does after its writes
            seen = await switches_in(tx, FLEET, rig.store.switch_cache)
            assert [r.mode for r in seen if r.target == "w1"] == [Mode.HALT_ALL]
            raise RuntimeError("the engage's transaction fails after its read")
    assert (await rig.run(act(), "after", worker="w1")).status == "succeeded"
    assert rig.effects == ["before", "after"]


async def test_session_switch_refuses_only_that_session(rig: Rig) -> None:
    other, _ = await rig.store.open_window(
        fleet=FLEET, key="side-window", starts_at=rig.session.starts_at,
        ends_at=rig.session.ends_at, max_cost=None, max_actions=None, by="pytest",
    )  # fmt: skip
    await rig.store_switch("session", rig.session.id, "halt_all")
    await rig.refused(act(), "in-halted", "killswitch")
    assert (await rig.run(act(), "in-other", session=other)).status == "succeeded"
    assert [e.command_id for e in await rig.events(ev.ACTION_STARTED, other)] == ["in-other"]
    assert await rig.events(ev.ACTION_STARTED) == []


async def test_fleet_switch_refuses_everyone_but_not_other_fleets(rig: Rig) -> None:
    await rig.store_switch("fleet", "", "halt_all", fleet="someone-else")
    assert (await rig.run(act(), "free")).status == "succeeded"
    await rig.store_switch("fleet", "", "halt_noncritical")
    await rig.refused(act(), "w1-x", "killswitch", worker="w1")
    await rig.refused(act(), "w2-x", "killswitch", worker="w2")
    assert (await rig.run(act(critical=True), "vital")).status == "succeeded"
    assert rig.effects == ["free", "vital"]
    # refused inside the started-record transaction: no started record, no reservation left
    assert await rig.store.get_action("w1-x") is None
    session = await rig.reload_session()
    assert session.used_actions == 2


async def test_unknown_mode_in_store_fails_closed(rig: Rig) -> None:
    await rig.store_switch("worker", "w1", "pause-please")
    await rig.refused(act(critical=True), "odd", "killswitch")


# --- idempotency --------------------------------------------------------------------------------


async def test_retry_returns_recorded_outcome_without_running_again(rig: Rig) -> None:
    first = await rig.run(act(), "once")
    again = await rig.run(act(), "once")
    assert (first.status, first.replayed) == ("succeeded", False)
    assert (again.status, again.replayed, again.result) == ("succeeded", True, first.result)
    assert rig.effects == ["once"]
    assert len(await rig.events(ev.ACTION_STARTED)) == 1
    assert len(await rig.events(ev.ACTION_SUCCEEDED)) == 1
    assert (await rig.reload_session()).used_actions == 1


async def test_failed_outcome_is_recorded_and_replayed(rig: Rig) -> None:
    first = await rig.run(act(), "boom", fail=True)
    assert first.status == "failed" and "effect blew up" in (first.error or "")
    again = await rig.run(act(), "boom")
    assert (again.status, again.replayed) == ("failed", True)
    assert rig.effects == ["boom"]
    row = await rig.store.get_action("boom")
    assert row is not None and row.status == "failed"
    assert (await rig.reload_session()).used_actions == 0  # a failure is not charged


async def test_same_id_with_other_params_is_a_conflict(rig: Rig) -> None:
    await rig.run(act(params={"n": 1}), "dup")
    with pytest.raises(IdempotencyConflict):
        await rig.run(act(params={"n": 2}), "dup")
    with pytest.raises(IdempotencyConflict):
        await rig.run(act(name="other.thing", params={"n": 1}), "dup")
    assert rig.effects == ["dup"]


# --- policy, models, tokens ------------------------------------------------------------------------


async def test_policy_deny_records_the_rule(make_rig: MakeRig) -> None:
    rig = await make_rig(policy={"rules": [
        {"name": "no-deletes", "action": "db.delete*", "outcome": "deny"}]})  # fmt: skip
    await rig.refused(act("db.delete_all"), "del", "policy")
    [denied] = await rig.denials("policy")
    assert denied.payload["rule"] == "no-deletes"
    assert "no-deletes" in denied.payload["detail"]
    assert (await rig.run(act("db.read"), "read")).status == "succeeded"
    row = await rig.store.get_action("read")
    assert row is not None and row.rule == "risk:low"


MODELS = {"tiers": {"basic": ["small-*"], "large": ["huge-*"]},
          "access": {"team:support": ["basic"]}}  # fmt: skip
SUPPORT = {"user": "ann", "team": "support"}


async def test_unknown_or_unallowed_model_is_denied(make_rig: MakeRig) -> None:
    rig = await make_rig(models=MODELS)
    await rig.refused(act(model="mystery-7", identity=SUPPORT), "unknown", "model_access")
    await rig.refused(act(model="huge-1", identity=SUPPORT), "big", "model_access")
    assert (await rig.run(act(model="small-2", identity=SUPPORT), "ok")).status == "succeeded"
    details = [e.payload["detail"] for e in await rig.denials("model_access")]
    assert any("unknown model" in d for d in details)
    assert len(await rig.events(ev.MODEL_ACCESS_DENIED)) == 2


async def test_token_budget_exhaustion(make_rig: MakeRig) -> None:
    rig = await make_rig(tokens=[
        {"scope": "team", "identity": "support", "period": "daily", "max_tokens": 100}])  # fmt: skip
    assert (await rig.run(act(tokens=60, identity=SUPPORT), "t1")).status == "succeeded"
    await rig.refused(act(tokens=60, identity=SUPPORT), "t2", "token_budget")
    await rig.refused(act(tokens=50, identity=SUPPORT), "t3", "token_budget")
    assert (await rig.run(act(tokens=40, identity=SUPPORT), "t4")).status == "succeeded"
    assert (await rig.run(act(tokens=500, identity={"team": "other"}), "t5")).status == "succeeded"
    exhausted = await rig.events(ev.TOKEN_BUDGET_EXHAUSTED)
    assert len(exhausted) == 1 and exhausted[0].reason == "token_budget"
    assert len(await rig.denials("token_budget")) == 2
    usage = await rig.store.token_usage(TokenKey("team", "support", "2026-11-02"))
    assert usage.tokens == 100


TEAM_BUDGET = [{"scope": "team", "identity": "support", "period": "daily", "max_tokens": 100}]


async def test_concurrent_actions_cannot_share_the_last_room_of_a_token_budget(
    make_rig: MakeRig,
) -> None:
    """Both estimates fit what the budget had left when each was checked, not both together:
    the reservation made with the started record lets one through and refuses the other."""
    rig = await make_rig(tokens=TEAM_BUDGET)
    both_checked = anyio.Event()
    checked = 0
    real = rig.store.token_usage

    async def token_usage(key: TokenKey) -> Any:
        nonlocal checked
        usage = await real(key)
        checked += 1
        if checked == 2:
            both_checked.set()
        await both_checked.wait()  # neither starts before both have read the usage
        return usage

    rig.store.token_usage = token_usage  # type: ignore[method-assign]
    outcomes: list[str] = []

    async def one(command_id: str) -> None:
        try:
            outcomes.append((await rig.run(act(tokens=60, identity=SUPPORT), command_id)).status)
        except ActionDenied as exc:
            outcomes.append(exc.reason)

    async with anyio.create_task_group() as tg:
        tg.start_soon(one, "r1")
        tg.start_soon(one, "r2")
    assert sorted(outcomes) == ["succeeded", "token_budget"]
    assert len(rig.effects) == 1
    rig.store.token_usage = real  # type: ignore[method-assign]
    assert (await rig.store.token_usage(TokenKey("team", "support", "2026-11-02"))).tokens == 60
    assert len(await rig.events(ev.TOKEN_BUDGET_EXHAUSTED)) == 1


async def test_a_failed_or_halted_action_gives_its_token_reservation_back(
    make_rig: MakeRig,
) -> None:
    rig = await make_rig(tokens=TEAM_BUDGET)
    key = TokenKey("team", "support", "2026-11-02")
    failed = await rig.run(act(tokens=70, identity=SUPPORT), "f1", fail=True)
    assert failed.status == "failed"
    assert (await rig.store.token_usage(key)).tokens == 0

    # The effect reports what it really used: that is what the budget counts.
    async def reported() -> dict[str, int]:
        return {"tokens": 25}

    outcome = await rig.gate.run(act(tokens=70, identity=SUPPORT), reported, worker="w1",
                                 session=rig.session, command_id="r1")  # fmt: skip
    assert outcome.status == "succeeded"
    assert (await rig.store.token_usage(key)).tokens == 25


async def stop_in_flight(rig: Rig, command_id: str, tokens: int = 60) -> None:
    """Run a safe-to-retry action whose effect an emergency stops midway: it is in-doubt."""

    async def stopped_midway() -> None:
        rig.gate.stop_in_flight("fleet", "", Mode.EMERGENCY)
        await anyio.sleep(1)  # cancelled here, at its next await
        rig.effects.append("never")

    with pytest.raises(ActionDenied):
        await rig.gate.run(act(tokens=tokens, identity=SUPPORT, safe_to_retry=True),
                           stopped_midway, worker="w1", session=rig.session,
                           command_id=command_id)  # fmt: skip
    row = await rig.store.get_action(command_id)
    assert row is not None and row.status == "in_doubt"


async def test_an_in_doubt_action_keeps_its_tokens_once_and_a_rerun_does_not_take_them_again(
    make_rig: MakeRig,
) -> None:
    rig = await make_rig(tokens=TEAM_BUDGET)
    key = TokenKey("team", "support", "2026-11-02")
    await stop_in_flight(rig, "k1")
    assert (await rig.store.token_usage(key)).tokens == 60  # it may have spent them
    # Re-run under the same command_id (safe to retry): it holds the 60 already; 60 more would
    # not fit the 100, and must not be asked for.
    outcome = await rig.run(act(tokens=60, identity=SUPPORT, safe_to_retry=True), "k1")
    assert outcome.status == "succeeded"
    assert (await rig.store.token_usage(key)).tokens == 60
    assert await rig.events(ev.TOKEN_BUDGET_EXHAUSTED) == []


@pytest.mark.parametrize(("verdict", "left"), [("failed", 0), ("done", 60)])
async def test_resolving_an_in_doubt_action_settles_its_tokens(
    make_rig: MakeRig, verdict: str, left: int
) -> None:
    rig = await make_rig(tokens=TEAM_BUDGET)
    key = TokenKey("team", "support", "2026-11-02")
    await stop_in_flight(rig, "k2")
    await resolve_in_doubt(rig.store, "k2", done=verdict == "done", by="op")
    assert (await rig.store.token_usage(key)).tokens == left
    # Nothing is held any more: a second resolution finds no in-doubt action to settle.
    assert await storetools.fetchall(rig.store, "token_holds_of", "k2") == []


# --- approvals --------------------------------------------------------------------------------------

NEEDS_APPROVAL = {
    "rules": [{"name": "ops-approval", "action": "ops.*", "outcome": "require_approval"}]
}


async def approval_rig(make_rig: MakeRig, **kw: Any) -> Rig:
    return await make_rig(policy=kw.pop("policy", NEEDS_APPROVAL),
                          approvals=kw.pop("approvals", {"timeout": "60m"}), **kw)  # fmt: skip


async def pending(rig: Rig, command_id: str = "op") -> str:
    with pytest.raises(ApprovalPending) as info:
        await rig.run(act("ops.restart"), command_id)
    assert rig.effects == []
    return info.value.approval_id


async def test_approved_action_runs_once(make_rig: MakeRig) -> None:
    rig = await approval_rig(make_rig)
    approval_id = await pending(rig)
    assert await pending(rig) == approval_id  # a retry finds the same approval, still pending
    assert len(await rig.events(ev.APPROVAL_REQUESTED)) == 1
    decided = await rig.approvals.decide(approval_id, approve=True, by="alice", reason="ok")
    assert decided.status == ApprovalStatus.APPROVED
    outcome = await rig.run(act("ops.restart"), "op")
    again = await rig.run(act("ops.restart"), "op")
    assert outcome.status == "succeeded" and again.replayed
    assert rig.effects == ["op"]
    assert [e.payload["by"] for e in await rig.events(ev.APPROVAL_GRANTED)] == ["alice"]
    row = await rig.store.get_action("op")
    assert row is not None and row.rule == "ops-approval"


async def test_denied_approval_refuses(make_rig: MakeRig) -> None:
    rig = await approval_rig(make_rig)
    approval_id = await pending(rig)
    await rig.approvals.decide(approval_id, approve=False, by="bob", reason="not today")
    await rig.refused(act("ops.restart"), "op", "approval_denied")
    [denied] = await rig.denials("approval_denied")
    assert "bob" in denied.payload["detail"] and denied.payload["rule"] == "ops-approval"
    assert len(await rig.events(ev.APPROVAL_DENIED)) == 1


async def test_approval_past_deadline_expires(make_rig: MakeRig) -> None:
    rig = await approval_rig(make_rig, approvals={"timeout": "10m"})
    approval_id = await pending(rig)
    rig.clock.advance(timedelta(minutes=10))
    with pytest.raises(ActionExpired):
        await rig.run(act("ops.restart"), "op")
    assert rig.effects == []
    [expired] = await rig.events(ev.APPROVAL_EXPIRED)
    assert expired.payload["approval"] == approval_id
    assert len(await rig.denials("approval_expired")) == 1
    row = await rig.store.approval(approval_id)
    assert row is not None and row.status == ApprovalStatus.EXPIRED and row.decided_by == "deadline"


async def test_escalation_scan_expires_at_the_deadline(make_rig: MakeRig) -> None:
    rig = await approval_rig(make_rig, approvals={"timeout": "10m"})
    approval_id = await pending(rig)
    rig.clock.advance(timedelta(minutes=9, seconds=59))
    assert await rig.approvals.escalate_due() == {"escalated": 0, "expired": 0}
    rig.clock.advance(timedelta(seconds=1))
    assert await rig.approvals.escalate_due() == {"escalated": 0, "expired": 1}
    [expired] = await rig.events(ev.APPROVAL_EXPIRED)
    assert expired.payload["approval"] == approval_id and expired.created_at == rig.clock.now()


CHAIN = {"timeout": "60m", "initial_tier": "operators",
         "escalation": [{"after": "15m", "tier": "oncall"}, {"after": "30m", "tier": "manager"}]}  # fmt: skip


async def test_escalation_chain_moves_the_tier(make_rig: MakeRig) -> None:
    rig = await approval_rig(make_rig, approvals=CHAIN)
    approval_id = await pending(rig)

    async def tier() -> str:
        row = await rig.store.approval(approval_id)
        assert row is not None
        return row.tier

    assert await tier() == "operators"
    rig.clock.advance(timedelta(minutes=16))
    assert (await rig.approvals.escalate_due())["escalated"] == 1
    assert await tier() == "oncall"
    rig.clock.advance(timedelta(minutes=15))
    await rig.approvals.escalate_due()
    assert await tier() == "manager"
    moves = [(e.payload["from"], e.payload["to"]) for e in await rig.events(ev.APPROVAL_ESCALATED)]
    assert moves == [("operators", "oncall"), ("oncall", "manager")]


async def test_policy_escalate_starts_at_the_first_step(make_rig: MakeRig) -> None:
    policy = {"rules": [{"name": "esc", "action": "ops.*", "outcome": "escalate"}]}
    rig = await approval_rig(make_rig, policy=policy, approvals=CHAIN)
    approval_id = await pending(rig)
    row = await rig.store.approval(approval_id)
    assert row is not None and row.tier == "oncall"


# --- budgets ----------------------------------------------------------------------------------------


async def test_budget_exhaustion_is_announced_once(make_rig: MakeRig) -> None:
    rig = await make_rig(max_actions=3)
    for i in range(3):
        assert (await rig.run(act(), f"ok{i}")).status == "succeeded"
    for i in range(3):
        await rig.refused(act(), f"over{i}", "budget")
    assert len(await rig.events(ev.BUDGET_EXHAUSTED)) == 1
    assert len(await rig.denials("budget")) == 3
    session = await rig.reload_session()
    assert session.used_actions == 3


async def test_cost_budget(make_rig: MakeRig) -> None:
    rig = await make_rig(max_cost=1.0)
    assert (await rig.run(act(cost=0.6), "a")).status == "succeeded"
    await rig.refused(act(cost=0.6), "b", "budget")
    assert (await rig.run(act(cost=0.4), "c")).status == "succeeded"
    assert (await rig.reload_session()).used_cost == pytest.approx(1.0)


async def test_concurrent_runs_never_overspend(make_rig: MakeRig) -> None:
    rig = await make_rig(max_actions=10)
    outcomes: list[str] = []

    async def one(i: int) -> None:
        try:
            outcomes.append((await rig.run(act(params={"i": i}), f"race{i}")).status)
        except ActionDenied as exc:
            outcomes.append(exc.reason)

    async with anyio.create_task_group() as tg:
        for i in range(30):
            tg.start_soon(one, i)
    assert sorted(outcomes) == ["budget"] * 20 + ["succeeded"] * 10
    assert len(rig.effects) == 10 and len(set(rig.effects)) == 10
    assert len(await rig.events(ev.ACTION_STARTED)) == 10
    assert len(await rig.events(ev.BUDGET_EXHAUSTED)) == 1
    session = await rig.reload_session()
    assert session.used_actions == 10


# --- windows ----------------------------------------------------------------------------------------


async def test_no_action_outside_an_open_window(rig: Rig) -> None:
    rig.clock.advance(timedelta(hours=1))  # the window's end
    await rig.refused(act(), "late", "no_window")
    assert await rig.store.get_action("late") is None


async def test_no_action_in_a_closed_window(rig: Rig) -> None:
    await rig.store.close_window(rig.session.id, by="pytest")
    closed = await rig.reload_session()
    await rig.refused(act(), "closed", "no_window", session=closed)
    # a stale open Session object does not help: the started record re-checks the window
    await rig.refused(act(), "stale", "no_window")
    assert await rig.events(ev.ACTION_STARTED) == []


# --- fail-closed writes and the last look ----------------------------------------------------------


def _failing_begin(original: Any) -> Any:
    @asynccontextmanager
    async def transaction() -> AsyncIterator[Any]:
        raise StateWriteError("injected: cannot begin a write")
        yield  # pragma: no cover

    return transaction


def _failing_commit(original: Any) -> Any:
    @asynccontextmanager
    async def transaction() -> AsyncIterator[Any]:
        async with original() as tx:
            yield tx
            raise StateWriteError("injected: commit failed")  # rolls the transaction back

    return transaction


def _failing_batch(what: str) -> Any:
    """One-statement writes (Postgres) failing as their connection or implicit COMMIT would:
    nothing written."""

    async def batched(name: str, **call: Any) -> Any:
        raise StateWriteError(f"injected: {what}")

    return batched


@pytest.mark.parametrize("breaker", [_failing_begin, _failing_commit], ids=["begin", "commit"])
async def test_failed_started_write_stops_the_action(
    rig: Rig, monkeypatch: pytest.MonkeyPatch, breaker: Any
) -> None:
    backend = rig.store.backend
    monkeypatch.setattr(backend, "transaction", breaker(backend.transaction))
    if backend.one_statement_writes:  # Postgres writes the started record in one statement
        what = "commit failed" if breaker is _failing_commit else "cannot begin a write"
        monkeypatch.setattr(backend, "batched", _failing_batch(what))
    with pytest.raises(StateWriteError, match="injected"):
        await rig.run(act(), "doomed")
    assert rig.effects == []
    monkeypatch.undo()
    assert await rig.store.get_action("doomed") is None
    assert await rig.events(ev.ACTION_STARTED) == []
    assert (await rig.reload_session()).used_actions == 0
    # The failure left nothing behind: the same command runs normally once the store is back.
    assert (await rig.run(act(), "doomed")).status == "succeeded"
    assert rig.effects == ["doomed"]


async def test_failed_refusal_write_is_not_swallowed(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig.engage(Mode.HALT_ALL)
    monkeypatch.setattr(rig.store.backend, "transaction", _failing_begin(None))
    with pytest.raises(StateWriteError):
        await rig.run(act(), "x")
    assert rig.effects == []


async def test_last_look_halts_an_engage_after_the_started_record(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = rig.store.begin_action

    async def begin_then_engage(**kw: Any) -> Any:
        result = await original(**kw)
        rig.engage(Mode.HALT_ALL)  # lands between the started record and the effect
        return result

    monkeypatch.setattr(rig.store, "begin_action", begin_then_engage)
    await rig.refused(act(), "late-halt", "killswitch")
    row = await rig.store.get_action("late-halt")
    assert row is not None and row.status == "halted"
    kinds = [e.kind for e in await rig.events() if e.command_id == "late-halt"]
    assert kinds == [ev.ACTION_STARTED, ev.ACTION_FAILED]
    session = await rig.reload_session()
    assert (session.used_actions, session.used_cost) == (0, 0.0)
    reserved = await storetools.fetchrow(rig.store, "get_session", rig.session.id)
    assert reserved is not None and reserved["reserved_actions"] == 0


async def test_engage_while_waiting_for_the_store_leaves_no_started_record(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = rig.store.begin_action

    async def engage_then_begin(**kw: Any) -> Any:
        rig.engage(Mode.HALT_ALL)  # lands after the first check, before the started record
        return await original(**kw)

    monkeypatch.setattr(rig.store, "begin_action", engage_then_begin)
    await rig.refused(act(), "raced", "killswitch")
    assert await rig.store.get_action("raced") is None
    assert await rig.events(ev.ACTION_STARTED) == []
    row = await storetools.fetchrow(rig.store, "get_session", rig.session.id)
    assert row is not None and row["reserved_actions"] == 0


async def test_a_host_emergency_engaged_while_the_outcome_waits_for_the_store_lands_no_success(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The effect has returned; its outcome waits for the store (a lost connection's retry, the
    group commit's writer) while an operator engages the host's emergency. The outcome's
    transaction reads the host file itself: the action is in-doubt, never a success."""
    original = rig.store.finish_action

    async def engage_then_finish(**kw: Any) -> Any:
        rig.engage(Mode.EMERGENCY)
        return await original(**kw)

    monkeypatch.setattr(rig.store, "finish_action", engage_then_finish)
    with pytest.raises(ActionDenied) as info:
        await rig.run(act(), "late-emergency")
    assert info.value.reason == "killswitch" and "host emergency" in str(info.value)
    assert rig.effects == ["late-emergency"]  # it ran; what it did is not recorded as done
    row = await rig.store.get_action("late-emergency")
    assert row is not None and row.status == "in_doubt"
    assert await rig.events(ev.ACTION_SUCCEEDED) == []


# --- one attempt path: dispatch and guard record alike -------------------------------------------


@pytest.mark.parametrize("way", ["dispatch", "guard", "guard-fails"])
async def test_a_guarded_action_is_recorded_like_a_dispatched_one(
    rig: Rig, tmp_path: Path, way: str
) -> None:
    """`ctx.guard` and `ctx.dispatch` go through `Gate.attempt`: the outcome carries the
    cycle's correlation id, and the action counts as admitted with its latency observed (a
    guarded one used to be recorded with no correlation id and counted nowhere)."""
    import random

    from supervisor.runtime.worker import CycleContext, EffectLog

    seen: list[float] = []

    class Observer:
        def observe_action(self, outcome: str, reason: str = "") -> None:
            pass

        def observe_latency(self, seconds: float) -> None:
            seen.append(seconds)

    rig.gate.observer = Observer()
    rig.gate.stats.latencies = []
    ctx = CycleContext(fleet=FLEET, worker="w1", cycle=3, session=rig.session, gate=rig.gate,
                       clock=rig.clock, rng=random.Random(3),
                       effects=EffectLog(tmp_path / "effects.jsonl"), correlation_id="corr-3")  # fmt: skip
    if way == "dispatch":
        await ctx.dispatch(act("demo.rotate"))
    elif way == "guard":
        async with ctx.guard("demo.rotate", params={"n": 1}, risk="low"):
            pass
    else:
        with pytest.raises(RuntimeError):
            async with ctx.guard("demo.rotate", params={"n": 1}, risk="low"):
                raise RuntimeError("rotation failed")
    kind = ev.ACTION_FAILED if way == "guard-fails" else ev.ACTION_SUCCEEDED
    started, done = await rig.events(ev.ACTION_STARTED), await rig.events(kind)
    assert len(started) == len(done) == 1
    assert started[0].correlation_id == done[0].correlation_id == "corr-3"
    assert rig.gate.stats.admitted == 1
    assert len(rig.gate.stats.latencies) == 1 and len(seen) == 1


# --- the hot path's statements ------------------------------------------------------------------

#: Named statements of one governed, auto-approved action, from the ledger lookup to the outcome:
#: lookup_action; claim_command, kill_switches_for_start, reserve_budget, insert_action,
#: insert_event (started); kill_switches (last look); kill_switches_for_start, finish_action,
#: settle_budget, insert_event (outcome). It was 17 with the sequence number read apart from
#: each event, the ledger read twice, written apart from its claim and again with the outcome.
HOT_PATH_STATEMENTS = 8  # named statements of an auto-approved action (the bound)
# Everything SQLite executes for one, transaction control aside: the named statements and a
# `PRAGMA data_version` in each place the switches are read (the stamp the cache answers by).
SQLITE_ALL_STATEMENTS = 10


async def test_a_governed_action_costs_at_most_its_statement_budget(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    from supervisor.store.postgres import _PgTx
    from supervisor.store.sqlite import _SQLiteTx

    ran: list[str] = []
    for tx_class in (_SQLiteTx, _PgTx):
        for method in ("execute", "fetchrow", "fetchval", "fetchall"):
            original = getattr(tx_class, method)

            def counting(original: Any) -> Any:
                async def call(self: Any, name: str, *args: Any) -> Any:
                    ran.append(name)
                    return await original(self, name, *args)

                return call

            monkeypatch.setattr(tx_class, method, counting(original))
    await rig.run(act(), "cmd-warm")  # the stream's first event and other first-time work
    ran.clear()
    executed: list[str] = []
    conn = getattr(rig.store.backend, "_conn", None)
    if conn is not None:  # SQLite: every statement the connection runs
        control = ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE")
        conn.set_trace_callback(
            lambda sql: None if sql.startswith(control) else executed.append(sql)
        )
    try:
        outcome = await rig.run(act(params={"n": 2}), "cmd-counted")
    finally:
        if conn is not None:
            conn.set_trace_callback(None)
    assert outcome.status == "succeeded"
    assert len(ran) <= HOT_PATH_STATEMENTS, f"{len(ran)} statements: {ran}"
    assert ran.count("lookup_action") == 0 and ran.count("kill_switches") <= 1, ran
    if conn is not None:
        assert len(executed) <= SQLITE_ALL_STATEMENTS, executed
