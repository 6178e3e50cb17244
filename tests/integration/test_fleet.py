"""Worker supervision, in-process, on the virtual clock: crash -> backoff with jitter, restart
intensity -> quarantine and back, hung cycles, restart policies, the `status` view of it all, and
config errors that stop the daemon before it writes anything.

Every run is a real Daemon (`horizon="day"`, `simulate=True`) with a TOML config written here and
workers from tests/fleet_workers.py; the tests read what it recorded from its SQLite file.
"""

from __future__ import annotations

import itertools
import json
import os
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from supervisor.config import load_config
from supervisor.errors import ConfigError
from supervisor.runtime.daemon import Daemon

ROOT = Path(__file__).resolve().parents[2]
START = datetime(2026, 1, 5, tzinfo=UTC)
EPS = 1e-6

HEADER = """
[daemon]
fleet = "t"
seed = 7

[horizons.day]
cycle_every = "{cycle_every}"
run_length = "{run_length}"
max_actions = 100000
max_cost = 100000
"""


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def _worker(name: str, cls: str, **fields: Any) -> str:
    lines = ["[[workers]]", f"name = {_toml_str(name)}", f"class = {_toml_str(cls)}"]
    for key, value in fields.items():
        if isinstance(value, str) and not value.startswith("{"):
            lines.append(f"{key} = {_toml_str(value)}")
        else:  # numbers, booleans and inline tables written by the caller
            lines.append(f"{key} = {str(value).lower() if isinstance(value, bool) else value}")
    return "\n".join(lines) + "\n"


def _params(**values: Any) -> str:
    return "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in values.items()) + " }"


class Run:
    """One daemon run on the virtual clock and what it left in its store."""

    def __init__(self, tmp_path: Path, workers: str, *, cycle_every: str = "10s",
                 run_length: str = "2h") -> None:  # fmt: skip
        self.dir = tmp_path
        self.state = tmp_path / "state"
        self.db = tmp_path / "state" / "store.db"
        self.db_url = f"sqlite:///{self.db}"
        self.config_path = tmp_path / "fleet.toml"
        self.config_path.write_text(
            HEADER.format(cycle_every=cycle_every, run_length=run_length) + workers
        )
        self.daemon: Daemon | None = None

    def daemon_for(self) -> Daemon:
        config = load_config(self.config_path, env={}, db=self.db_url, state_dir=self.state)
        return Daemon(config, horizon="day", simulate=True, start=START, env={},
                      install_signals=False)  # fmt: skip

    async def run(self) -> Run:
        self.daemon = self.daemon_for()
        await self.daemon.run()
        return self

    def status(self, name: str) -> Any:
        assert self.daemon is not None and self.daemon.fleet is not None
        return self.daemon.fleet.status[name]

    def query(self, sql: str, *args: Any) -> list[sqlite3.Row]:
        conn = sqlite3.connect(self.db)
        conn.row_factory = sqlite3.Row
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()

    def events(self, worker: str, *kinds: str) -> list[dict[str, Any]]:
        rows = self.query(
            "SELECT kind, reason, payload, created_at FROM events WHERE worker = ? "
            "ORDER BY created_at, id",
            worker,
        )
        out = [
            {"kind": r["kind"], "reason": r["reason"], "payload": json.loads(r["payload"]),
             "at": datetime.fromisoformat(r["created_at"])}
            for r in rows
        ]  # fmt: skip
        return [e for e in out if not kinds or e["kind"] in kinds]

    def actions(self, worker: str) -> list[sqlite3.Row]:
        return self.query("SELECT * FROM actions WHERE worker = ? ORDER BY started_at", worker)


def backoff_delays(events: list[dict[str, Any]]) -> list[float]:
    """Virtual seconds from each WORKER_CRASHED to the WORKER_RESTARTED that follows it."""
    delays: list[float] = []
    crashed_at: datetime | None = None
    for e in events:
        if e["kind"] == "WORKER_CRASHED":
            assert crashed_at is None, "two crashes without a restart between them"
            crashed_at = e["at"]
        elif e["kind"] == "WORKER_RESTARTED":
            assert crashed_at is not None, "a restart without a crash before it"
            delays.append((e["at"] - crashed_at).total_seconds())
            crashed_at = None
    return delays


