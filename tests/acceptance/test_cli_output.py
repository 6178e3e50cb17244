"""The CLI's output composes: results on stdout, logs on stderr, quiet on a closed pipe.

Every test runs the real CLI (`python -m supervisor` or the installed `acp-supervisor` script) as
a subprocess, the way a shell or journald sees it.
"""

from __future__ import annotations

import json
import os
import pty
import signal
import socket
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.acceptance

CLOSED_PIPE = 128 + signal.SIGPIPE  # 141: what a shell reports for a process SIGPIPE ended


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACP_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def cli(tmp_path: Path, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "supervisor", "--state-dir", str(tmp_path / "state"), *args]
    kw.setdefault("capture_output", True)
    return subprocess.run(argv, cwd=tmp_path, env=_env(), text=True, timeout=120, **kw)


def log_events(stderr: str) -> list[dict[str, Any]]:
    """stderr as structured log lines; every line must be one (JSON off a terminal)."""
    return [json.loads(line) for line in stderr.splitlines() if line.strip()]


def sim_db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'state' / 'sim.db'}"


@pytest.fixture(scope="module")
def day_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """A folder whose state holds a finished simulated day, and that run's process."""
    folder = tmp_path_factory.mktemp("day")
    done = cli(folder, "--db", sim_db(folder), "run", "--horizon", "day", "--simulate")
    assert done.returncode == 0, done.stderr[-3000:]
    return folder, done


@pytest.fixture(scope="module")
def simulated_day(day_run: tuple[Path, subprocess.CompletedProcess[str]]) -> tuple[Path, str]:
    """The folder of the simulated day, and that run's stderr."""
    return day_run[0], day_run[1].stderr


# -- --version ------------------------------------------------------------------------------------


def test_version_from_package_metadata(tmp_path: Path) -> None:
    expected = f"acp-supervisor {version('acp-supervisor')}\n"
    script = Path(sys.executable).with_name("acp-supervisor")
    assert script.exists(), "the install gives the acp-supervisor command"
    for argv in ([str(script), "--version"], [sys.executable, "-m", "supervisor", "--version"]):
        done = subprocess.run(argv, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                              timeout=30)  # fmt: skip
        assert (done.returncode, done.stdout, done.stderr) == (0, expected, ""), argv


# -- logs on stderr, the result on stdout -----------------------------------------------------------


def test_run_off_a_terminal_prints_nothing_on_stdout(
    day_run: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    assert day_run[1].stdout == "", "no terminal, no --json: the scorecard goes to the log only"


def test_run_logs_on_stderr_and_the_scorecard_is_one_event(simulated_day: tuple[Path, str]) -> None:
    _folder, stderr = simulated_day
    events = log_events(stderr)  # fails on any line that is not a JSON log line (the text card)
    assert any(e["event"] == "daemon.ready" for e in events)
    cards = [e for e in events if e["event"] == "run.scorecard"]
    assert len(cards) == 1
    card = cards[0]
    assert card["windows_opened"] == card["windows_closed"] == card["windows"] == 24
    assert card["cycles"] > 0 and card["actions_started"] > 0 and "denials_by_reason" in card


def test_run_json_prints_only_the_scorecard(tmp_path: Path) -> None:
    done = cli(
        tmp_path, "--db", sim_db(tmp_path), "run", "--horizon", "hour", "--simulate", "--json"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    card = json.loads(done.stdout)  # the whole of stdout is one JSON document
    (event,) = [e for e in log_events(done.stderr) if e["event"] == "run.scorecard"]
    assert card["total"] == {k: event[k] for k in card["total"]}
    assert card["total"]["windows_opened"] == 1


def test_run_on_a_terminal_prints_the_text_scorecard(tmp_path: Path) -> None:
    master, slave = pty.openpty()
    with (tmp_path / "stderr").open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor", "--state-dir", str(tmp_path / "state"),
             "--db", sim_db(tmp_path), "run", "--horizon", "hour", "--simulate"],
            cwd=tmp_path, env=_env(), stdout=slave, stderr=err,
        )  # fmt: skip
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert proc.wait(60) == 0
    shown = b"".join(chunks).decode()
    assert shown.startswith("scorecard for fleet default"), shown[:500]
    assert "{" not in shown, "no log line on the terminal's stdout"
    assert any(e["event"] == "run.scorecard" for e in log_events((tmp_path / "stderr").read_text()))


