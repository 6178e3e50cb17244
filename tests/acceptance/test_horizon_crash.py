"""Promise 7 over a simulated day: kill -9 the real daemon at a random instant of a horizon run,
start it again with the same arguments, and check that the day still comes out whole.

`run --horizon day --simulate --start 2026-11-01T00:00:00Z --seed 3` with ten support agents (960
cycles, about 800 effects) and the nightly maintenance agent. The kill point is drawn from a seeded
random: an instant of simulated time, read from the effect log as the run goes. The same run
without a kill, beside it in another state directory, is the reference.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from supervisor import events as ev
from supervisor.ops.scorecard import FIELDS
from tests.waiting import eventually_sync

pytestmark = pytest.mark.acceptance

ROOT = Path(__file__).resolve().parents[2]
FLEET = "crashday"
REPLICAS = 10
START = datetime(2026, 11, 1, tzinfo=UTC)
DAY = timedelta(days=1)
SEED = 3
# The kill point's seed; set HORIZON_CRASH_SEED to try other instants (the run's seed stays 3).
KILL_SEED = int(os.environ.get("HORIZON_CRASH_SEED", SEED))
CONFIG = f"""
[daemon]
fleet = "{FLEET}"

[[workers]]
name = "support"
class = "workers.support:SupportAgent"
replicas = {REPLICAS}

[[workers]]
name = "maintenance"
class = "workers.maintenance:MaintenanceAgent"
schedule = "0 3 * * *"
"""
RUN = ("run", "--horizon", "day", "--simulate", "--start", START.isoformat(), "--seed", str(SEED),
       "--json")  # fmt: skip


# -- a small harness: the real CLI in a state directory of its own --------------------------------


@dataclass
class Place:
    folder: Path

    @property
    def state(self) -> Path:
        return self.folder / "state"

    @property
    def run_dir(self) -> Path:
        """The run's own folder (a killed run, started again, resumes in the same one)."""
        runs = sorted((self.state / "simulations").glob("*/run.json"))
        assert len(runs) <= 1, runs
        return runs[0].parent if runs else self.state / "simulations" / "not-yet"

    @property
    def db(self) -> Path:
        return self.run_dir / "simulate.db"

    @property
    def effects_file(self) -> Path:
        return self.run_dir / "effects.jsonl"

    def argv(self, *args: str, db: bool = False) -> list[str]:
        extra = ["--db", f"sqlite:///{self.db}"] if db else []
        return [sys.executable, "-m", "supervisor", "--config", str(self.folder / "c.toml"),
                "--state-dir", str(self.state), *extra, *args]  # fmt: skip

    def start(self, *args: str) -> subprocess.Popen[str]:
        (self.folder / "c.toml").write_text(CONFIG)
        with open(self.folder / "daemon.log", "a") as log:  # the child keeps its own copy
            return subprocess.Popen(self.argv(*args), cwd=self.folder, env=_env(), text=True,
                                    stdout=subprocess.PIPE, stderr=log)  # fmt: skip

    def cli(self, *args: str) -> Any:
        done = subprocess.run(self.argv(*args, db=True), cwd=self.folder, env=_env(), text=True,
                              capture_output=True, timeout=60)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        assert "Traceback" not in done.stderr
        return json.loads(done.stdout)

    def effects(self) -> list[dict[str, Any]]:
        if not self.effects_file.exists():
            return []
        return [json.loads(line) for line in self.effects_file.read_text().splitlines() if line]

    def sql(self, query: str, *args: Any) -> list[tuple[Any, ...]]:
        con = sqlite3.connect(self.db)
        try:
            return list(con.execute(query, args))
        finally:
            con.close()


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACP_") and k != "NOTIFY_SOCKET"}
    env["PYTHONPATH"] = str(ROOT)
    return env


def finish(proc: subprocess.Popen[str], timeout: float = 180) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}"
    card: dict[str, Any] = json.loads(out)
    return card


def last_effect_at(place: Place) -> datetime | None:
    """The simulated time of the latest effect in the log (read from its end, cheaply)."""
    try:
        with open(place.effects_file, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 4096))
            lines = f.read().splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        try:
            return datetime.fromisoformat(json.loads(line)["at"])
        except (ValueError, KeyError):
            continue  # a partial first line of the tail
    return None


# -- the test ---------------------------------------------------------------------------------------


