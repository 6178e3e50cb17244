"""What every log line carries: the name of the logger that wrote it, and a literal event name."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def test_each_line_names_its_logger(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "supervisor",
            "--state-dir",
            str(tmp_path / "state"),
            "run",
            "--horizon",
            "hour",
            "--simulate",
            "--start",
            "2026-11-02T09:00:00Z",
            "--seed",
            "0",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines: list[dict[str, Any]] = [json.loads(line) for line in done.stderr.splitlines()]
    assert lines, "the run logs on stderr"
    assert [
        line for line in lines if not str(line.get("logger", "")).startswith("supervisor.")
    ] == []
    by_event = {line["event"]: line["logger"] for line in lines}
    assert by_event["daemon.ready"] == "supervisor.runtime.daemon"
    assert by_event["window.opened"] == "supervisor.timing.sessions"
    # the seed's first high-risk case
    assert by_event["action.denied"] == "supervisor.governance.gate"
