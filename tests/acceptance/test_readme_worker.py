"""The README's worker example runs as written: its files saved from the README into a fresh
directory, its commands run through the installed `acp-supervisor` script (whose own path does
not hold the working directory, unlike `python -m`)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(sys.executable).parent / "acp-supervisor"
pytestmark = pytest.mark.acceptance


def section() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return text.split("## Writing a worker", 1)[1].split("\n## ", 1)[0]


def blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", section(), re.DOTALL)


def env() -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("ACP_") and k not in ("PYTHONPATH", "NOTIFY_SOCKET")}  # fmt: skip
    return clean


def run_readme_commands(files: Path, cwd: Path) -> list[subprocess.CompletedProcess[str]]:
    done = []
    for line in blocks("sh")[0].strip().splitlines():
        argv = shlex.split(line.split("#", 1)[0])
        assert argv[0] == "acp-supervisor", line
        argv = [str(SCRIPT), *[str(files / a) if a.endswith(".toml") else a for a in argv[1:]]]
        done.append(subprocess.run(argv, cwd=cwd, env=env(), capture_output=True, text=True,
                                   timeout=120))  # fmt: skip
    return done


def save_example(folder: Path) -> None:
    text = section()
    assert "`refunder.py`" in text and "`refunder.toml`" in text
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "refunder.py").write_text(blocks("python")[0])
    (folder / "refunder.toml").write_text(blocks("toml")[0])


@pytest.mark.parametrize("where", ["beside the config", "config elsewhere"])
def test_the_readme_worker_example_runs_as_written(tmp_path: Path, where: str) -> None:
    assert SCRIPT.exists(), f"no {SCRIPT}: install the package (pip install -e .)"
    files = tmp_path / "example"
    save_example(files)
    cwd = files if where == "beside the config" else tmp_path / "elsewhere"
    cwd.mkdir(exist_ok=True)
    check, run = run_readme_commands(files, cwd)
    assert check.returncode == 0 and check.stdout.strip() == "ok", (check.stdout, check.stderr)
    assert run.returncode == 0, run.stderr[-2000:] + run.stdout[-2000:]
    assert "Traceback" not in run.stderr + run.stdout
    # A simulated run keeps its own folder under state/simulations/.
    (run_dir,) = (cwd / "state" / "simulations").iterdir()
    effects = (run_dir / "effects.jsonl").read_text()
    assert "billing.refund" in effects  # the worker's action passed the gate and ran


def test_a_config_without_workers_warns_at_start(tmp_path: Path) -> None:
    (tmp_path / "empty.toml").write_text('[daemon]\nfleet = "idle"\n')
    done = subprocess.run([sys.executable, "-m", "supervisor", "--config", "empty.toml", "run",
                           "--horizon", "hour", "--simulate"], cwd=tmp_path, env=env(),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    logs = done.stdout + done.stderr
    warning = next(line for line in logs.splitlines() if "config.no_workers" in line)
    assert "warning" in warning and "empty.toml" in warning