def assert_jittered(delay: float, nominal: float) -> None:
    assert nominal * 0.5 - EPS <= delay <= nominal + EPS, (
        f"delay {delay:.3f}s outside the jitter range of {nominal}s (0.5-1.0 x nominal)"
    )


# -- backoff ------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_backoff_grows_to_its_max_with_jitter_and_resets_after_a_stable_period(
    tmp_path: Path,
) -> None:
    # 5 crashes (nominal delays 10, 20, 40, 80, 80: doubling, capped), then 40 good cycles of 10 s
    # (past stable_after = 5 min), then 3 crashes: the backoff starts again at 10 s.
    plan = "CCCCC" + "." * 40 + "CCC"
    run = await Run(tmp_path, _worker(
        "flaky", "tests.fleet_workers:Scripted", restart="permanent",
        backoff='{ initial = "10s", max = "80s", multiplier = 2 }',
        stable_after="5m", max_restarts=100, restart_window="1h",
        params=_params(plan=plan, counter=str(tmp_path / "flaky.count"), act=True),
    )).run()  # fmt: skip

    events = run.events("flaky", "WORKER_CRASHED", "WORKER_RESTARTED", "WORKER_QUARANTINED")
    assert [e["kind"] for e in events].count("WORKER_CRASHED") == 8
    assert not [e for e in events if e["kind"] == "WORKER_QUARANTINED"]
    delays = backoff_delays(events)
    assert len(delays) == 8
    nominal = [10, 20, 40, 80, 80, 10, 20, 40]
    for delay, want in zip(delays, nominal, strict=True):
        assert_jittered(delay, want)
    # the jitter is real: not every delay is its nominal value
    assert any(abs(d - n) > 0.01 for d, n in zip(delays, nominal, strict=True))
    # never a tight loop: every restart waited at least half the initial delay
    assert min(delays) >= 5 - EPS

    # the good cycles between the two bursts ran, and their actions went through the gate
    assert len([a for a in run.actions("flaky") if a["status"] == "succeeded"]) >= 40
    st = run.status("flaky")
    assert (st.crashes, st.restarts, st.hangs) == (8, 8, 0)
    assert st.last_error == f"RuntimeError: scripted crash at attempt {len(plan) - 1}"


@pytest.mark.anyio
async def test_restart_skips_the_slots_missed_while_backing_off(tmp_path: Path) -> None:
    # cycle every 10 s, backoff 10-80 s: after each restart the next cycle is the next slot,
    # never a burst of the slots that passed meanwhile.
    run = await Run(tmp_path, _worker(
        "flaky", "tests.fleet_workers:Scripted",
        backoff='{ initial = "60s", max = "60s" }', max_restarts=100,
        params=_params(plan="CC", counter=str(tmp_path / "c"), act=True),
    ), run_length="1h").run()  # fmt: skip
    restarts = run.events("flaky", "WORKER_RESTARTED")
    assert len(restarts) == 2
    started = [datetime.fromisoformat(a["started_at"]) for a in run.actions("flaky")]
    # after the last restart: one cycle per 10 s slot, none before the restart, no two in a slot
    after = [t for t in started if t >= restarts[-1]["at"]]
    assert after, "the worker never cycled again after its restart"
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(after)]
    assert all(abs(g - 10) < 1 for g in gaps), gaps
    assert (after[0] - restarts[-1]["at"]).total_seconds() < 10


