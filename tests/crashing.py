"""A child process that writes and reports each write it was told is durable, SIGKILLed while
writes are in flight: what it was told, for a test to look for in the store afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def told_before_kill(script: str, url: str, folder: Path, *, at_least: int) -> list[str]:
    """Run `script` (Python source; argv[1] is `url`) until it has printed `at_least` lines,
    SIGKILL it, and return every line it printed (those read after the kill too)."""
    path = folder / "writer.py"
    path.write_text(textwrap.dedent(script))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(path), url], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)  # fmt: skip
    assert proc.stdout is not None
    told: list[str] = []
    deadline = time.monotonic() + 60
    try:
        while len(told) < at_least and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            told.append(line.decode().strip())
    finally:
        proc.send_signal(signal.SIGKILL)  # mid-batch: writes are always in flight
        rest, err = proc.communicate(timeout=30)
    assert len(told) >= at_least, err.decode()[-2000:]
    return told + [line.strip() for line in rest.decode().splitlines()]