def test_kill_9_mid_day_then_restart_loses_and_repeats_nothing(tmp_path: Path) -> None:
    rng = random.Random(KILL_SEED)
    kill_at = START + DAY * rng.uniform(0.1, 0.9)  # an instant of simulated time
    jitter = rng.uniform(0.0, 0.05)  # and a real-time offset after it, to land mid-action

    crashed, clean = Place(tmp_path / "crashed"), Place(tmp_path / "clean")
    crashed.folder.mkdir()
    clean.folder.mkdir()
    reference = clean.start(*RUN)  # the uninterrupted run, side by side
    victim = crashed.start(*RUN)

    def at_the_kill_point() -> bool:
        at = last_effect_at(crashed)
        return at is not None and at >= kill_at

    def ended() -> str | None:
        if victim.poll() is None:
            return None
        return "the run ended before the kill point (make it longer)"

    try:
        # Polled often: the kill is to land near its instant of simulated time.
        eventually_sync(at_the_kill_point, f"the run's progress to {kill_at}", within=120,
                        every=0.01, abort=ended)  # fmt: skip
        time.sleep(jitter)  # a random real-time offset past it, to land mid-action
        victim.send_signal(signal.SIGKILL)
        assert victim.wait(timeout=10) == -signal.SIGKILL
        effects_at_kill = len(crashed.effects())

        again = crashed.start(*RUN)  # the same arguments: the unfinished run is resumed
        card = finish(again)
        clean_card = finish(reference)
    finally:
        for proc in (victim, reference):
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    assert 0 < effects_at_kill < len(crashed.effects())
    resumed = (crashed.folder / "daemon.log").read_text()
    assert "run.resumed" in resumed and "worker.resumed" in resumed

    # windows: each of the day's 24 opened and closed exactly once, none left open
    sessions = crashed.sql("SELECT id, window_key, starts_at, ends_at, status FROM sessions")
    assert len(sessions) == 24
    assert {s[4] for s in sessions} == {"closed"}
    for kind in (ev.WINDOW_OPENED, ev.WINDOW_CLOSED):
        per_session = Counter(r[0] for r in crashed.sql(
            "SELECT session_id FROM events WHERE kind = ?", kind))  # fmt: skip
        assert per_session == Counter({s[0]: 1 for s in sessions}), kind
    runs = crashed.sql("SELECT status FROM runs")
    assert runs == [("finished",)]

    # no effect repeated, none without a started record, each inside its window
    effects = crashed.effects()
    ids = [e["command_id"] for e in effects]
    assert len(ids) == len(set(ids)), "an effect ran twice"
    started = {r[0] for r in crashed.sql(
        "SELECT command_id FROM events WHERE kind = ?", ev.ACTION_STARTED)}  # fmt: skip
    assert set(ids) <= started, "an effect without a durable started record"
    bounds = {s[0]: (datetime.fromisoformat(s[2]), datetime.fromisoformat(s[3])) for s in sessions}
    for e in effects:
        begin, end = bounds[e["session"]]
        assert begin <= datetime.fromisoformat(e["at"]) < end, e

    # the scorecard agrees with the events table
    assert (
        crashed.cli("scorecard", "--json")["total"] == card["total"] == totals_from_table(crashed)
    )

    # every cycle slot completed exactly once per worker
    cycles = crashed.sql("SELECT worker, payload FROM events WHERE kind = ?", ev.CYCLE_COMPLETED)
    per_worker: dict[str, list[int]] = {}
    for worker, payload in cycles:
        per_worker.setdefault(worker, []).append(json.loads(payload)["cycle"])
    support = {f"support-{i}" for i in range(1, REPLICAS + 1)}
    assert set(per_worker) == support | {"maintenance"}
    for name in support:
        assert sorted(per_worker[name]) == list(range(96)), name
    assert per_worker["maintenance"] == [0]
    assert card["total"]["cycles"] == clean_card["total"]["cycles"] == REPLICAS * 96 + 1

    # against the uninterrupted run: the same actions succeeded, except an action the kill left
    # without an outcome (in doubt: its effect may or may not have happened; never re-run)
    def succeeded(place: Place) -> set[str]:
        return {r[0] for r in place.sql(
            "SELECT command_id FROM events WHERE kind = ?", ev.ACTION_SUCCEEDED)}  # fmt: skip

    ok_crashed, ok_clean = succeeded(crashed), succeeded(clean)
    unfinished_rows = crashed.sql(
        "SELECT command_id, worker, started_at FROM actions WHERE status IN ('started', 'in_doubt')"
    )
    unfinished = {r[0] for r in unfinished_rows}
    print(
        f"killed at {kill_at:%H:%M} simulated, after {effects_at_kill} effects;"
        f" in doubt: {len(unfinished)}; effects {len(ids)} of {len(clean_ids_all(clean))}"
    )
    assert ok_crashed <= ok_clean
    assert ok_clean - ok_crashed == unfinished
    # A worker has one action in flight at most. Several workers can each have one: on the
    # virtual clock the slot's workers wake at one instant and their started records share a
    # group commit, so a kill after that COMMIT can leave each of them started, in doubt.
    # And all of one slot: time moves on only once every task of a slot waits for the clock.
    per_worker_unfinished = Counter(r[1] for r in unfinished_rows)
    assert all(n == 1 for n in per_worker_unfinished.values()), per_worker_unfinished
    assert len({r[2] for r in unfinished_rows}) <= 1, unfinished_rows
    clean_ids = {e["command_id"] for e in clean.effects()}
    assert set(ids) <= clean_ids and clean_ids - set(ids) <= unfinished
    if not unfinished:
        assert ok_crashed == ok_clean and set(ids) == clean_ids


def clean_ids_all(place: Place) -> set[str]:
    return {e["command_id"] for e in place.effects()}


def totals_from_table(place: Place) -> dict[str, int]:
    by_kind: Counter[str] = Counter()
    for kind, reason, n in place.sql("SELECT kind, reason, count(*) FROM events GROUP BY 1, 2"):
        if not (kind == ev.RECOVERY and reason == "clean"):
            by_kind[kind] += n
    return {name: by_kind.get(kind, 0) for name, kind in FIELDS.items()}
