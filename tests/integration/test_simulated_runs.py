"""Simulated runs do not collide: every `run --simulate` has its own database under
state/simulations/<run id>/ (unless --db names one), and the read commands look at one with
`--run ID|latest`. Each test runs the real command line as a subprocess in a clean directory."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
START = "2026-11-01T00:00:00Z"


def acp(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACP_") and k != "NOTIFY_SOCKET"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "supervisor", "--state-dir", "state", *args],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip


def ok(folder: Path, *args: str) -> Any:
    done = acp(folder, *args)
    assert done.returncode == 0, (args, done.stderr[-2000:])
    assert "Traceback" not in done.stderr
    return json.loads(done.stdout) if "--json" in args else done.stdout


def one_error(done: subprocess.CompletedProcess[str], code: int) -> str:
    assert done.returncode == code, (done.stdout[-1000:], done.stderr[-1000:])
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("acp-supervisor: error: ")
    return lines[0]


def runs(folder: Path) -> list[Path]:
    return sorted(p.parent for p in (folder / "state" / "simulations").glob("*/simulate.db"))


def events(db: Path) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(db)
    try:
        return list(con.execute("SELECT session_id, seq, kind, reason, payload, command_id, worker,"
                                " created_at FROM events ORDER BY session_id, seq"))  # fmt: skip
    finally:
        con.close()


def test_day_then_week_then_day_again_in_one_state_dir(tmp_path: Path) -> None:
    day = ok(tmp_path, "run", "--horizon", "day", "--simulate", "--start", START, "--json")
    week = ok(tmp_path, "run", "--horizon", "week", "--simulate", "--start", START, "--json")
    again = ok(tmp_path, "run", "--horizon", "day", "--simulate", "--start", START, "--json")
    assert len(runs(tmp_path)) == 3
    assert len({day["run"], week["run"], again["run"]}) == 3
    # each scorecard covers its own run alone
    assert day["total"]["windows_opened"] == 24 and len(day["windows"]) == 24
    assert week["total"]["windows_opened"] == 7 and len(week["windows"]) == 7
    assert again["total"] == day["total"]
    # run ids sort by the time they were made: latest is the last run
    assert sorted([day["run"], week["run"], again["run"]]) == [
        day["run"],
        week["run"],
        again["run"],
    ]


def test_identical_seed_and_start_give_identical_event_sequences(tmp_path: Path) -> None:
    for _ in range(2):
        ok(tmp_path, "run", "--horizon", "day", "--simulate", "--start", START, "--seed", "3",
           "--json")  # fmt: skip
    first, second = runs(tmp_path)
    a, b = events(first / "simulate.db"), events(second / "simulate.db")
    assert len(a) > 300
    assert a == b


def test_read_commands_take_run_id_prefix_or_latest(tmp_path: Path) -> None:
    day = ok(tmp_path, "run", "--horizon", "day", "--simulate", "--start", START, "--json")
    hour = ok(tmp_path, "run", "--horizon", "hour", "--simulate", "--start", START, "--json")
    assert ok(tmp_path, "scorecard", "--run", day["run"], "--json")["total"] == day["total"]
    assert ok(tmp_path, "scorecard", "--run", "latest", "--json")["total"] == hour["total"]
    prefix = day["run"][:-1]  # a unique prefix names its run
    assert ok(tmp_path, "scorecard", "--run", prefix, "--json")["total"] == day["total"]
    assert len(ok(tmp_path, "--run", day["run"], "sessions", "list", "--json")) == 24
    assert len(ok(tmp_path, "sessions", "list", "--run", "latest", "--json")) == 1
    for command in (["status"], ["approvals", "list"], ["checkpoints", "list"],
                    ["actions", "in-doubt"], ["killswitch", "status"]):  # fmt: skip
        ok(tmp_path, *command, "--run", "latest", "--json")
    system = ok(tmp_path, "events", "replay", "--session", "system:default", "--run", "latest",
                "--json")  # fmt: skip
    assert system and system[0]["kind"] == "RUN_STARTED"
    unknown = one_error(acp(tmp_path, "scorecard", "--run", "19990101T000000Z-nope"), 1)
    assert "no simulated run" in unknown and str(tmp_path / "state" / "simulations") in unknown
    both = one_error(acp(tmp_path, "scorecard", "--run", "latest", "--db", "sqlite:///x.db"), 2)
    assert "--run and --db" in both


def test_the_end_of_run_names_the_run(tmp_path: Path) -> None:
    done = acp(tmp_path, "run", "--horizon", "hour", "--simulate", "--start", START, "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    (only,) = runs(tmp_path)
    assert json.loads(done.stdout)["run"] == only.name
    logged = [json.loads(line) for line in done.stderr.splitlines() if '"run.simulation"' in line]
    assert [e["run"] for e in logged] == [only.name]  # the log names it too, for journald


def test_a_read_of_a_missing_database_says_so_and_creates_nothing(tmp_path: Path) -> None:
    typo = tmp_path / "typo.db"
    line = one_error(acp(tmp_path, "--db", f"sqlite:///{typo}", "status"), 2)
    assert f"database {typo} does not exist" in line
    assert "not migrated" not in line
    assert str(tmp_path / "state" / "simulations") in line and "--run" in line
    assert not typo.exists()
    # the default database of a state directory that never ran: the same, nothing left behind
    line = one_error(acp(tmp_path, "sessions", "list"), 2)
    assert "supervisor.db does not exist" in line
    assert not list(tmp_path.rglob("*.db*"))


def test_start_without_offset_is_read_in_the_configured_zone(tmp_path: Path) -> None:
    (tmp_path / "tokyo.toml").write_text('[daemon]\ntimezone = "Asia/Tokyo"\n')
    ok(tmp_path, "--config", "tokyo.toml", "run", "--horizon", "hour", "--simulate", "--start",
       "2026-11-01T09:00:00", "--json")  # fmt: skip
    (session,) = ok(tmp_path, "--config", "tokyo.toml", "sessions", "list", "--run", "latest",
                    "--json")  # fmt: skip
    assert session["starts_at"] == "2026-11-01T00:00:00+00:00"  # 09:00 in Tokyo
    assert "configured time zone" in ok(tmp_path, "run", "--help").replace("\n", " ")


def test_ages_of_a_simulated_run_count_from_its_clock_not_the_wall_clock(tmp_path: Path) -> None:
    # A day far from today: against the wall clock every age would read `in 72y...`.
    ok(tmp_path, "run", "--horizon", "day", "--simulate", "--start", "2099-01-01T00:00:00Z")
    rows = ok(tmp_path, "checkpoints", "list", "--run", "latest").strip().splitlines()[1:]
    assert rows, "the day made no checkpoint"
    ages = [row.rsplit("  ", 1)[1].strip() for row in rows]
    assert all(age.endswith(" ago") and "d" not in age for age in ages), ages
    approvals = ok(tmp_path, "approvals", "list", "--run", "latest").strip().splitlines()[1:]
    assert approvals, "the day raised no approval"
    assert all("expired by deadline" in row and " ago" in row for row in approvals), approvals
    assert not any(" in " in row for row in approvals), approvals