@pytest.mark.parametrize(
    "drill", [["killswitch", "--workers", "3", "--seconds", "0.5"], ["approval-backlog", "--count", "5"]],
    ids=lambda d: d[0],
)  # fmt: skip
def test_drill_prints_only_its_report(tmp_path: Path, drill: list[str]) -> None:
    done = cli(tmp_path, "drill", *drill)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0] == f"drill {drill[0]}: PASS", lines[:5]
    # The report: its checks, then its figures; nothing else (no log line) on stdout.
    assert all(ln.startswith(("  [", "figures:", "  ")) for ln in lines[1:]), lines
    assert not [ln for ln in lines if ln.lstrip().startswith("{")]
    logged = log_events(done.stderr)  # whatever the drill logs is on stderr, as log lines
    if drill[0] == "killswitch":
        assert logged, "the killswitch drill's fleet logs every refusal, on stderr"


def test_worker_state_is_logged_on_changes_only(
    day_run: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    done = day_run[1]
    events = [
        json.loads(ln) for ln in (done.stdout + done.stderr).splitlines() if ln.startswith("{")
    ]
    states = [(e["worker"], e["state"]) for e in events if e["event"] == "worker.state"]
    assert states, "a run logs its workers' states"
    last: dict[str, str] = {}
    for worker, state in states:
        assert last.get(worker) != state, f"{worker} logged {state} twice in a row: {states}"
        last[worker] = state


# -- a closed pipe --------------------------------------------------------------------------------


def _session_id(folder: Path) -> str:
    listed = cli(folder, "--db", sim_db(folder), "sessions", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    return str(json.loads(listed.stdout)[0]["id"])


def _into_closed_pipe(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run with stdout on a pipe whose reader is already gone: the first write meets EPIPE."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return cli(folder, *args, stdout=write_end, stderr=subprocess.PIPE, capture_output=False)
    finally:
        os.close(write_end)


READS = [
    ("status",), ("status", "--json"), ("scorecard",), ("sessions", "list"),
    ("approvals", "list"), ("checkpoints", "list"), ("killswitch", "status"),
    ("actions", "in-doubt"), ("tokens", "usage"), ("recover", "--dry-run"),
    ("--version",),
]  # fmt: skip


@pytest.mark.parametrize("args", READS, ids=" ".join)
def test_closed_pipe_ends_quietly(simulated_day: tuple[Path, str], args: tuple[str, ...]) -> None:
    folder, _ = simulated_day
    done = _into_closed_pipe(folder, "--db", sim_db(folder), *args)
    assert (done.returncode, done.stderr) == (CLOSED_PIPE, ""), done.stderr[-2000:]


def test_events_replay_into_a_closed_pipe(simulated_day: tuple[Path, str]) -> None:
    folder, _ = simulated_day
    sid = _session_id(folder)
    for fmt in ((), ("--json",)):
        done = _into_closed_pipe(
            folder, "--db", sim_db(folder), "events", "replay", "--session", sid, *fmt
        )
        assert (done.returncode, done.stderr) == (CLOSED_PIPE, ""), done.stderr[-2000:]


@pytest.mark.parametrize("command", ["events replay --session {sid}", "status"])
def test_head_closes_the_pipe_early(simulated_day: tuple[Path, str], command: str) -> None:
    """Through a shell pipeline, as a user types it; `head -n 0` leaves before the first write."""
    folder, _ = simulated_day
    base = f"{sys.executable} -m supervisor --state-dir {folder / 'state'} --db {sim_db(folder)}"
    line = f"{base} {command.format(sid=_session_id(folder))}"
    script = f'{line} | head -n 0; echo "status=${{PIPESTATUS[0]}}" >&2'
    done = subprocess.run(["bash", "-c", script], cwd=folder, env=_env(), capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.stdout == ""
    assert done.stderr.splitlines() == [f"status={CLOSED_PIPE}"], "no traceback, no message"


# -- the metrics port ------------------------------------------------------------------------------


def test_metrics_port_in_use_is_one_line_exit_2(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "config.toml"
        config.write_text(
            f'[metrics]\nenabled = true\nhost = "127.0.0.1"\nport = {port}\n'
            '[[workers]]\nname = "support"\nclass = "workers.support:SupportAgent"\n'
        )
        done = cli(tmp_path, "--config", str(config), "run")
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stdout == ""
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert f"127.0.0.1:{port}" in lines[0] and "in use" in lines[0], lines[0]
    assert "Traceback" not in done.stderr
