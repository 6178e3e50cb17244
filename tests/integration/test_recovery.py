"""The recovery scan over every broken state a crash leaves behind, on both backends.

Each test seeds the store with one broken state through the store's own operations (never by
hand-written rows), runs `recovery.scan`, and asserts the repair from the store: rows, events and
budgets, not the report alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from supervisor import events as ev
from supervisor.actions import Action
from supervisor.errors import ActionDenied, NotFound
from supervisor.governance.approvals import Approvals
from supervisor.governance.budgets import ModelGovernor, TokenBudgets
from supervisor.governance.escalation import EscalationChain, EscalationStep
from supervisor.governance.gate import Gate
from supervisor.governance.policy import Policy
from supervisor.killswitch import HostSwitchFile, Mode
from supervisor.runtime import recovery
from supervisor.store import Event, Session, Store, system_stream
from supervisor.store.actions import ActionRow
from supervisor.store.approvals import ApprovalRecord
from supervisor.store.base import Row
from supervisor.timing.clock import VirtualClock
from tests import storetools
from tests.storetools import NO_SWITCH_TARGET

pytestmark = pytest.mark.anyio

FLEET = "recovery-it"
SECRET = b"recovery-integration-secret"
CHAIN = EscalationChain(
    timeout=3600.0,
    initial_tier="operators",
    steps=(EscalationStep(900.0, "oncall"), EscalationStep(1800.0, "manager")),
)


@dataclass
class Rig:
    store: Store
    clock: VirtualClock
    approvals: Approvals
    switch: HostSwitchFile
    gate: Gate
    effects: list[str] = field(default_factory=list)

    async def scan(self, **kw: Any) -> recovery.RecoveryReport:
        kw.setdefault("started_before", self.clock.now())
        return await recovery.scan(self.store, fleet=FLEET, approvals=self.approvals,
                                   host_switch=self.switch, by="pytest", **kw)  # fmt: skip

    async def window(
        self, start: datetime, hours: int = 1, max_cost: float | None = 10.0
    ) -> Session:
        session, _ = await self.store.open_window(
            fleet=FLEET, key=start.strftime("%Y-%m-%dT%H"), starts_at=start,
            ends_at=start + timedelta(hours=hours), max_cost=max_cost, max_actions=None,
            by="pytest",
        )  # fmt: skip
        return session

    async def begin(self, session: Session, command_id: str, action: Action) -> None:
        """A durable started record (and budget reservation), as the gate writes it, then a
        crash: no outcome is ever written."""
        status, _ = await self.store.begin_action(
            command_id=command_id, operation=f"action:{action.name}", params=action.params,
            fleet=FLEET, session_id=session.id, worker="w1", name=action.name, risk=action.risk,
            cost=action.cost, critical=action.critical, safe_to_retry=action.safe_to_retry,
            rule="risk:low", correlation_id=None, agent_id=None,
            switches=NO_SWITCH_TARGET,
        )  # fmt: skip
        assert status == "started"

    async def run(self, action: Action, command_id: str, session: Session) -> Any:
        async def effect() -> dict[str, Any]:
            self.effects.append(command_id)
            return {"ran": len(self.effects)}

        fresh = await self.store.get_session(session.id)
        assert fresh is not None
        return await self.gate.run(action, effect, worker="w1", session=fresh,
                                   command_id=command_id)  # fmt: skip

    async def events(self, session_id: str, kind: str | None = None) -> list[Event]:
        await self.store.flush_telemetry()
        found = await self.store.replay(session_id)
        return [e for e in found if kind is None or e.kind == kind]

    async def session_row(self, session: Session) -> Row:
        row = await storetools.fetchrow(self.store, "get_session", session.id)
        assert row is not None
        return row

    async def action_row(self, command_id: str) -> ActionRow:
        row = await self.store.get_action(command_id)
        assert row is not None
        return row


@pytest.fixture
def rig(store: Store, clock: VirtualClock, tmp_path: Path) -> Rig:
    approvals = Approvals(store, CHAIN, FLEET)
    switch = HostSwitchFile(tmp_path / "state" / "killswitch.json", SECRET)
    gate = Gate(store=store, fleet=FLEET, policy=Policy(), approvals=approvals,
                host_switch=switch, token_budgets=TokenBudgets(), models=ModelGovernor(),
                timezone=ZoneInfo("UTC"))  # fmt: skip
    return Rig(store, clock, approvals, switch, gate)


def act(name: str = "demo.do", *, cost: float = 2.0, safe: bool = False) -> Action:
    return Action(name=name, params={"n": 1}, risk="low", cost=cost, safe_to_retry=safe)


# -- windows ------------------------------------------------------------------------------------


async def test_window_past_its_end_is_closed_as_recovered_exactly_once(rig: Rig) -> None:
    t0 = rig.clock.now()
    overdue = await rig.window(t0)
    rig.clock.advance(timedelta(minutes=90))  # the daemon was down across the boundary
    current = await rig.window(t0 + timedelta(hours=1))

    first = await rig.scan()
    second = await rig.scan()

    assert first.windows_closed == 1 and first.found["windows"] == [overdue.window_key]
    assert second.windows_closed == 0 and second.found["windows"] == []
    closed = await rig.store.get_session(overdue.id)
    assert closed is not None and closed.status == "recovered" and closed.closed_by == "pytest"
    events = await rig.events(overdue.id, ev.WINDOW_CLOSED)
    assert [e.payload["status"] for e in events] == ["recovered"]
    still = await rig.store.get_session(current.id)
    assert still is not None and still.status == "open"  # not past its end: left alone


# -- actions ------------------------------------------------------------------------------------


async def test_started_action_without_outcome_is_in_doubt_and_its_reservation_released(
    rig: Rig,
) -> None:
    session = await rig.window(rig.clock.now())
    await rig.begin(session, "cmd-orphan", act(cost=2.0))
    row = await rig.session_row(session)
    assert (row["reserved_cost"], row["reserved_actions"]) == (2.0, 1)
    rig.clock.advance(timedelta(seconds=30))
    await rig.begin(session, "cmd-young", act("demo.other", cost=1.0))  # started after the cutoff

    report = await rig.scan(started_before=rig.clock.now() - timedelta(seconds=1))
    again = await rig.scan(started_before=rig.clock.now() - timedelta(seconds=1))

    assert report.in_doubt == 1 and report.found["actions"] == ["cmd-orphan"]
    assert again.in_doubt == 0
    assert (await rig.action_row("cmd-orphan")).status == "in_doubt"
    assert (await rig.action_row("cmd-young")).status == "started"
    in_doubt = await rig.events(session.id, ev.ACTION_IN_DOUBT)
    assert len(in_doubt) == 1
    assert in_doubt[0].command_id == "cmd-orphan" and in_doubt[0].reason == "in_doubt"
    assert in_doubt[0].payload == {"action": "demo.do", "safe_to_retry": False}
    row = await rig.session_row(session)
    # only the young action's reservation is left; nothing was charged
    assert (row["reserved_cost"], row["reserved_actions"]) == (1.0, 1)
    assert (row["used_cost"], row["used_actions"]) == (0.0, 0)


async def test_safe_to_retry_in_doubt_action_reruns_with_the_same_command_id(rig: Rig) -> None:
    session = await rig.window(rig.clock.now())
    action = act(safe=True, cost=2.0)
    await rig.begin(session, "cmd-safe", action)
    rig.clock.advance(timedelta(minutes=1))
    await rig.scan()
    assert (await rig.action_row("cmd-safe")).status == "in_doubt"

    outcome = await rig.run(action, "cmd-safe", session)  # the worker retries: same command_id
    assert outcome.status == "succeeded" and not outcome.replayed
    assert rig.effects == ["cmd-safe"]
    row = await rig.action_row("cmd-safe")
    assert row.status == "succeeded" and row.result == {"ran": 1}
    budget = await rig.session_row(session)
    assert (budget["used_cost"], budget["used_actions"]) == (2.0, 1)
    assert (budget["reserved_cost"], budget["reserved_actions"]) == (0.0, 0)
    kinds = [e.kind for e in await rig.store.events_for_command("cmd-safe")]
    assert kinds == [ev.ACTION_STARTED, ev.ACTION_IN_DOUBT, ev.ACTION_STARTED, ev.ACTION_SUCCEEDED]

    again = await rig.run(action, "cmd-safe", session)  # a later retry: the recorded outcome
    assert again.replayed and again.status == "succeeded" and again.result == {"ran": 1}
    assert rig.effects == ["cmd-safe"]


async def test_safe_rerun_respects_the_budget_of_its_window(rig: Rig) -> None:
    session = await rig.window(rig.clock.now(), max_cost=3.0)
    action = act(safe=True, cost=2.0)
    await rig.begin(session, "cmd-safe", action)
    rig.clock.advance(timedelta(minutes=1))
    await rig.scan()
    await rig.run(act("demo.fill", cost=2.0), "cmd-fill", session)  # spends the freed room

    with pytest.raises(ActionDenied) as refused:
        await rig.run(action, "cmd-safe", session)
    assert refused.value.reason == "budget"
    assert rig.effects == ["cmd-fill"]
    assert (await rig.action_row("cmd-safe")).status == "in_doubt"  # still for an operator
    budget = await rig.session_row(session)
    assert (budget["used_cost"], budget["reserved_cost"], budget["reserved_actions"]) == (
        2.0, 0.0, 0)  # fmt: skip


async def test_a_rerun_refused_for_budget_is_announced_like_a_fresh_attempt(rig: Rig) -> None:
    """A re-run and a fresh attempt start through one store call: a budget refusal of either
    writes BUDGET_EXHAUSTED once and raises the alert (the re-run's used to do neither)."""
    alerts: list[tuple[str, Any]] = []

    async def on_alert(condition: str, detail: Any) -> None:
        alerts.append((condition, dict(detail)))

    rig.gate.on_alert = on_alert
    session = await rig.window(rig.clock.now(), max_cost=3.0)
    action = act(safe=True, cost=2.0)
    await rig.begin(session, "cmd-safe", action)
    rig.clock.advance(timedelta(minutes=1))
    await rig.scan()
    await rig.run(act("demo.fill", cost=2.0), "cmd-fill", session)

    with pytest.raises(ActionDenied) as refused:
        await rig.run(action, "cmd-safe", session)
    assert refused.value.reason == "budget"
    exhausted = await rig.events(session.id, ev.BUDGET_EXHAUSTED)
    assert len(exhausted) == 1 and exhausted[0].reason == "budget"
    assert alerts == [("budget_exhausted", {"session": session.id})]
    denials = await rig.events(session.id, ev.ACTION_DENIED)
    assert [(e.reason, e.command_id) for e in denials] == [("budget", "cmd-safe")]


async def test_not_safe_in_doubt_action_is_refused_not_rerun(rig: Rig) -> None:
    session = await rig.window(rig.clock.now())
    action = act(safe=False)
    await rig.begin(session, "cmd-unsafe", action)
    rig.clock.advance(timedelta(minutes=1))
    await rig.scan()

    with pytest.raises(ActionDenied) as refused:
        await rig.run(action, "cmd-unsafe", session)
    assert refused.value.reason == "in_doubt"
    assert rig.effects == []
    assert (await rig.action_row("cmd-unsafe")).status == "in_doubt"
    denials = await rig.events(session.id, ev.ACTION_DENIED)
    assert [(e.reason, e.command_id) for e in denials] == [("in_doubt", "cmd-unsafe")]


@pytest.mark.parametrize("verdict", ["done", "failed"])
async def test_operator_resolution_charges_only_done_and_answers_later_retries(
    rig: Rig, verdict: str
) -> None:
    session = await rig.window(rig.clock.now())
    action = act(cost=2.0)
    await rig.begin(session, "cmd-x", action)
    rig.clock.advance(timedelta(minutes=1))
    await rig.scan()

    await recovery.resolve_in_doubt(rig.store, "cmd-x", done=verdict == "done", by="op")

    row = await rig.action_row("cmd-x")
    assert row.status == f"resolved_{verdict}" and row.resolved_by == "op"
    budget = await rig.session_row(session)
    charged = (2.0, 1) if verdict == "done" else (0.0, 0)
    assert (budget["used_cost"], budget["used_actions"]) == charged
    assert (budget["reserved_cost"], budget["reserved_actions"]) == (0.0, 0)
    resolved = await rig.events(session.id, ev.ACTION_RESOLVED)
    assert [e.payload for e in resolved] == [{"as": verdict, "by": "op"}]

    retry = await rig.run(action, "cmd-x", session)
    assert retry.replayed and rig.effects == []
    assert retry.status == ("succeeded" if verdict == "done" else "failed")
    with pytest.raises(NotFound):
        await recovery.resolve_in_doubt(rig.store, "cmd-x", done=True, by="op")


async def test_resolving_an_action_that_is_not_in_doubt_is_not_found(rig: Rig) -> None:
    session = await rig.window(rig.clock.now())
    await rig.begin(session, "cmd-running", act())
    with pytest.raises(NotFound):
        await recovery.resolve_in_doubt(rig.store, "cmd-running", done=True, by="op")
    with pytest.raises(NotFound):
        await recovery.resolve_in_doubt(rig.store, "no-such-command", done=False, by="op")


# -- approvals ----------------------------------------------------------------------------------


async def _request(rig: Rig, session: Session, key: str) -> ApprovalRecord:
    return await rig.approvals.request(
        key=key, action=Action(name="deploy.release", params={"key": key}, risk="high"),
        worker="w1", session_id=session.id, escalate_now=False, correlation_id=None,
    )  # fmt: skip


async def test_approvals_past_their_deadline_expire_and_the_rest_move_tiers(rig: Rig) -> None:
    t0 = rig.clock.now()
    session = await rig.window(t0, hours=24)
    old = await _request(rig, session, "old")  # created at t0: deadline t0+60m
    rig.clock.advance(timedelta(minutes=20))
    middle = await _request(rig, session, "middle")  # created t0+20m
    rig.clock.advance(timedelta(minutes=30))
    young = await _request(rig, session, "young")  # created t0+50m
    rig.clock.advance(timedelta(minutes=16))  # now t0+66m: the daemon was down all along

    report = await rig.scan()

    assert report.approvals_expired == 1 and report.approvals_escalated == 2
    assert sorted(report.found["approvals"]) == sorted([old.id, middle.id, young.id])
    rows = {k: await rig.store.approval(r.id)
            for k, r in (("old", old), ("middle", middle), ("young", young))}  # fmt: skip
    assert rows["old"] is not None and rows["old"].status == "expired"
    assert rows["old"].decided_by == "deadline"
    assert rows["middle"] is not None and (rows["middle"].status, rows["middle"].tier) == (
        "pending", "manager")  # fmt: skip
    assert rows["young"] is not None and (rows["young"].status, rows["young"].tier) == (
        "pending", "oncall")  # fmt: skip
    expired = await rig.events(session.id, ev.APPROVAL_EXPIRED)
    assert [(e.payload["approval"], e.reason) for e in expired] == [(old.id, "approval_expired")]
    escalated = await rig.events(session.id, ev.APPROVAL_ESCALATED)
    moves = sorted((e.payload["approval"], e.payload["from"], e.payload["to"]) for e in escalated)
    assert moves == sorted([(middle.id, "operators", "manager"), (young.id, "operators", "oncall")])

    again = await rig.scan()  # nothing more is due yet
    assert (again.approvals_expired, again.approvals_escalated) == (0, 0)


# -- kill switch --------------------------------------------------------------------------------


def _spoil(path: Path, how: str, switch: HostSwitchFile) -> None:
    if how == "garbage":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{ not json")
    elif how == "other-secret":
        HostSwitchFile(path, b"someone-else").write(Mode.HALT_ALL, reason="r", by="b",
                                                    at="2026-11-02T09:00:00+00:00")  # fmt: skip
    else:  # tampered after signing
        switch.write(Mode.HALT_ALL, reason="r", by="b", at="2026-11-02T09:00:00+00:00")
        doc = json.loads(path.read_text())
        doc["mode"] = "disengaged"
        path.write_text(json.dumps(doc))


@pytest.mark.parametrize("how", ["garbage", "other-secret", "tampered"])
async def test_host_switch_file_that_does_not_verify_is_reported(rig: Rig, how: str) -> None:
    _spoil(rig.switch.path, how, rig.switch)
    report = await rig.scan()
    assert report.killswitch_invalid
    (event,) = await rig.events(system_stream(FLEET), ev.RECOVERY)
    assert event.reason == "repaired" and event.state_bearing
    assert event.payload["killswitch_invalid"] is True


async def test_valid_or_missing_host_switch_is_not_reported(rig: Rig) -> None:
    assert not (await rig.scan()).killswitch_invalid  # no file: disengaged
    rig.switch.write(Mode.HALT_ALL, reason="drill", by="op", at="2026-11-02T09:00:00+00:00")
    assert not (await rig.scan()).killswitch_invalid  # engaged, but valid


# -- the RECOVERY event, and dry runs ------------------------------------------------------------


async def test_each_scan_writes_exactly_one_recovery_event(rig: Rig) -> None:
    stream = system_stream(FLEET)
    await rig.scan()
    events = await rig.events(stream, ev.RECOVERY)
    assert [(e.reason, e.state_bearing) for e in events] == [("clean", False)]

    session = await rig.window(rig.clock.now())
    await rig.begin(session, "cmd-orphan", act())
    rig.clock.advance(timedelta(minutes=1))
    await rig.scan()
    await rig.scan()
    events = await rig.events(stream, ev.RECOVERY)
    assert [e.reason for e in events] == ["clean", "repaired", "clean"]
    assert events[1].payload["in_doubt"] == 1
    assert events[1].payload["found"]["actions"] == ["cmd-orphan"]
    assert events[1].state_bearing


async def test_dry_run_reports_and_changes_nothing(rig: Rig) -> None:
    t0 = rig.clock.now()
    overdue = await rig.window(t0, hours=1)
    await rig.begin(overdue, "cmd-orphan", act())
    approval = await _request(rig, overdue, "k1")
    _spoil(rig.switch.path, "garbage", rig.switch)
    rig.clock.advance(timedelta(minutes=70))
    streams = [overdue.id, system_stream(FLEET)]
    before = {s: [e.as_dict() for e in await rig.events(s)] for s in streams}
    session_before = await rig.session_row(overdue)

    report = await rig.scan(dry_run=True)

    assert report.windows_closed == 1 and report.found["windows"] == [overdue.window_key]
    assert report.in_doubt == 1 and report.found["actions"] == ["cmd-orphan"]
    assert report.found["approvals"] == [approval.id]
    assert report.approvals_expired == 1 and report.approvals_escalated == 0
    assert report.killswitch_invalid
    after = {s: [e.as_dict() for e in await rig.events(s)] for s in streams}
    assert after == before
    assert await rig.session_row(overdue) == session_before
    assert (await rig.action_row("cmd-orphan")).status == "started"
    still = await rig.store.approval(approval.id)
    assert still is not None and still.status == "pending" and still.tier == "operators"

    real = await rig.scan()  # and the real scan then repairs exactly what the dry run found
    assert (real.windows_closed, real.in_doubt, real.approvals_expired) == (1, 1, 1)