# -- quarantine ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_worker_that_always_crashes_is_quarantined_then_comes_back(tmp_path: Path) -> None:
    observed = tmp_path / "observed.jsonl"
    workers = _worker(
        "crashy", "tests.fleet_workers:AlwaysCrash",
        backoff='{ initial = "10s", max = "40s" }', max_restarts=3, restart_window="10m",
        quarantine_for="30m",
    ) + _worker("observer", "tests.fleet_workers:Observer", cycle_every="1m",
                params=_params(log=str(observed)))  # fmt: skip
    run = await Run(tmp_path, workers, run_length="2h").run()

    events = run.events("crashy", "WORKER_CRASHED", "WORKER_RESTARTED", "WORKER_QUARANTINED")
    kinds = [e["kind"] for e in events]
    first_q = kinds.index("WORKER_QUARANTINED")
    # max_restarts = 3 within the window: the 4th crash quarantines instead of restarting
    assert kinds[:first_q] == ["WORKER_CRASHED", "WORKER_RESTARTED"] * 3 + ["WORKER_CRASHED"]
    quarantined = events[first_q]
    assert quarantined["reason"] == "restarts"
    assert quarantined["payload"]["cool_down"] == 1800.0
    assert quarantined["payload"]["last_error"].startswith("RuntimeError: boom")

    # it comes back after the cool-down, exactly, and goes on crashing (and backing off)
    back = events[first_q + 1]
    assert back["kind"] == "WORKER_RESTARTED"
    assert back["at"] - quarantined["at"] == timedelta(minutes=30)
    assert events[first_q + 2]["kind"] == "WORKER_CRASHED"
    assert kinds.count("WORKER_QUARANTINED") >= 2  # and is quarantined again: it never heals
    # the 2 h run ends during the last cool-down: no restart is recorded on the way out
    assert kinds[-1] == "WORKER_QUARANTINED"
    assert events[-1]["at"] + timedelta(minutes=30) > START + timedelta(hours=2)

    # never a tight loop: outside the quarantines every restart waited >= 5 s (0.5 x initial)
    gaps = []
    for prev, nxt in itertools.pairwise(events):
        if prev["kind"] == "WORKER_CRASHED" and nxt["kind"] == "WORKER_RESTARTED":
            gaps.append((nxt["at"] - prev["at"]).total_seconds())
    assert gaps and min(gaps) >= 5 - EPS
    # delays after a quarantine start again from the initial backoff
    assert_jittered((events[first_q + 3]["at"] - events[first_q + 2]["at"]).total_seconds(), 10)

    # the fleet status (the workers table `status` shows) said "quarantined" during the cool-down
    samples = [json.loads(line) for line in observed.read_text().splitlines()]
    during = [s for s in samples
              if quarantined["at"] < datetime.fromisoformat(s["at"]) < back["at"]]  # fmt: skip
    assert len(during) >= 25
    assert {s["workers"]["crashy"]["state"] for s in during} == {"quarantined"}
    after = [
        s for s in samples if datetime.fromisoformat(s["at"]) > back["at"] + timedelta(minutes=1)
    ]
    assert {s["workers"]["crashy"]["state"] for s in after} - {"quarantined"}

    st = run.status("crashy")
    assert st.crashes == kinds.count("WORKER_CRASHED")
    assert st.restarts == kinds.count("WORKER_RESTARTED")
    assert st.state == "stopped"  # the horizon ended
    # the observer itself was never disturbed
    assert run.status("observer").restarts == 0


# -- hangs --------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_hung_cycle_is_detected_counted_and_restarted(tmp_path: Path) -> None:
    # The cycle deadline is real seconds, even on the virtual clock: keep it short.
    run = await Run(tmp_path, _worker(
        "hanger", "tests.fleet_workers:Scripted", cycle_deadline="200ms",
        backoff='{ initial = "5s", max = "5s" }',
        params=_params(plan="HH", counter=str(tmp_path / "h"), act=True),
    ), run_length="1h").run()  # fmt: skip

    crashes = run.events("hanger", "WORKER_CRASHED")
    assert [e["reason"] for e in crashes] == ["hang", "hang"]
    assert crashes[0]["payload"]["error"].startswith("hung: cycle 0 passed its 0.2s deadline")
    assert len(run.events("hanger", "WORKER_RESTARTED")) == 2
    st = run.status("hanger")
    assert (st.hangs, st.crashes, st.restarts) == (2, 2, 2)
    assert st.last_error is not None and st.last_error.startswith("hung:")
    # restarted: it goes on cycling and its actions run
    done = [a for a in run.actions("hanger") if a["status"] == "succeeded"]
    assert len(done) > 300  # an hour of 10 s cycles, less the two hangs and their backoff


