"""Configuration errors through the real command line (a subprocess, cwd in a temp dir).

Every one exits 2 with one line on stderr that names what is wrong (and, for a key, the file and
the line), no traceback, and nothing written: no database appears in the state directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUN = ("run", "--horizon", "day", "--simulate", "--start", "2026-11-01T00:00:00Z")
SUPPORT = '[[workers]]\nname = "support"\nclass = "workers.support:SupportAgent"\n'


@dataclass
class Result:
    code: int
    out: str
    err: str


def acp(folder: Path, *argv: str) -> Result:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACP_") and k != "NOTIFY_SOCKET"}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, "-m", "supervisor", *argv], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    return Result(done.returncode, done.stdout, done.stderr)


def run_with(folder: Path, toml: str, *argv: str) -> Result:
    (folder / "bad.toml").write_text(toml)
    return acp(folder, "--config", "bad.toml", "--state-dir", "state", *(argv or RUN))


def assert_refused(folder: Path, result: Result, *words: str) -> str:
    """Exit 2, exactly one line on stderr naming `words`, no traceback, nothing written."""
    assert result.code == 2, (result.out, result.err)
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1, result.err
    assert lines[0].startswith("acp-supervisor"), lines[0]
    assert "error:" in lines[0]
    assert "Traceback" not in result.err and "Traceback" not in result.out
    for word in words:
        assert word in lines[0], (word, lines[0])
    written = [p for p in folder.rglob("*") if ".db" in p.name or p.name == "effects.jsonl"]
    assert written == []
    assert not (folder / "state").exists() or not any((folder / "state").iterdir())
    return lines[0]


def test_unknown_horizon_is_a_usage_error(tmp_path: Path) -> None:
    result = acp(tmp_path, "--state-dir", "state", "run", "--horizon", "year", "--simulate")
    line = assert_refused(tmp_path, result, "--horizon", "'year'")
    assert "hour" in line and "month" in line  # the choices


def test_config_that_does_not_parse(tmp_path: Path) -> None:
    result = run_with(tmp_path, '[daemon\nfleet = "a"\n')
    assert_refused(tmp_path, result, "bad.toml", "not valid TOML", "line 1")


def test_missing_config_file(tmp_path: Path) -> None:
    result = acp(tmp_path, "--config", "nope.toml", "--state-dir", "state", *RUN)
    assert_refused(tmp_path, result, "nope.toml")


@pytest.mark.parametrize(
    ("toml", "key", "line"),
    [
        ('[daemon]\nfleet = "a"\ncolour = "blue"\n', "colour", 3),
        ('[daemon]\nfleet = "a"\n\n' + SUPPORT + "replica = 2\n", "replica", 7),
        ('[horizons.day]\ncycle_every = "10m"\ncheckpoint_evry = 3\n', "checkpoint_evry", 3),
        ('[policy]\nunmatched = "allow"\nbogus = 1\n', "bogus", 3),
    ],
    ids=["daemon", "worker", "horizon", "policy"],
)
def test_unknown_key_names_key_file_and_line(
    tmp_path: Path, toml: str, key: str, line: int
) -> None:
    result = run_with(tmp_path, toml)
    assert_refused(tmp_path, result, f"'{key}'", "bad.toml", f"line {line}", "unknown key")


@pytest.mark.parametrize(
    "toml",
    [
        SUPPORT + 'cycle_every = "0s"\n',
        SUPPORT + 'cycle_every = "-5m"\n',
        "[horizons.day]\ncycle_every = -1\n",
    ],
    ids=["worker-0s", "worker-negative", "horizon-negative"],
)
def test_cycle_every_must_be_positive(tmp_path: Path, toml: str) -> None:
    result = run_with(tmp_path, toml)
    assert_refused(tmp_path, result, "cycle_every", "bad.toml")


@pytest.mark.parametrize("argv", [RUN, ("run",), ("db", "migrate")],
                         ids=["simulate", "real", "migrate"])  # fmt: skip
def test_unknown_timezone_refused_before_anything_is_written(
    tmp_path: Path, argv: tuple[str, ...]
) -> None:
    result = run_with(tmp_path, '[daemon]\nfleet = "a"\ntimezone = "Mars/Olympus"\n', *argv)
    assert_refused(tmp_path, result, "Mars/Olympus", "timezone", "bad.toml", "line 3")
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize(
    ("target", "words"),
    [
        ("workers.support:NoSuchAgent", ["NoSuchAgent"]),
        ("workers.no_such_module:Agent", ["workers.no_such_module"]),
        ("collections:OrderedDict", ["worker API"]),
        ("supervisor.runtime.worker:Worker", ["cycle"]),  # the base class itself: no cycle(ctx)
    ],
    ids=["no-class", "no-module", "not-a-worker", "no-cycle"],
)
def test_worker_class_problems_name_the_worker(
    tmp_path: Path, target: str, words: list[str]
) -> None:
    toml = f'[[workers]]\nname = "ghost"\nclass = "{target}"\n'
    result = run_with(tmp_path, toml)
    assert_refused(tmp_path, result, "'ghost'", *words)


def test_zero_replicas(tmp_path: Path) -> None:
    result = run_with(tmp_path, SUPPORT + "replicas = 0\n")
    assert_refused(tmp_path, result, "'support'", "replicas", "bad.toml", "line 4")


def test_backoff_max_below_initial(tmp_path: Path) -> None:
    result = run_with(tmp_path, SUPPORT + 'backoff = { initial = "10s", max = "5s" }\n')
    assert_refused(tmp_path, result, "'support'", "backoff", "max", "initial")


def test_the_same_harness_runs_a_valid_config(tmp_path: Path) -> None:
    """Control: with a good config the same command line runs and writes its store."""
    (tmp_path / "good.toml").write_text(SUPPORT)
    result = acp(tmp_path, "--config", "good.toml", "--state-dir", "state", "run", "--horizon",
                 "hour", "--simulate", "--start", "2026-11-01T00:00:00Z", "--json")  # fmt: skip
    assert result.code == 0, result.err
    assert "Traceback" not in result.err
    assert list((tmp_path / "state" / "simulations").glob("*/simulate.db"))


@pytest.mark.parametrize(
    ("line", "named"),
    [
        ("state_dir = 5", "daemon.state_dir"),
        ('db = "mysql://db/x"', "daemon.db"),
        ("fleet = 7", "daemon.fleet"),
    ],
)
def test_daemon_values_of_the_wrong_kind_name_the_key(
    tmp_path: Path, line: str, named: str
) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(f"[daemon]\n{line}\n")
    done = subprocess.run([sys.executable, "-m", "supervisor", "--config", str(cfg), "db", "migrate"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert named in done.stderr and "line 2" in done.stderr and "Traceback" not in done.stderr


def test_a_state_dir_that_cannot_be_made_is_one_line_exit_2(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "supervisor", "--state-dir", "/proc/nope/state",
                           "db", "migrate"], cwd=tmp_path, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2 and "state directory" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_a_config_that_is_not_utf8_names_the_file_and_the_byte(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_bytes(b'[daemon]\nfleet = "caf\xe9"\n')
    result = acp(tmp_path, "--config", "bad.toml", "--state-dir", "state", *RUN)
    assert_refused(tmp_path, result, "bad.toml", "UTF-8", "byte offset 21")


def test_replica_names_that_clash_with_another_worker_are_refused(tmp_path: Path) -> None:
    toml = (
        '[[workers]]\nname = "notes"\nclass = "workers.support:SupportAgent"\nreplicas = 2\n\n'
        '[[workers]]\nname = "notes-1"\nclass = "workers.support:SupportAgent"\n'
    )
    result = run_with(tmp_path, toml)
    assert_refused(tmp_path, result, "bad.toml, line 7", "clash", "'notes-1'", "replica", "'notes'")


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("key", ["max_cost", "max_actions"])
def test_a_non_finite_budget_in_the_config_is_refused(tmp_path: Path, key: str, value: str) -> None:
    result = run_with(tmp_path, f"[horizons.day]\n{key} = {value}\n")
    assert_refused(tmp_path, result, "bad.toml", f"horizons.day.{key}", "finite")


@pytest.mark.parametrize("value", ["nan", "inf", "NaN", "-1"])
def test_a_non_finite_max_cost_on_the_command_line_is_refused(tmp_path: Path, value: str) -> None:
    result = acp(tmp_path, "--state-dir", "state", "approvals", "approve", "0123456789",
                 "--by", "ops", "--scope", "window", "--max-cost", value)  # fmt: skip
    assert_refused(tmp_path, result, "--max-cost", "finite")


@pytest.mark.parametrize("value", ["nan", "inf", "0.5"])
def test_a_backoff_multiplier_must_be_finite_and_at_least_1(tmp_path: Path, value: str) -> None:
    result = run_with(tmp_path, SUPPORT + f"backoff = {{ multiplier = {value} }}\n")
    assert_refused(tmp_path, result, "bad.toml", "'support'", "multiplier", "finite")


def test_the_line_of_a_table_after_a_blank_line_is_its_own(tmp_path: Path) -> None:
    # The line finder once counted the blank line before a table header as the header's line.
    result = run_with(tmp_path, '[daemon]\nfleet = "a"\n\n[nonsense]\nx = 1\n')
    assert_refused(tmp_path, result, "'nonsense'", "bad.toml", "line 4")


def test_policy_shadow_must_be_a_path(tmp_path: Path) -> None:
    result = run_with(tmp_path, "[policy]\nunmatched = 'deny'\nshadow = 5\n")
    assert_refused(tmp_path, result, "policy.shadow", "bad.toml", "line 3")
