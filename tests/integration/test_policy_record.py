"""What the gate records for policy tuning, on both backends: the rule and short reason with every
denial and approval request, the whole proposal (identity, model, tokens) for replay, and a
shadow policy that disagrees in telemetry only and never stops an action, even when it fails."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from supervisor import events as ev
from supervisor.actions import Action
from supervisor.config import load_config
from supervisor.errors import ActionDenied, ApprovalPending
from supervisor.governance.approvals import Approvals
from supervisor.governance.budgets import ModelGovernor, TokenBudgets
from supervisor.governance.escalation import EscalationChain
from supervisor.governance.gate import Gate
from supervisor.governance.policy import Policy
from supervisor.governance.replay import ShadowPolicy, proposals_of
from supervisor.killswitch import HostSwitchFile
from supervisor.store import Event, Session, Store
from supervisor.timing.clock import VirtualClock
from tests.storetools import NO_SWITCH_TARGET

pytestmark = pytest.mark.anyio

FLEET = "record-it"
POLICY = {
    "rules": [
        {"name": "no-deletes", "action": "db.delete*", "outcome": "deny"},
        {"name": "ops-approval", "action": "ops.*", "outcome": "require_approval"},
    ]
}
MODELS = {"tiers": {"basic": ["small-*"]}, "access": {"team:support": ["basic"]}}
WHO = {"user": "ann", "team": "support"}


async def make_gate(store: Store, tmp_path: Path) -> tuple[Gate, Session]:
    gate = Gate(store=store, fleet=FLEET, policy=Policy.from_config(POLICY),
                approvals=Approvals(store, EscalationChain.from_config(None), FLEET),
                host_switch=HostSwitchFile(tmp_path / "killswitch.json", b"secret"),
                token_budgets=TokenBudgets.from_config(None),
                models=ModelGovernor.from_config(MODELS), timezone=ZoneInfo("UTC"))  # fmt: skip
    now = store.clock.now()
    session, _ = await store.open_window(fleet=FLEET, key="w1", starts_at=now,
                                         ends_at=now + timedelta(hours=1), max_cost=None,
                                         max_actions=None, by="pytest")  # fmt: skip
    return gate, session


async def run(gate: Gate, session: Session, action: Action, command_id: str) -> str:
    async def effect() -> str:
        return "done"

    try:
        outcome = await gate.run(
            action, effect, worker="w1", session=session, command_id=command_id
        )
    except ActionDenied as exc:
        return f"denied:{exc.reason}"
    except ApprovalPending:
        return "pending"
    return outcome.status


def act(name: str, **kw: Any) -> Action:
    return Action(name=name, params={"n": 1}, identity=WHO, **kw)


async def events(store: Store, session: Session, kind: str) -> list[Event]:
    await store.flush_telemetry()
    return [e for e in await store.replay(session.id) if e.kind == kind]


async def test_denials_and_approval_requests_carry_rule_reason_and_proposal(
    store: Store, tmp_path: Path
) -> None:
    gate, session = await make_gate(store, tmp_path)
    assert await run(gate, session, act("db.delete_all", model="small-1", tokens=7), "del") == (
        "denied:policy"
    )
    assert (
        await run(gate, session, act("mail.send", model="huge-1"), "big") == "denied:model_access"
    )
    assert await run(gate, session, act("ops.restart", risk="high", cost=2.0), "op") == "pending"
    assert (
        await run(gate, session, act("mail.send", model="small-2", tokens=40), "ok") == "succeeded"
    )

    denied = {e.command_id: e.payload for e in await events(store, session, ev.ACTION_DENIED)}
    explained = gate.policy.decide(act("db.delete_all"), "w1")
    assert denied["del"]["rule"] == "no-deletes" == explained.rule
    assert denied["del"]["why"] == explained.detail  # the same words `policy explain` prints
    assert denied["del"]["decision"] == "deny"
    assert (denied["del"]["model"], denied["del"]["tokens"]) == ("small-1", 7)
    assert denied["del"]["identity"] == WHO and denied["del"]["params"] == {"n": 1}
    assert denied["big"]["rule"] == "risk:low" and denied["big"]["decision"] == "deny"
    [requested] = await events(store, session, ev.APPROVAL_REQUESTED)
    assert requested.payload["rule"] == "ops-approval"
    assert requested.payload["why"] == "rule 'ops-approval' (action 'ops.*'): require_approval"
    assert requested.payload["command_id"] == "op" and requested.payload["cost"] == 2.0
    row = await store.get_action("ok")
    assert row is not None
    assert (row.model, row.tokens, row.decision) == ("small-2", 40, "allow")

    # The store gives replay all four back as proposals, each once, with what was decided.
    actions, refusals = await store.proposal_rows(session.id)
    counts: Counter[str] = Counter()
    found = {p.command_id: p for p in proposals_of(actions, refusals, counts)}
    assert {cid: p.decision for cid, p in found.items()} == {
        "del": "deny", "big": "deny", "op": "require_approval", "ok": "allow"}  # fmt: skip
    assert found["ok"].action == Action(name="mail.send", params={"n": 1}, identity=WHO,
                                        model="small-2", tokens=40)  # fmt: skip
    assert found["op"].action.cost == 2.0 and counts["unreadable"] == 0


async def test_refusals_before_the_policy_name_the_gate_check(store: Store, tmp_path: Path) -> None:
    gate, session = await make_gate(store, tmp_path)
    await store.close_window(session.id, by="pytest")
    closed = await store.get_session(session.id)
    assert closed is not None
    assert await run(gate, closed, act("mail.send"), "late") == "denied:no_window"
    [denied] = await events(store, closed, ev.ACTION_DENIED)
    assert denied.payload["rule"] == "no_window" and "not open" in denied.payload["why"]
    actions, refusals = await store.proposal_rows(session.id)
    counts: Counter[str] = Counter()
    assert proposals_of(actions, refusals, counts) == [] and counts["not_decided"] == 1


SHADOW = """
[policy.risk]
medium = "deny"
"""


async def test_shadow_records_disagreements_only(store: Store, tmp_path: Path) -> None:
    gate, session = await make_gate(store, tmp_path)
    candidate = tmp_path / "candidate.toml"
    candidate.write_text(SHADOW)
    gate.shadow = ShadowPolicy(candidate, load_config(None))
    assert await run(gate, session, act("a.x", risk="low"), "low") == "succeeded"
    assert await run(gate, session, act("a.x", risk="medium"), "med") == "succeeded"
    assert await run(gate, session, act("db.delete_x", risk="medium"), "del") == "denied:policy"
    shadows = await events(store, session, ev.POLICY_SHADOW)
    assert [(e.command_id, e.reason) for e in shadows] == [("med", "allow->deny")]
    assert not shadows[0].state_bearing
    assert shadows[0].payload["shadow_rule"] == "risk:medium"
    assert gate.shadow.disagreements == 1 and gate.shadow.errors == 0


async def test_a_retried_proposal_is_one_disagreement(store: Store, tmp_path: Path) -> None:
    # A pending approval is asked again on every retry; the shadow reports its command once.
    gate, session = await make_gate(store, tmp_path)
    candidate = tmp_path / "candidate.toml"
    candidate.write_text("[policy]\nunmatched = 'deny'\n[policy.risk]\nhigh = 'deny'\n")
    gate.shadow = ShadowPolicy(candidate, load_config(None))
    for _ in range(3):
        assert await run(gate, session, act("ops.restart", risk="high"), "op") == "pending"
    shadows = await events(store, session, ev.POLICY_SHADOW)
    assert [(e.command_id, e.reason) for e in shadows] == [("op", "require_approval->deny")]


@pytest.mark.parametrize(
    "broken", ["[policy.risk\n", "[policy.risk]\nmedium = 'sometimes'\n", None]
)
async def test_a_failing_shadow_never_stops_an_action(
    store: Store, tmp_path: Path, broken: str | None
) -> None:
    gate, session = await make_gate(store, tmp_path)
    candidate = tmp_path / "candidate.toml"
    if broken is not None:
        candidate.write_text(broken)
    gate.shadow = ShadowPolicy(candidate, load_config(None))
    results = [await run(gate, session, act("a.x", risk="medium"), f"c{i}") for i in range(3)]
    assert results == ["succeeded"] * 3
    assert gate.shadow.errors == 3
    assert await events(store, session, ev.POLICY_SHADOW) == []
    assert len(await events(store, session, ev.ACTION_SUCCEEDED)) == 3
    # Fixed while running: the next proposal is compared again, without a restart.
    candidate.write_text(SHADOW)
    assert await run(gate, session, act("a.x", risk="medium"), "c3") == "succeeded"
    assert [e.reason for e in await events(store, session, ev.POLICY_SHADOW)] == ["allow->deny"]


async def test_a_shadow_that_raises_inside_the_decision_is_counted(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate, session = await make_gate(store, tmp_path)
    candidate = tmp_path / "candidate.toml"
    candidate.write_text(SHADOW)
    shadow = ShadowPolicy(candidate, load_config(None))
    gate.shadow = shadow

    def boom(action: Action, worker: str) -> Any:
        raise RecursionError("shadow blew up")

    monkeypatch.setattr(shadow, "decide", boom)
    assert await run(gate, session, act("a.x", risk="medium"), "c0") == "succeeded"
    assert shadow.errors == 1


async def test_an_empty_window_has_no_proposal_rows(store: Store, clock: VirtualClock) -> None:
    # The replay queries exist and read on both backends.
    now = clock.now()
    session, _ = await store.open_window(fleet=FLEET, key="empty", starts_at=now,
                                         ends_at=now + timedelta(hours=1), max_cost=None,
                                         max_actions=None, by="pytest")  # fmt: skip
    assert await store.proposal_rows(session.id) == ([], [])


async def test_rows_from_before_the_migration_replay_as_unknown(store: Store) -> None:
    # An action row written without the fields migration 0004 added (as every row before it):
    # replay still decides it, and says the recorded decision is unknown rather than guess.
    now = store.clock.now()
    session, _ = await store.open_window(fleet=FLEET, key="old", starts_at=now,
                                         ends_at=now + timedelta(hours=1), max_cost=None,
                                         max_actions=None, by="pytest")  # fmt: skip
    status, _ = await store.begin_action(
        command_id="old-1", operation="action:a.x", params={"n": 1}, fleet=FLEET,
        session_id=session.id, worker="w1", name="a.x", risk="high", cost=0.5, critical=False,
        safe_to_retry=False, rule="risk:high", correlation_id=None, agent_id=None,
        switches=NO_SWITCH_TARGET,
    )  # fmt: skip
    assert status == "started"
    actions, refusals = await store.proposal_rows(session.id)
    counts: Counter[str] = Counter()
    [old] = proposals_of(actions, refusals, counts)
    assert (old.decision, old.action.tokens, old.action.identity, old.action.model) == (
        "unknown", 0, {}, None)  # fmt: skip
    assert old.action.risk == "high" and old.action.cost == 0.5
