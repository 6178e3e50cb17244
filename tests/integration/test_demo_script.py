"""`./scripts/demo`, the README's first command, run as a user runs it: its output into a pipe
or a file (a CI log, `| tee`) still carries the scorecard the README promises."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_demo_prints_the_scorecard_into_a_pipe(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACP_") and k != "NOTIFY_SOCKET"}
    env["ACP_STATE_DIR"] = str(tmp_path / "state")  # not the checkout's own state/
    done = subprocess.run([str(ROOT / "scripts" / "demo")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "scorecard for fleet default", done.stdout
    assert lines[1].split()[:3] == ["windows", "opened", "24"], done.stdout  # a simulated day
    assert not any(line.startswith("{") for line in lines)  # no log line on stdout
    assert len(list((tmp_path / "state" / "simulations").glob("*/simulate.db"))) == 1
