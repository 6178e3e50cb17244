"""The soak, short enough for CI: bench/soak.py over a simulated week with ten workers and two
SIGKILL restarts (one of them with an action in flight), every fault kind at least once, and
every promise check passing.

`bench/soak.py --horizon week --workers 10 --kills 2 --seed 1` with higher fault rates than the
month default, so that each kind (crash, hang, state-bearing write failure, every kill-switch
mode, approvals escalated and denied at the deadline, budget exhaustion) occurs in one week.
It runs the real daemon as subprocesses and checks the store and the effect log afterwards.
About 15-20 s on a 2-core machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.acceptance

ROOT = Path(__file__).resolve().parents[2]
ARGS = ("--horizon", "week", "--workers", "10", "--kills", "2", "--seed", "1",
        "--crash-rate", "0.01", "--hang-rate", "0.002", "--write-fail-rate", "0.005",
        "--timeout", "150", "--json")  # fmt: skip


def test_soak_week_every_promise_holds(tmp_path: Path) -> None:
    state = tmp_path / "soak"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "soak.py"), *ARGS,
                           "--state-dir", str(state)],
                          cwd=ROOT, capture_output=True, text=True, timeout=200)  # fmt: skip
    assert done.stdout.strip(), done.stderr[-3000:]
    report = json.loads(done.stdout)
    failed = [c for c in report["checks"] if not c["pass"]]
    assert not failed, json.dumps(failed, indent=1) + "\n" + done.stderr[-2000:]
    assert done.returncode == 0
    names = {c["name"] for c in report["checks"]}
    for name in ("no effect twice", "no effect without ACTION_STARTED",
                 "every started action has an outcome or is in_doubt",
                 "no effect outside its window", "no effect during a halt (kill switch)",
                 "no overspend", "no approval past its deadline", "no window left open",
                 "each window opened and closed exactly once", "cycles continue across restarts",
                 "injected write failures reported as crashes"):  # fmt: skip
        assert name in names

    # the daemon was killed twice and resumed each time; one kill had an action in flight
    assert len(report["kills"]) == 2
    assert {k["kind"] for k in report["kills"]} == {"seeded", "mid-action"}
    assert len(report["incarnations"]) == 3
    by_name = {c["name"]: c for c in report["checks"]}
    assert by_name["every started action has an outcome or is in_doubt"]["in_flight_at_kills"] >= 1

    # every fault kind happened at least once, and the daemon saw it
    faults = report["faults"]
    for kind in ("crash", "hang", "write"):
        assert faults["injected"][kind] >= 1, kind
    observed = faults["observed_worker_crashes"]
    assert observed.get("injected crash", 0) >= 1
    assert observed.get("hang", 0) >= 1
    assert observed.get("write failure", 0) >= 1
    assert set(faults["switch_changes_by_mode"]) == {"halt_noncritical", "halt_all", "emergency",
                                                     "disengaged"}  # fmt: skip
    assert faults["denials_by_reason"].get("killswitch", 0) >= 1
    assert faults["emergency_snapshots"] >= 1
    assert faults["approvals_escalated"] >= 1 and faults["approvals_expired"] >= 1
    assert faults["approvals_granted"] >= 1
    assert faults["denials_by_reason"].get("budget", 0) >= 1
    assert faults["in_doubt"] >= 1
    # the promise checks looked at real traffic
    assert faults["effects"] > 1000
    assert by_name["no effect during a halt (kill switch)"]["effects_by_mode"].get(
        "halt_noncritical (critical)", 0) >= 1  # fmt: skip