@pytest.mark.anyio
async def test_a_workers_own_timeout_error_is_a_crash_not_a_hang(tmp_path: Path) -> None:
    run = await Run(tmp_path, _worker(
        "caller", "tests.fleet_workers:Scripted", cycle_deadline="30s",
        params=_params(plan="T", counter=str(tmp_path / "t")),
    ), run_length="10m").run()  # fmt: skip
    crashes = run.events("caller", "WORKER_CRASHED")
    assert [e["reason"] for e in crashes] == ["crash"]
    assert crashes[0]["payload"]["error"] == "TimeoutError: upstream call timed out"
    st = run.status("caller")
    assert (st.hangs, st.crashes, st.restarts) == (0, 1, 1)


@pytest.mark.anyio
async def test_only_the_gates_answers_are_governed_other_project_errors_are_crashes(
    tmp_path: Path,
) -> None:
    """GovernedRefusal is the one test: a refusal ends the cycle governed (no crash, no
    restart); any other error of the project escaping a cycle is a worker bug, counted."""
    run = await Run(tmp_path, _worker(
        "caller", "tests.fleet_workers:Scripted", cycle_deadline="30s",
        params=_params(plan="DN", counter=str(tmp_path / "t")),
    ), run_length="10m").run()  # fmt: skip
    crashes = run.events("caller", "WORKER_CRASHED")
    assert [e["payload"]["error"] for e in crashes] == ["NotFound: no in-doubt action 'x'"]
    st = run.status("caller")
    assert (st.crashes, st.restarts) == (1, 1)


# -- restart policies ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_restart_policies(tmp_path: Path) -> None:
    workers = "".join(
        _worker(policy, "tests.fleet_workers:Scripted", restart=policy,
                params=_params(plan="C", counter=str(tmp_path / policy), act=True))
        for policy in ("temporary", "transient", "permanent")
    )  # fmt: skip
    run = await Run(tmp_path, workers, run_length="30m").run()

    # temporary: stops after its first crash; never restarted, never cycles again
    assert len(run.events("temporary", "WORKER_CRASHED")) == 1
    assert run.events("temporary", "WORKER_RESTARTED") == []
    assert run.actions("temporary") == []
    assert (tmp_path / "temporary").read_text() == "1"  # one attempt, ever
    st = run.status("temporary")
    assert (st.state, st.restarts, st.crashes) == ("stopped", 0, 1)

    # transient and permanent: restarted after the crash (in the cycle model every crash is an
    # abnormal exit, so the two behave the same)
    for policy in ("transient", "permanent"):
        assert len(run.events(policy, "WORKER_CRASHED")) == 1
        assert len(run.events(policy, "WORKER_RESTARTED")) == 1
        assert len(run.actions(policy)) > 100
        assert run.status(policy).restarts == 1

    rows = {r["name"]: r for r in run.query("SELECT * FROM workers")}
    assert rows["temporary"]["state"] == "stopped" and rows["temporary"]["restarts"] == 0
    assert rows["transient"]["restarts"] == rows["permanent"]["restarts"] == 1


# -- the status CLI -----------------------------------------------------------------------------


