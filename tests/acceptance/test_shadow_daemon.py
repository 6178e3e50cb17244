"""Shadow mode against the real daemon: `[policy] shadow` decides every proposal beside the live
policy, and only disagreements are recorded (POLICY_SHADOW telemetry); a shadow file that is
broken, fixed and broken again while the daemon runs never stops a single action."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from tests.acceptance.conftest import Daemon

pytestmark = [pytest.mark.acceptance, pytest.mark.anyio]

DaemonFactory = Callable[..., "Daemon"]

SHADOW = '[policy]\nshadow = "candidate.toml"\n'
# The live policy (the support workers' config) allows low and medium, denies high and critical;
# this candidate (a whole [policy], not a patch of the live one) also denies medium, so it
# disagrees exactly on medium cases.
STRICTER = '[policy.risk]\nmedium = "deny"\nhigh = "deny"\n'


def shadow_events(d: Daemon, n: int, after: datetime | None = None) -> Callable[[], Any]:
    async def check() -> list[Any]:
        found = await d.events("POLICY_SHADOW", after=after)
        return found if len(found) >= n else []

    return check


async def test_shadow_records_only_the_disagreements(daemon: DaemonFactory) -> None:
    d = daemon(extra=SHADOW, start=False)
    (d.root / "candidate.toml").write_text(STRICTER)
    d.start()
    await d.wait_until(shadow_events(d, 5), what="five shadow disagreements", within=20)
    assert await d.stop() == 0

    shadows = await d.events("POLICY_SHADOW")
    assert {(e.reason, e.payload["risk"], e.payload["shadow_rule"]) for e in shadows} == {
        ("allow->deny", "medium", "risk:medium")}  # fmt: skip
    assert not any(e.state_bearing for e in shadows)
    started = await d.events("ACTION_STARTED")
    medium = {e.command_id for e in started if e.payload["risk"] == "medium"}
    others = {e.command_id for e in started if e.payload["risk"] != "medium"}
    disagreed = {e.command_id for e in shadows}
    assert medium <= disagreed  # every disagreement is recorded ...
    assert not disagreed & others  # ... and nothing where both policies agree
    assert len(disagreed - medium) <= 3  # at most one per worker cut short by the stop
    assert others, "the agreeing proposals ran too"

    card = json.loads((await d.cli_ok("scorecard", "--shadow", "--json")).stdout)
    assert card["disagreements"] == len(shadows)
    assert card["by_transition"] == {"allow->deny": len(shadows)}
    assert sum(w["disagreements"] for w in card["windows"]) == len(shadows)
    text = (await d.cli_ok("scorecard", "--shadow")).stdout.decode()
    assert f"{len(shadows)} disagreements" in text and "allow->deny" in text


async def test_a_failing_shadow_never_blocks_an_action(daemon: DaemonFactory) -> None:
    d = daemon(extra=SHADOW, start=False)
    candidate = d.root / "candidate.toml"
    candidate.write_text("[policy.risk\n")  # not TOML
    d.start()
    t0 = datetime.now(UTC)
    await d.wait_until(d.started_after(t0, 10), what="actions with a broken shadow", within=20)
    failed = [e for e in d.log_events() if e.get("event") == "policy.shadow_failed"]
    assert failed and "not valid TOML" in failed[0]["error"]
    assert await d.events("POLICY_SHADOW") == []

    # Fixed while running: disagreements start without a restart; broken again: actions go on.
    candidate.write_text(STRICTER)
    await d.wait_until(shadow_events(d, 1), what="a disagreement after the fix", within=20)
    candidate.write_text("[policy]\nunmatched = 'perhaps'\n")
    t1 = datetime.now(UTC)
    await d.wait_until(d.started_after(t1, 10), what="actions after breaking it again", within=20)
    assert await d.stop() == 0

    # Every cycle's proposal was decided by the live policy: none waited on the shadow.
    cycles = await d.events("CYCLE_COMPLETED")
    decided = await d.events("ACTION_STARTED") + await d.events("ACTION_DENIED")
    per_worker_cycles: dict[str, int] = {}
    for e in cycles:
        per_worker_cycles[e.worker or ""] = per_worker_cycles.get(e.worker or "", 0) + 1
    for worker, n in per_worker_cycles.items():
        assert len([e for e in decided if e.worker == worker]) >= n, worker
    errors = [e for e in d.log_events() if e.get("event") == "policy.shadow_failed"]
    assert any("perhaps" in e["error"] for e in errors)
    assert all(e["level"] == "error" for e in errors)
