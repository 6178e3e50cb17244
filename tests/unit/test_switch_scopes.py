"""Which store switches apply to an action: a worker switch by instance or configured name."""

from __future__ import annotations

import pytest

from supervisor.gate import store_switch_verdict


def row(scope: str, target: str, mode: str = "halt_all") -> dict[str, str]:
    return {"scope": scope, "target": target, "mode": mode}


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
    verdict = store_switch_verdict([row("worker", target)], worker=worker, session_id="s",
                                   critical=False, group=group)  # fmt: skip
    assert (verdict is not None) is halted, verdict
    if halted:
        assert verdict == "halt_all (worker)"


def test_disengaged_group_row_leaves_an_instance_halt_in_force() -> None:
    rows = [row("worker", "support", "disengaged"), row("worker", "support-2")]
    assert store_switch_verdict(rows, worker="support-2", session_id="s", critical=False,
                                group="support") == "halt_all (worker)"  # fmt: skip
    assert store_switch_verdict(rows, worker="support-1", session_id="s", critical=False,
                                group="support") is None  # fmt: skip
