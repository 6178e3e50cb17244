"""`approvals approve ID --scope window --match k1,k2 --uses N` through the real command line,
as an operator runs it, and the gate it binds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from supervisor.actions import Action
from supervisor.errors import ApprovalPending
from supervisor.governance.approvals import Approvals
from supervisor.governance.budgets import ModelGovernor, TokenBudgets
from supervisor.governance.escalation import EscalationChain
from supervisor.governance.gate import Gate
from supervisor.governance.policy import Policy
from supervisor.killswitch import HostSwitchFile
from supervisor.store import open_store
from supervisor.timing.clock import SystemClock

pytestmark = pytest.mark.anyio
FLEET = "default"


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACP_")}
    return subprocess.run([sys.executable, "-m", "supervisor", "--state-dir", str(tmp_path), *args],
                          env=env, capture_output=True, text=True, timeout=60, check=False)  # fmt: skip


@pytest.mark.parametrize(
    ("flags", "words"),
    [(["--uses", "0"], ["--uses", "must be >= 1"]), (["--match", "a,,b"], ["--match"])],
)
def test_bad_bounds_are_one_usage_error(tmp_path: Path, flags: list[str], words: list[str]) -> None:
    done = cli(tmp_path, "approvals", "approve", "abc", "--scope", "window", "--by", "op", *flags)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and all(w in lines[0] for w in words), lines


async def test_match_names_the_params_a_window_grant_compares(tmp_path: Path) -> None:
    clock = SystemClock()
    store = await open_store(f"sqlite:///{tmp_path / 'supervisor.db'}", clock, migrate=True)
    try:
        gate = Gate(store=store, fleet=FLEET, policy=Policy.from_config(None),
                    approvals=Approvals(store, EscalationChain.from_config(None), FLEET),
                    host_switch=HostSwitchFile(tmp_path / "killswitch.json", None),
                    token_budgets=TokenBudgets.from_config(None),
                    models=ModelGovernor.from_config(None), timezone=ZoneInfo("UTC"))  # fmt: skip
        now = clock.now()
        session, _ = await store.open_window(fleet=FLEET, key="w", starts_at=now - timedelta(minutes=1),
                                             ends_at=now + timedelta(hours=1), max_cost=None,
                                             max_actions=None, by="t")  # fmt: skip

        def deploy(service: str, build: int) -> Action:
            return Action("deploy", params={"service": service, "build": build}, risk="high")

        async def effect() -> None:
            return None

        with pytest.raises(ApprovalPending) as asked:
            await gate.run(deploy("api", 1), effect, worker="ops", session=session, command_id="d1")
        done = cli(tmp_path, "approvals", "approve", asked.value.approval_id, "--scope", "window",
                   "--match", "service", "--uses", "2", "--by", "op", "--reason", "api day")  # fmt: skip
        assert done.returncode == 0, done.stderr
        listed = cli(tmp_path, "approvals", "list")
        assert '{"build":1,"service":"api"}' in listed.stdout
        assert "window: match service, uses 0/2" in listed.stdout
        # Another build of api is covered, twice; web is not, whatever its build.
        for n in (2, 3):
            out = await gate.run(deploy("api", n), effect, worker="ops", session=session,
                                 command_id=f"d{n}")  # fmt: skip
            assert out.status == "succeeded"
        with pytest.raises(ApprovalPending):
            await gate.run(deploy("web", 1), effect, worker="ops", session=session, command_id="w1")
        with pytest.raises(ApprovalPending):
            await gate.run(deploy("api", 4), effect, worker="ops", session=session, command_id="d4")
        rows = json.loads(cli(tmp_path, "approvals", "list", "--json").stdout)
        grant = next(r for r in rows if r["id"] == asked.value.approval_id)
        assert (grant["used_count"], grant["max_uses"], json.loads(grant["match_keys"])) == (
            2,
            2,
            ["service"],
        )
    finally:
        await store.close()
