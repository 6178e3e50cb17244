"""The gate's own logic without a database: the store-switch verdict, the host check, the order
of checks (the kill switch comes before anything else reads the store), fail-closed refusals and
the last look. The store is a stub that records what the gate asked of it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast
from zoneinfo import ZoneInfo

import pytest

from supervisor import events as ev
from supervisor.actions import Action
from supervisor.errors import ActionDenied, StateWriteError
from supervisor.governance.approvals import Approvals
from supervisor.governance.budgets import ModelGovernor, TokenBudgets
from supervisor.governance.escalation import EscalationChain
from supervisor.governance.gate import Gate
from supervisor.governance.policy import Policy
from supervisor.killswitch import HostSwitchFile, Mode
from supervisor.store import NewEvent, Session, Store
from supervisor.store.actions import result_json
from supervisor.store.switches import SwitchRecord, SwitchTarget, switch_verdict
from supervisor.timing.clock import VirtualClock

SECRET = b"gate-unit-secret"
NOW = datetime(2026, 11, 2, 9, 30, tzinfo=UTC)
AT = "2026-11-02T09:00:00+00:00"


def row(scope: str, target: str, mode: str) -> SwitchRecord:
    return SwitchRecord.of(scope, target, mode)


# --- switch_verdict ------------------------------------------------------------------------


def verdict(rows: list[SwitchRecord], *, worker: str = "w1", session: str = "s1",
            critical: bool = False) -> str | None:  # fmt: skip
    return switch_verdict(rows, SwitchTarget(worker=worker, session_id=session, critical=critical))


def test_no_rows_permit() -> None:
    assert verdict([]) is None


@pytest.mark.parametrize(
    ("rows", "worker", "session", "halted"),
    [
        ([row("worker", "w1", "halt_all")], "w1", "s1", True),
        ([row("worker", "w1", "halt_all")], "w2", "s1", False),
        ([row("session", "s1", "halt_all")], "w9", "s1", True),
        ([row("session", "s1", "halt_all")], "w1", "s2", False),
        ([row("fleet", "", "halt_all")], "anyone", "any", True),
        ([row("fleet", "", "disengaged"), row("worker", "w1", "disengaged")], "w1", "s1", False),
    ],
)
def test_each_scope_applies_only_to_its_target(
    rows: list[SwitchRecord], worker: str, session: str, halted: bool
) -> None:
    assert (verdict(rows, worker=worker, session=session) is not None) is halted


def test_strictest_applicable_scope_wins() -> None:
    rows = [row("fleet", "", "halt_noncritical"), row("worker", "w1", "halt_all")]
    assert verdict(rows, critical=True) is not None  # the worker's halt_all beats the fleet's
    assert verdict(rows, worker="w2", critical=True) is None  # only halt_noncritical applies
    assert verdict(rows, worker="w2", critical=False) is not None


def test_unknown_mode_fails_closed() -> None:
    assert verdict([row("worker", "w1", "pause")], critical=True) is not None


def test_detail_names_only_the_scopes_that_apply() -> None:
    rows = [row("worker", "other", "halt_all"), row("session", "s1", "halt_all")]
    detail = verdict(rows)
    assert detail is not None
    assert "halt_all" in detail and "session" in detail
    assert "worker" not in detail  # another worker's switch is not why this one stopped


# --- a gate over a stub store -----------------------------------------------------------------


class StubStore:
    """Answers only what the early checks need; anything else fails the test."""

    def __init__(self, *, fail_writes: bool = False) -> None:
        self.clock = VirtualClock(NOW)
        self.events: list[tuple[str, NewEvent]] = []
        self.finished: list[dict[str, Any]] = []
        self.fail_writes = fail_writes
        self.switch_rows: list[SwitchRecord] = []
        self.while_reading_switches: Any = None  # called during the store-switch read

    async def once(self, command_id: str, event: NewEvent) -> bool:
        if self.fail_writes:
            raise StateWriteError("injected: the refusal event did not commit")
        self.events.append((command_id, event))
        return True

    async def finish_action(self, **kw: Any) -> None:
        self.finished.append(kw)

    async def kill_switches(self, fleet: str) -> list[SwitchRecord]:
        if self.while_reading_switches is not None:
            self.while_reading_switches()
        return self.switch_rows

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the gate touched store.{name} before the kill switch let it")


def make_gate(tmp_path: Path, store: StubStore, secret: bytes | None = SECRET) -> Gate:
    typed = cast(Store, store)
    return Gate(store=typed, fleet="unit", policy=Policy(),
                approvals=Approvals(typed, EscalationChain(), "unit"),
                host_switch=HostSwitchFile(tmp_path / "killswitch.json", secret),
                token_budgets=TokenBudgets(), models=ModelGovernor(),
                timezone=ZoneInfo("UTC"))  # fmt: skip


SESSION = Session(id="s1", fleet="unit", window_key="k", starts_at=NOW - timedelta(minutes=30),
                  ends_at=NOW + timedelta(minutes=30), status="open", max_cost=None,
                  max_actions=None, used_cost=0.0, used_actions=0, opened_by="t", opened_at=NOW,
                  closed_by=None, closed_at=None)  # fmt: skip


def engage(gate: Gate, mode: Mode) -> None:
    gate.host_switch.write(mode, reason="unit", by="pytest", at=AT)


async def nothing() -> None:
    raise AssertionError("the effect ran")


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("mode", "critical", "allowed"),
    [
        (Mode.DISENGAGED, False, True),
        (Mode.HALT_NONCRITICAL, False, False),
        (Mode.HALT_NONCRITICAL, True, True),
        (Mode.HALT_ALL, True, False),
        (Mode.EMERGENCY, True, False),
    ],
)
async def test_host_verdict_by_mode(
    tmp_path: Path, mode: Mode, critical: bool, allowed: bool
) -> None:
    gate = make_gate(tmp_path, StubStore())
    engage(gate, mode)
    assert (gate._host_verdict(critical) is None) is allowed


def test_missing_host_file_permits(tmp_path: Path) -> None:
    assert make_gate(tmp_path, StubStore())._host_verdict(False) is None


def test_host_file_unverifiable_without_secret_halts_with_the_problem(tmp_path: Path) -> None:
    writer = make_gate(tmp_path, StubStore())
    engage(writer, Mode.DISENGAGED)
    reader = make_gate(tmp_path, StubStore(), secret=None)
    detail = reader._host_verdict(True)
    assert detail is not None and "halt_all" in detail and "no kill-switch secret" in detail


@pytest.mark.anyio
async def test_kill_switch_refuses_before_any_other_store_access(tmp_path: Path) -> None:
    store = StubStore()
    gate = make_gate(tmp_path, store)
    engage(gate, Mode.HALT_ALL)
    with pytest.raises(ActionDenied) as info:
        await gate.run(Action("x.y"), nothing, worker="w1", session=SESSION, command_id="c1")
    assert info.value.reason == "killswitch" and info.value.command_id == "c1"
    [(_, event)] = store.events
    assert (event.kind, event.reason, event.command_id) == (ev.ACTION_DENIED, "killswitch", "c1")
    assert gate.stats.refused == 1 and gate.stats.admitted == 0


@pytest.mark.anyio
async def test_a_refusal_that_cannot_be_recorded_is_not_swallowed(tmp_path: Path) -> None:
    gate = make_gate(tmp_path, StubStore(fail_writes=True))
    engage(gate, Mode.HALT_ALL)
    with pytest.raises(StateWriteError):
        await gate.run(Action("x.y"), nothing, worker="w1", session=SESSION, command_id="c1")


@pytest.mark.anyio
async def test_last_look_closes_the_record_as_halted(tmp_path: Path) -> None:
    store = StubStore()
    gate = make_gate(tmp_path, store)
    await gate.last_look(Action("x.y"), worker="w1", session=SESSION, command_id="c1")
    assert store.finished == []  # disengaged: nothing to do
    engage(gate, Mode.HALT_ALL)
    with pytest.raises(ActionDenied, match="kill switch"):
        await gate.last_look(Action("x.y", cost=0.5), worker="w1", session=SESSION, command_id="c1")
    [finished] = store.finished
    assert finished["status"] == "halted" and finished["ok"] is False
    assert finished["reason"] == "killswitch" and finished["cost"] == 0.5


@pytest.mark.anyio
async def test_last_look_lets_critical_through_under_halt_noncritical(tmp_path: Path) -> None:
    store = StubStore()
    gate = make_gate(tmp_path, store)
    engage(gate, Mode.HALT_NONCRITICAL)
    await gate.last_look(Action("x.y", critical=True), worker="w1", session=SESSION, command_id="c")
    assert store.finished == []


@pytest.mark.anyio
async def test_last_look_reads_the_host_file_after_waiting_for_the_store(tmp_path: Path) -> None:
    """An engage that lands while the last look waits for the store still stops the effect."""
    store = StubStore()
    gate = make_gate(tmp_path, store)
    store.while_reading_switches = lambda: engage(gate, Mode.HALT_ALL)
    with pytest.raises(ActionDenied, match="host halt_all"):
        await gate.last_look(Action("x.y"), worker="w1", session=SESSION, command_id="c1")
    assert store.finished[0]["status"] == "halted"


@pytest.mark.anyio
async def test_last_look_honours_store_switches(tmp_path: Path) -> None:
    store = StubStore()
    store.switch_rows = [row("worker", "w1", "halt_all")]
    gate = make_gate(tmp_path, store)
    with pytest.raises(ActionDenied, match="worker"):
        await gate.last_look(Action("x.y"), worker="w1", session=SESSION, command_id="c1")
    await gate.last_look(Action("x.y"), worker="w2", session=SESSION, command_id="c2")
    assert [f["command_id"] for f in store.finished] == ["c1"]


def test_results_that_are_not_json_are_kept_as_repr() -> None:
    assert result_json({"a": [1, 2]}) == '{"a":[1,2]}'
    assert result_json({1, 2}) == '"{1, 2}"'
    assert result_json(None) is None
    # Not even a repr (an int past Python's digit limit): still a result, never an exception
    # that would leave the outcome unrecorded.
    assert result_json({"n": 10**5000}) == '"<dict without a representation>"'
    deep: list[Any] = []
    for _ in range(100_000):
        deep = [deep]
    assert result_json(deep) == '"<list without a representation>"'
