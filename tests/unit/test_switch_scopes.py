"""Which store switches apply to an action: a worker switch by instance or configured name."""

from __future__ import annotations

import pytest

from supervisor.store.switches import SwitchRecord, SwitchTarget, switch_verdict


def row(scope: str, target: str, mode: str = "halt_all") -> SwitchRecord:
    return SwitchRecord.of(scope, target, mode)


@pytest.mark.parametrize(
    ("target", "worker", "group", "halted"),
    [
        ("support", "support-2", "support", True),  # configured name: every replica
        ("support-2", "support-2", "support", True),  # instance name: that one
        ("support-2", "support-1", "support", False),  # ... and no other
        ("support", "notes", None, False),
        ("notes", "notes", None, True),  # a single worker: its name is its instance name
        ("support", "support-10", "support", True),
    ],
)
def test_worker_switch_by_instance_or_configured_name(
    target: str, worker: str, group: str | None, halted: bool
) -> None:
    verdict = switch_verdict(
        [row("worker", target)], SwitchTarget(worker=worker, session_id="s", group=group)
    )
    assert (verdict is not None) is halted, verdict
    if halted:
        assert verdict == "halt_all (worker)"


def test_disengaged_group_row_leaves_an_instance_halt_in_force() -> None:
    rows = [row("worker", "support", "disengaged"), row("worker", "support-2")]
    support = {"session_id": "s", "group": "support"}
    assert switch_verdict(rows, SwitchTarget(worker="support-2", **support)) == "halt_all (worker)"
    assert switch_verdict(rows, SwitchTarget(worker="support-1", **support)) is None
