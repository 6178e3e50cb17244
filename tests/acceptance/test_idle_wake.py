"""A worker waiting inside its cycle (ctx.sleep) reacts to a halt at once, not when it wakes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.acceptance

CONFIG = """
[daemon]
fleet = "idle"
profile = "hour"
shutdown_timeout = "2s"
[horizons.hour]
cycle_every = "100ms"
[[workers]]
name = "sleeper"
class = "tests.acceptance.stall_worker:LongSleeper"
cycle_deadline = "120s"
"""


def test_long_wait_is_cut_short_by_a_halt(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(CONFIG)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACP_")}
    env.update(ACP_KILLSWITCH_SECRET="idle-secret", PYTHONPATH=str(ROOT))
    base = [
        sys.executable,
        "-m",
        "supervisor",
        "--config",
        str(cfg),
        "--state-dir",
        str(tmp_path / "s"),
    ]
    proc = subprocess.Popen(
        [*base, "run"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if b'"sleeper.waiting"' in line:
                break
        engage = subprocess.run([*base, "killswitch", "engage", "--mode", "halt_all", "--reason", "r",
                                 "--by", "t"], cwd=ROOT, env=env, capture_output=True)  # fmt: skip
        engaged = time.monotonic()
        assert engage.returncode == 0
        for line in proc.stderr:
            if b'"sleeper.halted"' in line:
                woke = time.monotonic() - engaged
                assert json.loads(line)["reason"] == "killswitch"
                break
        else:
            raise AssertionError("the waiting worker never noticed the halt")
        assert woke < 1.0, f"took {woke:.2f}s to notice (its own wait was 60s)"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        proc.kill()
        proc.wait()