def _cli(run: Run, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACP_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "supervisor", "--config", str(run.config_path), "--db", run.db_url,
         "--state-dir", str(run.state), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.mark.anyio
async def test_status_json_after_a_run_shows_each_worker(tmp_path: Path) -> None:
    workers = _worker(
        "flaky", "tests.fleet_workers:Scripted", backoff='{ initial = "10s", max = "20s" }',
        params=_params(plan="CC", counter=str(tmp_path / "f"), act=True),
    ) + _worker("ticker", "tests.fleet_workers:Ticker") + _worker(
        "gone", "tests.fleet_workers:Scripted", restart="temporary",
        params=_params(plan="C", counter=str(tmp_path / "g")),
    )  # fmt: skip
    run = await Run(tmp_path, workers, run_length="1h").run()

    done = _cli(run, "status", "--json")
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["fleet"] == "t"
    rows = {w["name"]: w for w in status["workers"]}
    assert set(rows) == {"flaky", "ticker", "gone"}
    for name, row in rows.items():
        st = run.status(name).as_dict()
        for key in ("state", "restarts", "last_error", "cycle"):
            assert row[key] == st[key], (name, key, row[key], st[key])
    assert rows["flaky"]["restarts"] == 2
    assert rows["flaky"]["last_error"] == "RuntimeError: scripted crash at attempt 1"
    assert rows["flaky"]["cycle"] > 300
    assert rows["ticker"]["restarts"] == 0 and rows["ticker"]["last_error"] is None
    assert rows["ticker"]["cycle"] == 359  # 1 h of 10 s cycles: 0..359
    assert rows["gone"]["restarts"] == 0 and rows["gone"]["cycle"] == 0
    assert rows["gone"]["last_error"] == "RuntimeError: scripted crash at attempt 0"
    assert {row["state"] for row in rows.values()} == {"stopped"}  # the horizon is over
    assert status["open_windows"] == []
    assert status["actions"].get("in_doubt", 0) == 0


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"class": "tests.fleet_workers:NoSuchWorker"}, "has no class 'NoSuchWorker'"),
        ({"class": "tests.no_such_module:Worker"}, "cannot import 'tests.no_such_module'"),
        ({"class": "tests.fleet_workers:NotAWorker"}, "does not implement the worker API"),
        ({"class": "tests.fleet_workers:Ticker", "replicas": 0}, "replicas must be >= 1"),
        (
            {"class": "tests.fleet_workers:Ticker", "backoff": '{ initial = "1m", max = "10s" }'},
            "backoff max (10.0s) is below its initial (60.0s)",
        ),
    ],
    ids=["missing-class", "missing-module", "not-a-worker", "replicas-0", "backoff-max-below"],
)
async def test_bad_worker_config_is_refused_before_anything_is_written(
    tmp_path: Path, fields: dict[str, Any], message: str
) -> None:
    cls = fields.pop("class")
    workers = _worker("ok", "tests.fleet_workers:Ticker") + _worker("bad", cls, **fields)
    run = Run(tmp_path, workers)
    with pytest.raises(ConfigError) as caught:
        await run.run()
    text = str(caught.value)
    assert "worker 'bad'" in text
    assert message in text
    assert not run.state.exists(), "the daemon wrote something before refusing its config"


@pytest.mark.anyio
async def test_a_worker_that_cannot_be_built_is_quarantined_and_the_others_run(
    tmp_path: Path,
) -> None:
    workers = _worker("broken", "tests.fleet_workers:BrokenInit", quarantine_for="30m") + _worker(
        "steady", "workers.support:SupportAgent"
    )
    run = await Run(tmp_path, workers).run()
    broken = run.status("broken")
    assert broken.state == "quarantined" and "cannot connect" in (broken.last_error or "")
    assert broken.restarts >= 3  # tried again after each cool-down over the 2 h run
    assert run.actions("steady"), "one broken worker must not stop the others"


@pytest.mark.anyio
async def test_a_failed_state_write_raises_the_state_write_failed_alert(tmp_path: Path) -> None:
    """The StoreError path of a cycle is an alert, not only a log line (a disk-full run)."""
    run = await Run(tmp_path, _worker("full", "tests.fleet_workers:DiskFull", max_restarts=100),
                    run_length="10m").run()  # fmt: skip
    alerts = run.query("SELECT reason, payload FROM events WHERE kind = 'ALERT'")
    raised = [json.loads(a["payload"]) for a in alerts if a["reason"] == "state_write_failed"]
    assert raised, "no state_write_failed alert"
    assert raised[0]["worker"] == "full" and "disk is full" in raised[0]["error"]
    assert run.status("full").last_error.startswith("state write failed")
