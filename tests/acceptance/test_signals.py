"""Signals against the real daemon, a subprocess in continuous mode on the system clock:

- SIGTERM (and SIGINT) while an effect is running: the action finishes and is recorded, the
  worker checkpoints, the daemon exits 0 and leaves its window open (the horizon is not over);
- SIGHUP after the config changed: the added worker starts, the removed one stops, the unchanged
  one runs on untouched; an invalid config is rejected with a logged error and the old one stays.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.waiting import eventually_sync

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.acceptance
T = TypeVar("T")

HEADER = """
[daemon]
fleet = "sig"
profile = "hour"
shutdown_timeout = "10s"

[horizons.hour]
cycle_every = "100ms"
max_actions = 1000000
max_cost = 1000000
"""


def _worker(name: str, cls: str, params: dict[str, Any] | None = None) -> str:
    text = f'[[workers]]\nname = "{name}"\nclass = "tests.fleet_workers:{cls}"\n'
    if params:
        text += "params = { " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in params.items())
        text += " }\n"
    return text


class DaemonProcess:
    def __init__(self, tmp_path: Path, config: str) -> None:
        self.dir = tmp_path
        self.state = tmp_path / "state"
        self.db = self.state / "supervisor.db"
        self.config = tmp_path / "supervisor.toml"
        self.config.write_text(config)
        self.stdout = tmp_path / "stdout.log"
        self.stderr = tmp_path / "stderr.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def env() -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("ACP_") and k != "NOTIFY_SOCKET"}  # fmt: skip
        env["PYTHONPATH"] = str(ROOT)
        return env

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "supervisor", "--config", str(self.config),
                "--state-dir", str(self.state), *args]  # fmt: skip

    def start(self) -> None:
        with self.stdout.open("wb") as out, self.stderr.open("wb") as err:
            self.proc = subprocess.Popen(self.argv("run"), cwd=ROOT, env=self.env(),
                                         stdout=out, stderr=err)  # fmt: skip

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(timeout=10)

    def logs(self) -> list[dict[str, Any]]:
        out = []
        for line in self.stderr.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def logged(self, event: str) -> list[dict[str, Any]]:
        return [entry for entry in self.logs() if entry.get("event") == event]

    def query(self, sql: str, *args: Any) -> list[sqlite3.Row]:
        if not self.db.exists():
            return []
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5)
        conn.row_factory = sqlite3.Row
        try:
            return conn.execute(sql, args).fetchall()
        except sqlite3.OperationalError:
            return []  # schema not there yet, or busy: the caller polls again
        finally:
            conn.close()

    def action_counts(self) -> dict[str, int]:
        rows = self.query("SELECT worker, count(*) AS n FROM actions WHERE status = 'succeeded' "
                          "GROUP BY worker")  # fmt: skip
        return {r["worker"]: int(r["n"]) for r in rows}

    def status(self) -> dict[str, Any]:
        done = subprocess.run(self.argv("status", "--json"), cwd=ROOT, env=self.env(),
                              capture_output=True, text=True, timeout=30)  # fmt: skip
        assert done.returncode == 0, done.stderr
        data: dict[str, Any] = json.loads(done.stdout)
        return data

    def diagnose(self) -> str:
        return (f"stdout tail:\n{self.stdout.read_text()[-3000:]}\n"
                f"stderr:\n{self.stderr.read_text()[-3000:]}")  # fmt: skip

    def exited(self) -> str | None:
        """Why waiting on this daemon is pointless: it has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            return f"daemon exited ({self.proc.returncode})"
        return None

    def eventually(self, probe: Callable[[], T | None], what: str) -> T:
        """Poll `probe` until it holds; fail at once, with the logs, if the daemon exited."""
        return eventually_sync(probe, what, every=0.02, abort=self.exited, context=self.diagnose)


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[[str], DaemonProcess]]:
    started: list[DaemonProcess] = []

    def make(config: str) -> DaemonProcess:
        d = DaemonProcess(tmp_path, config)
        started.append(d)
        d.start()
        return d

    yield make
    for d in started:
        d.kill()


# -- SIGTERM / SIGINT: drain ----------------------------------------------------------------------


def _trace(trace: Path) -> dict[str, dict[str, float]]:
    """{command_id: {"start": t, "end": t}} from SlowEffect's trace (unix times)."""
    out: dict[str, dict[str, float]] = {}
    if trace.exists():
        for line in trace.read_text().splitlines():
            word, command_id, at = line.split()
            out.setdefault(command_id, {})[word] = float(at)
    return out


