"""Crash recovery with the real daemon: SIGKILL at the worst moment, restart, and check from the
store that the startup scan repaired everything before any worker ran again (promises 6 and 7).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.waiting import eventually_sync

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.acceptance
T = TypeVar("T")

BASE = """
[daemon]
fleet = "rec"
profile = "hour"
shutdown_timeout = "5s"
[horizons.hour]
cycle_every = "200ms"
"""

APPROVAL_CONFIG = (
    BASE
    + """
[approvals]
timeout = "3s"
[[workers]]
name = "releaser"
class = "tests.recovery_workers:ApprovalWorker"
[[workers]]
name = "ticker"
class = "tests.recovery_workers:TickWorker"
"""
)

SLOW_CONFIG = (
    BASE
    + """
[[workers]]
name = "slow"
class = "tests.recovery_workers:SlowJobWorker"
params = {{ marker = "{marker}", sleep = 60 }}
[[workers]]
name = "ticker"
class = "tests.recovery_workers:TickWorker"
"""
)


class Fleet:
    """One config and state dir; the daemon can be started, killed and restarted on them."""

    def __init__(self, tmp_path: Path, config: str) -> None:
        self.dir = tmp_path
        self.config = tmp_path / "config.toml"
        self.config.write_text(config)
        self.state = tmp_path / "state"
        self.db = self.state / "supervisor.db"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith("ACP_") and k != "NOTIFY_SOCKET"}  # fmt: skip
        self.env["PYTHONPATH"] = str(ROOT)

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "supervisor", "--config", str(self.config),
                "--state-dir", str(self.state), *args]  # fmt: skip

    def start(self) -> subprocess.Popen[bytes]:
        log = (self.dir / f"daemon-{len(self.procs)}.log").open("wb")
        proc = subprocess.Popen(self.argv("run"), cwd=ROOT, env=self.env, stdout=log,
                                stderr=subprocess.STDOUT)  # fmt: skip
        self.procs.append(proc)
        return proc

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(self.argv(*args), cwd=ROOT, env=self.env, capture_output=True,
                              text=True, timeout=60)  # fmt: skip
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, self.logs()

    def logs(self) -> str:
        logs = sorted(self.dir.glob("daemon-*.log"))
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in logs)

    def query(self, sql: str, *args: Any) -> list[sqlite3.Row]:
        if not self.db.exists():
            return []
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10)
        conn.row_factory = sqlite3.Row
        try:
            return conn.execute(sql, args).fetchall()
        except sqlite3.OperationalError:
            return []  # not migrated yet
        finally:
            conn.close()

    def crashed(self) -> str | None:
        """A daemon that exited on its own (not killed by the test, not stopped cleanly)."""
        for proc in self.procs:
            if proc.poll() not in (None, -signal.SIGKILL, 0):
                return f"daemon exited {proc.returncode}"
        return None

    def wait_for(self, what: str, probe: Callable[[], T | None], seconds: float = 20.0) -> T:
        return eventually_sync(probe, what, within=seconds, abort=self.crashed, context=self.logs)

    def last_event_id(self) -> int:
        rows = self.query("SELECT max(id) AS n FROM events")
        return int(rows[0]["n"] or 0) if rows else 0

    def events_after(self, mark: int, kind: str) -> list[sqlite3.Row]:
        return self.query("SELECT * FROM events WHERE id > ? AND kind = ? ORDER BY id", mark, kind)

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


@pytest.fixture
def fleet_factory(tmp_path: Path) -> Iterator[Callable[[str], Fleet]]:
    made: list[Fleet] = []

    def make(config: str) -> Fleet:
        made.append(Fleet(tmp_path, config))
        return made[-1]

    yield make
    for f in made:
        f.cleanup()


def test_approval_that_expired_while_the_daemon_was_down_is_denied_at_startup(
    fleet_factory: Callable[[str], Fleet],
) -> None:
    f = fleet_factory(APPROVAL_CONFIG)
    first = f.start()
    pending = f.wait_for("a pending approval", lambda: f.query(
        "SELECT * FROM approvals WHERE status = 'pending'"))  # fmt: skip
    f.kill(first)  # well before the 3 s deadline: nobody is left to expire it
    approval = pending[0]
    deadline = datetime.fromisoformat(approval["deadline"])
    assert f.query("SELECT status FROM approvals WHERE id = ?", approval["id"])[0][0] == "pending"
    # The deadline passes while no daemon runs (with a margin over the clock's resolution).
    eventually_sync(lambda: datetime.now(deadline.tzinfo) >= deadline + timedelta(seconds=0.2),
                    "0.2 s past the approval's deadline")  # fmt: skip
    mark = f.last_event_id()

    second = f.start()
    started = f.wait_for("an action of the new process",
                         lambda: f.events_after(mark, "ACTION_STARTED"))  # fmt: skip
    expired = f.events_after(mark, "APPROVAL_EXPIRED")
    recovery = [e for e in f.events_after(mark, "RECOVERY") if e["reason"] == "repaired"]
    f.stop(second)

    assert len(expired) == 1, f.logs()
    assert json.loads(expired[0]["payload"])["approval"] == approval["id"]
    # denied by the startup scan, before the new process's workers ran anything
    assert recovery and json.loads(recovery[0]["payload"])["approvals_expired"] == 1
    assert expired[0]["id"] < recovery[0]["id"] < started[0]["id"]
    row = f.query("SELECT * FROM approvals WHERE id = ?", approval["id"])[0]
    assert (row["status"], row["decided_by"]) == ("expired", "deadline")
    assert datetime.fromisoformat(row["decided_at"]) >= deadline
    # the releaser kept asking after the restart and was refused as expired, never run
    denied = f.query(
        "SELECT reason FROM events WHERE kind = 'ACTION_DENIED' AND worker = 'releaser'"
    )
    assert {r["reason"] for r in denied} <= {"approval_expired"}
    assert not f.query("SELECT * FROM actions WHERE worker = 'releaser'")


def test_action_killed_mid_effect_is_in_doubt_and_operators_resolve_it(
    fleet_factory: Callable[[str], Fleet], tmp_path: Path
) -> None:
    marker = tmp_path / "effect-started"
    f = fleet_factory(SLOW_CONFIG.format(marker=marker))
    first = f.start()
    f.wait_for("the slow effect to start", marker.exists)
    command_id = marker.read_text()
    f.kill(first)  # in the middle of the effect: started record, no outcome

    # a dry run reports the orphan and changes nothing
    mark = f.last_event_id()
    dry = json.loads(f.cli("recover", "--dry-run", "--json").stdout)
    # (a ticker action cut between its started record and its outcome may be found too)
    assert command_id in dry["found"]["actions"] and dry["in_doubt"] == len(dry["found"]["actions"])
    assert f.query("SELECT status FROM actions WHERE command_id = ?", command_id)[0][0] == "started"
    assert f.last_event_id() == mark

    second = f.start()
    f.wait_for("the startup scan", lambda: f.events_after(mark, "RECOVERY"))
    in_doubt = f.events_after(mark, "ACTION_IN_DOUBT")
    assert sorted(e["command_id"] for e in in_doubt) == sorted(dry["found"]["actions"])
    listed = {r["command_id"]: r for r in json.loads(f.cli("actions", "in-doubt", "--json").stdout)}
    assert sorted(listed) == sorted(dry["found"]["actions"])
    assert listed[command_id]["name"] == "job.long" and listed[command_id]["status"] == "in_doubt"
    # the worker retries its key and is refused: not safe to retry, the effect is not repeated
    refused = "SELECT * FROM events WHERE kind = 'ACTION_DENIED' AND reason = ? AND command_id = ?"
    f.wait_for("the retry to be refused", lambda: f.query(refused, "in_doubt", command_id))

    out = f.cli("actions", "resolve", command_id, "--as", "done", "--by", "op").stdout
    assert "resolved as done by op" in out
    left = json.loads(f.cli("actions", "in-doubt", "--json").stdout)
    assert command_id not in [r["command_id"] for r in left]
    row = f.query("SELECT * FROM actions WHERE command_id = ?", command_id)[0]
    assert (row["status"], row["resolved_by"]) == ("resolved_done", "op")
    session = f.query("SELECT * FROM sessions WHERE id = ?", row["session_id"])[0]
    assert session["used_actions"] >= 1 and session["reserved_actions"] >= 0
    f.stop(second)

    effects = [json.loads(line) for line in (f.state / "effects.jsonl").read_text().splitlines()]
    assert [e["command_id"] for e in effects if e["action"] == "job.long"] == [command_id]
    assert f.query("SELECT count(*) FROM events WHERE kind = 'ACTION_STARTED' AND command_id = ?",
                   command_id)[0][0] == 1  # fmt: skip
