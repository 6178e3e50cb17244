"""Bad database input through the real command line: one line on stderr, the right exit code,
never a traceback. Each test runs `python -m supervisor` in a clean directory without ACP_*."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

UNREACHABLE_PG = "postgresql://postgres@127.0.0.1:1/none"


def run_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACP_")}
    return subprocess.run(
        [sys.executable, "-m", "supervisor", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def assert_one_error_line(result: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("acp-supervisor: error: ")
    for word in words:
        assert word in lines[0]


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("nonsense", ["database URL", "'nonsense'"]),
        ("mysql://x/y", ["unknown database scheme", "'mysql'"]),
        ("sqlite:///{tmp}/no/such/dir/x.db", ["does not exist", "no/such/dir"]),
        ("sqlite:///{tmp}/x.db?synchronous=sometimes", ["synchronous"]),
    ],
    ids=["malformed", "unknown-scheme", "missing-directory", "bad-option"],
)
def test_bad_database_url_is_a_usage_error(tmp_path: Path, url: str, words: list[str]) -> None:
    result = run_cli(tmp_path, "db", "migrate", "--db", url.format(tmp=tmp_path))
    assert_one_error_line(result, 2, *words)
    assert not list(tmp_path.rglob("*.db"))  # nothing created


def test_unreachable_postgres_fails_fast_with_one_line(tmp_path: Path) -> None:
    started = time.monotonic()
    result = run_cli(tmp_path, "db", "migrate", "--db", UNREACHABLE_PG)
    assert time.monotonic() - started < 10
    assert_one_error_line(result, 1, "postgres is unreachable", "127.0.0.1:1")


def test_migrate_twice_then_list_sessions_as_json(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    for _ in range(2):
        result = run_cli(tmp_path, "db", "migrate", "--db", url)
        assert result.returncode == 0, result.stderr
        assert "schema at version" in result.stdout
    assert (tmp_path / "store.db").is_file()
    listed = run_cli(tmp_path, "sessions", "list", "--json", "--db", url)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == []
    assert listed.stdout.strip() == "[]"  # the JSON and nothing else on stdout


def test_unmigrated_database_is_refused_by_commands(tmp_path: Path) -> None:
    (tmp_path / "blank.db").touch()  # exists, without a schema
    result = run_cli(tmp_path, "sessions", "list", "--db", f"sqlite:///{tmp_path / 'blank.db'}")
    assert_one_error_line(result, 2, "not migrated", "db migrate")
