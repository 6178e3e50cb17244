"""Both drills through the real CLI: PASS, exit 0, JSON report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.acceptance


def drill(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACP_")}
    return subprocess.run(
        [sys.executable, "-m", "supervisor", "--state-dir", str(tmp_path / "s"), "--log-level", "error",
         "drill", *args, "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_killswitch_drill_passes_on_a_healthy_fleet(tmp_path: Path) -> None:
    proc = drill(tmp_path, "killswitch", "--workers", "4", "--seconds", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["passed"] is True and report["figures"]["started_after_engage"] == 0
    assert not (tmp_path / "s").exists(), "a drill must not touch the configured state"


def test_approval_backlog_drill_passes(tmp_path: Path) -> None:
    proc = drill(tmp_path, "approval-backlog", "--count", "25")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["passed"] is True and report["figures"]["expired"] == 25


def test_bad_drill_arguments_exit_2(tmp_path: Path) -> None:
    proc = drill(tmp_path, "approval-backlog", "--count", "0")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
