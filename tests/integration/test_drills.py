"""The drills pass on a healthy setup and fail, on the right check, when made to misbehave."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from supervisor.config import Config, WorkerSpec, load_config
from supervisor.errors import UsageError
from supervisor.governance import gate as gate_module
from supervisor.governance.approvals import Approvals
from supervisor.governance.escalation import EscalationChain, EscalationStep
from supervisor.ops.drills import DrillReport, approval_backlog_drill, killswitch_drill
from supervisor.store import switches as store_switches

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def config(tmp_path: Path) -> Config:
    """The built-in default config; the drills must not touch its state dir or store."""
    return load_config(None, env={}, state_dir=tmp_path / "real-state")


def failed(report: DrillReport) -> set[str]:
    return {check for check, ok, _detail in report.checks if not ok}


def assert_untouched(config: Config) -> None:
    assert not config.state_dir.exists(), "a drill wrote into the configured state dir"


# -- kill switch --------------------------------------------------------------------------------


async def test_killswitch_drill_passes_on_a_healthy_fleet(config: Config) -> None:
    report = await killswitch_drill(config, workers=6, seconds=1.5)

    assert report.passed, report.render()
    assert [c for c, _ok, _d in report.checks] == [
        "actions flowing before the engage",
        "daemon observed the switch",
        "no action started after the engage",
        "no effect after the engage",
        "workers kept cycling and were refused",
        "actions resume after the disengage",
        "daemon stopped cleanly",
    ]
    figures = report.figures
    assert figures["started_after_engage"] == 0 and figures["effects_after_engage"] == 0
    assert figures["refused_while_halted"] > 0
    assert 0 <= figures["time_to_halt_ms"] < 1000
    assert figures["resume_ms"] is not None
    assert report.render().startswith("drill killswitch: PASS")
    assert json.loads(json.dumps(report.as_dict()))["passed"] is True
    assert_untouched(config)


async def test_killswitch_drill_fails_on_a_worker_that_bypasses_the_gate(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    rogue = WorkerSpec(name="rogue", target="tests.recovery_workers:RogueWorker", cycle_every=0.05)
    with_rogue = dataclasses.replace(config, workers=(*config.workers, rogue))

    report = await killswitch_drill(with_rogue, workers=3, seconds=1.0, include_config_workers=True)

    assert not report.passed
    assert failed(report) == {"no effect after the engage"}, report.render()
    assert report.figures["effects_after_engage"] > 0
    assert (
        "rogue.write" in dict((c, d) for c, _ok, d in report.checks)["no effect after the engage"]
    )
    assert "FAIL" in report.render()


async def test_killswitch_drill_fails_when_the_gate_ignores_the_host_switch(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Wherever the host file's verdict is taken (the gate's checks, the started record's
    # transaction), it permits everything.
    for module in (gate_module, store_switches):
        monkeypatch.setattr(module, "host_verdict", lambda state, critical: None)

    report = await killswitch_drill(config, workers=3, seconds=1.0)

    assert not report.passed
    assert {"no action started after the engage", "no effect after the engage",
            "workers kept cycling and were refused"} <= failed(report), report.render()  # fmt: skip


async def test_drill_arguments_are_checked(config: Config) -> None:
    with pytest.raises(UsageError):
        await killswitch_drill(config, workers=0)
    with pytest.raises(UsageError):
        await killswitch_drill(config, seconds=0)
    with pytest.raises(UsageError):
        await approval_backlog_drill(config, count=0)


# -- approval backlog ---------------------------------------------------------------------------


async def test_approval_backlog_drill_passes_with_the_default_chain(config: Config) -> None:
    report = await approval_backlog_drill(config, count=100)

    assert report.passed, report.render()
    assert report.figures["escalations"] == 100  # one step (oncall) in the default chain
    assert report.figures["expired"] == 100
    assert any(c == "all reached oncall on time (+15m)" for c, _ok, _d in report.checks)
    assert any(c == "all denied by default at the deadline (+1h)" for c, _ok, _d in report.checks)
    assert_untouched(config)


async def test_approval_backlog_drill_walks_a_longer_chain(config: Config) -> None:
    chain = EscalationChain(timeout=7200.0, initial_tier="ops", steps=(
        EscalationStep(600.0, "oncall"), EscalationStep(1800.0, "oncall"),
        EscalationStep(3600.0, "director"),
    ))  # fmt: skip
    report = await approval_backlog_drill(dataclasses.replace(config, approvals=chain), count=30)

    assert report.passed, report.render()
    # a step to the tier it is already at moves nothing visible: two escalations each
    assert report.figures["escalations"] == 60 and report.figures["expired"] == 30


async def test_approval_backlog_drill_fails_when_escalation_does_nothing(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def idle(self: Approvals, limit: int = 1000) -> dict[str, int]:
        return {"escalated": 0, "expired": 0}

    monkeypatch.setattr(Approvals, "escalate_due", idle)

    report = await approval_backlog_drill(config, count=20)

    assert not report.passed
    assert {
        "all reached oncall on time (+15m)",
        "all denied by default at the deadline (+1h)",
        "APPROVAL_ESCALATED once per tier, at each step's instant",
        "APPROVAL_EXPIRED for each at its deadline, none earlier",
    } <= failed(report), report.render()


async def test_approval_backlog_drill_fails_when_approvals_move_early(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    def hasty(self: EscalationChain, created_at: datetime, seconds: float) -> datetime:
        return created_at.astimezone(UTC) + timedelta(seconds=seconds - 1)  # a second early

    monkeypatch.setattr(EscalationChain, "_at", hasty)

    report = await approval_backlog_drill(config, count=20)

    assert not report.passed
    assert failed(report) == {
        "nothing moves before oncall (+15m)",
        "nothing moves before deadline (+1h)",
        "APPROVAL_ESCALATED once per tier, at each step's instant",
        "APPROVAL_EXPIRED for each at its deadline, none earlier",
    }, report.render()