def _effect_in_progress(trace: Path) -> str | None:
    running = [c for c, marks in _trace(trace).items() if "end" not in marks]
    return running[-1] if running else None


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_mid_effect_finishes_the_action_checkpoints_and_exits_0(
    daemon_factory: Callable[[str], DaemonProcess], tmp_path: Path, signum: int
) -> None:
    trace = tmp_path / "trace.log"
    d = daemon_factory(HEADER + _worker("slow", "SlowEffect",
                                        {"trace": str(trace), "effect_seconds": 1.0}))  # fmt: skip
    command_id = d.eventually(lambda: _effect_in_progress(trace), "an effect in progress")
    signalled_at, signalled_wall = time.monotonic(), time.time()
    d.signal(signum)
    code = d.wait(timeout=20)
    elapsed = time.monotonic() - signalled_at
    assert code == 0, d.diagnose()
    assert elapsed < 10, f"the drain took {elapsed:.1f}s"

    # the effect that was running finished, and its outcome is recorded (not in doubt)
    marks = _trace(trace)[command_id]
    assert "end" in marks, marks
    assert marks["end"] > signalled_wall, "the signal did not land while the effect was running"
    # nothing was left half-done, and no new effect began after the signal
    assert all("end" in m and m["start"] < signalled_wall for m in _trace(trace).values())
    (action,) = d.query("SELECT * FROM actions WHERE command_id = ?", command_id)
    assert action["status"] == "succeeded", dict(action)
    kinds = [r["kind"] for r in d.query(
        "SELECT kind FROM events WHERE command_id = ? ORDER BY id", command_id)]  # fmt: skip
    assert "ACTION_SUCCEEDED" in kinds and "ACTION_IN_DOUBT" not in kinds, kinds
    unfinished = d.query("SELECT command_id FROM actions WHERE status IN ('started', 'in_doubt')")
    assert unfinished == []

    # the worker checkpointed at the cycle of that action, on the way out
    cycle = json.loads(action["params"])["cycle"]
    checkpoints = d.query("SELECT cycle FROM checkpoints WHERE worker = 'slow' ORDER BY id")
    assert checkpoints and checkpoints[-1]["cycle"] == cycle
    (worker,) = d.query("SELECT state FROM workers WHERE name = 'slow'")
    assert worker["state"] == "stopped"

    # continuous mode: the horizon is not over, the current window stays open
    latest = d.query("SELECT status FROM sessions ORDER BY starts_at DESC LIMIT 1")
    assert latest and latest[0]["status"] == "open"
    assert d.query("SELECT id FROM events WHERE kind = 'WINDOW_CLOSED'") == []
    signals = [e["signal"] for e in d.logged("daemon.signal")]
    assert signals == [signal.Signals(signum).name]
    (stopped,) = d.logged("daemon.stopped")
    assert stopped["horizon_over"] is False


# -- SIGHUP: reload -------------------------------------------------------------------------------


def test_sighup_adds_and_removes_workers_and_keeps_the_unchanged_one_running(
    daemon_factory: Callable[[str], DaemonProcess],
) -> None:
    d = daemon_factory(HEADER + _worker("keeper", "Ticker") + _worker("goner", "Ticker"))
    d.eventually(lambda: all(d.action_counts().get(w, 0) >= 3 for w in ("keeper", "goner")),
                 "both workers acting")  # fmt: skip

    # add "newbie", remove "goner", leave "keeper" as it is
    d.config.write_text(HEADER + _worker("keeper", "Ticker") + _worker("newbie", "Ticker"))
    d.signal(signal.SIGHUP)
    d.eventually(lambda: d.logged("config.reloaded"), "config.reloaded")
    (reloaded,) = d.logged("config.reloaded")
    assert reloaded["added"] == ["newbie"] and reloaded["removed"] == ["goner"]
    d.eventually(lambda: d.action_counts().get("newbie", 0) >= 5, "the added worker acting")

    # the removed worker stopped: its actions no longer grow, its row says stopped
    goner_rows = d.eventually(
        lambda: [r for r in d.query("SELECT * FROM workers WHERE name = 'goner'")
                 if r["state"] == "stopped"], "the removed worker stopped")  # fmt: skip
    assert goner_rows
    goner_before = d.action_counts()["goner"]
    keeper_before = d.action_counts()["keeper"]
    (keeper_row,) = d.query("SELECT * FROM workers WHERE name = 'keeper'")
    time.sleep(0.6)  # a window in which the removed worker must not act again

    def keeper_cycled_on() -> dict[str, int] | None:
        counts = d.action_counts()
        return counts if counts["keeper"] > keeper_before else None

    # the unchanged worker cycles on (waited for: on a loaded machine its next action may be late)
    counts = d.eventually(keeper_cycled_on, "the unchanged worker acting after the reload")
    assert counts["goner"] == goner_before
    (keeper_now,) = d.query("SELECT * FROM workers WHERE name = 'keeper'")
    assert keeper_now["restarts"] == 0 and keeper_now["state"] == "running"
    keeper_events = d.query("SELECT kind FROM events WHERE worker = 'keeper' AND kind IN "
                            "('WORKER_CRASHED', 'WORKER_RESTARTED')")  # fmt: skip
    assert keeper_events == []

    # an invalid config (an unknown key) is rejected with a logged error; the old one stays
    d.config.write_text(HEADER + "bogus_key = 1\n" + _worker("keeper", "Ticker"))
    d.signal(signal.SIGHUP)
    (rejected,) = d.eventually(lambda: d.logged("config.reload_rejected"), "the rejection")
    assert rejected["level"] == "error"
    assert "bogus_key" in rejected["error"]
    assert d.alive()
    before = d.action_counts()
    d.eventually(lambda: all(d.action_counts()[w] > before[w] for w in ("keeper", "newbie")),
                 "both workers still acting after the rejected reload")  # fmt: skip
    assert len(d.logged("config.reloaded")) == 1

    d.signal(signal.SIGTERM)
    assert d.wait() == 0, d.diagnose()
    d.config.write_text(HEADER + _worker("keeper", "Ticker") + _worker("newbie", "Ticker"))
    rows = {w["name"]: w for w in d.status()["workers"]}
    assert set(rows) == {"keeper", "goner", "newbie"}
    # (the workers table is written on state changes, so its cycle is checked once stopped)
    assert rows["keeper"]["restarts"] == 0 and rows["keeper"]["cycle"] > keeper_row["cycle"]
    assert rows["newbie"]["restarts"] == 0 and rows["newbie"]["cycle"] >= 4
    assert {row["state"] for row in rows.values()} == {"stopped"}
    assert d.query("SELECT command_id FROM actions WHERE status IN ('started', 'in_doubt')") == []
