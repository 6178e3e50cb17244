"""The event loop the daemon runs on: uvloop where it is installed, asyncio on request.

The real CLI runs a simulated day on each loop. The daemon says which loop it runs on
(`daemon.ready`), and the day comes out the same on both: the simulation depends on its seed,
not on the loop's internals.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.acceptance

ROOT = Path(__file__).resolve().parents[2]
CONFIG = """
[[workers]]
name = "support"
class = "workers.support:SupportAgent"
replicas = 3
"""
RUN = ("run", "--horizon", "day", "--simulate", "--start", "2026-11-01T00:00:00Z", "--seed",
       "5", "--json")  # fmt: skip


def simulate_day(folder: Path, **env_extra: str) -> tuple[str, dict[str, Any], list[str]]:
    """(the loop daemon.ready names, the scorecard, the effects' command_ids in order)."""
    folder.mkdir()
    (folder / "c.toml").write_text(CONFIG)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACP_") and k != "NOTIFY_SOCKET"}
    env["PYTHONPATH"] = str(ROOT)
    env.update(env_extra)
    done = subprocess.run([sys.executable, "-m", "supervisor", "--config", "c.toml",
                           "--state-dir", "state", *RUN], cwd=folder, env=env, text=True,
                          capture_output=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    ready = [json.loads(line) for line in done.stderr.splitlines() if '"daemon.ready"' in line]
    assert len(ready) == 1, done.stderr[-2000:]
    effects_files = list((folder / "state").rglob("effects.jsonl"))
    assert len(effects_files) == 1
    effects = [json.loads(line)["command_id"] for line in effects_files[0].read_text().splitlines()]
    card: dict[str, Any] = json.loads(done.stdout)
    return str(ready[0]["event_loop"]), card, effects


def test_uvloop_by_default_asyncio_on_request_and_the_same_day_on_both(tmp_path: Path) -> None:
    pytest.importorskip("uvloop", reason="uvloop is a dependency where it builds")
    loop, card, effects = simulate_day(tmp_path / "default")
    assert loop == "uvloop"
    plain_loop, plain_card, plain_effects = simulate_day(tmp_path / "asyncio",
                                                         ACP_EVENT_LOOP="asyncio")  # fmt: skip
    assert plain_loop == "asyncio"
    assert card["total"]["actions_succeeded"] > 100
    assert plain_card["total"] == card["total"]
    assert plain_effects == effects


def test_auto_without_uvloop_runs_on_asyncio(tmp_path: Path) -> None:
    site = tmp_path / "site"  # sys.modules[name] = None: the interpreter's "not installed"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['uvloop'] = None\n")
    loop, card, _effects = simulate_day(tmp_path / "run", ACP_EVENT_LOOP="auto",
                                        PYTHONPATH=f"{site}{os.pathsep}{ROOT}")  # fmt: skip
    assert loop == "asyncio"
    assert card["total"]["actions_succeeded"] > 100
