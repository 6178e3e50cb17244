"""Horizon runs on the virtual clock, in process: windows, cycles, checkpoints, the scorecard,
DST days, determinism, missed windows, the cron worker, and the operator CLI over the result.

Each run is `Daemon(load_config(...), horizon=..., simulate=True, start=...).run()` on a fresh
SQLite file (one on Postgres), then the store is read back and checked against the horizon table
in DESIGN.md.
"""

from __future__ import annotations

import itertools
import json
import os
import sqlite3
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import anyio
import pytest

from supervisor import events as ev
from supervisor.config import Config, default_config_text, load_config
from supervisor.ops.scorecard import FIELDS, Scorecard, compute
from supervisor.runtime.checkpoints import Checkpoints
from supervisor.runtime.daemon import Daemon
from supervisor.store import Event, Session, open_store, system_stream
from supervisor.timing.clock import SystemClock, VirtualClock
from supervisor.timing.sessions import WindowManager

pytestmark = pytest.mark.anyio

FLEET = "default"
NOV1 = datetime(2026, 11, 1, tzinfo=UTC)
H = timedelta(hours=1)

# name: (run length, cycle every, windows, cycles, checkpoint every)
PROFILES: dict[str, tuple[timedelta, timedelta, int, int, int]] = {
    "hour": (H, timedelta(minutes=5), 1, 12, 6),
    "day": (24 * H, timedelta(minutes=15), 24, 96, 12),
    "week": (7 * 24 * H, timedelta(minutes=30), 7, 336, 24),
    "month": (30 * 24 * H, H, 30, 720, 24),
}


# -- helpers ------------------------------------------------------------------------------------


def make_config(
    folder: Path, *, db: str | None = None, timezone: str = "UTC", text: str | None = None
) -> Config:
    """The built-in default config (support + nightly maintenance) in `folder`, own SQLite file."""
    folder.mkdir(parents=True, exist_ok=True)
    body = text if text is not None else default_config_text()
    body = body.replace('timezone = "UTC"', f'timezone = "{timezone}"')
    path = folder / "supervisor.toml"
    path.write_text(body)
    # WAL with synchronous=normal: no fsync per commit (these tests are about time, not power loss)
    lite = f"sqlite:///{folder / 'store.db'}?synchronous=normal"
    return load_config(path, env={}, db=db or lite, state_dir=folder / "state")


async def simulate(
    config: Config, horizon: str, start: datetime | None, seed: int | None = None,
    *, side_by_side: bool = True,
) -> Scorecard:  # fmt: skip
    daemon = Daemon(config, horizon=horizon, simulate=True, start=start, seed=seed, env={},
                    install_signals=False, side_by_side=side_by_side)  # fmt: skip
    card = await daemon.run()
    assert card is not None
    return card


@dataclass
class Recorded:
    sessions: list[Session]  # by start
    events: list[Event]  # window streams in window order, then the system stream
    card: Scorecard
    checkpoints: list[Any]

    def of(self, kind: str, worker: str | None = None) -> list[Event]:
        return [e for e in self.events if e.kind == kind and (worker is None or e.worker == worker)]

    def session(self, session_id: str) -> Session:
        return next(s for s in self.sessions if s.id == session_id)


async def read_back(db_url: str) -> Recorded:
    store = await open_store(db_url, SystemClock())
    try:
        sessions = sorted(await store.list_sessions(FLEET, 100_000), key=lambda s: s.starts_at)
        events: list[Event] = []
        for s in sessions:
            events += await store.replay(s.id, 0, 1_000_000)
        events += await store.replay(system_stream(FLEET), 0, 1_000_000)
        card = await compute(store, FLEET)
        checkpoints = await Checkpoints(store, FLEET).list(100_000)
    finally:
        await store.close()
    return Recorded(sessions, events, card, checkpoints)


async def raw_counts(db_url: str) -> Counter[tuple[str, str | None]]:
    """(kind, reason) -> count, straight from the events table with plain SQL."""
    sql = "SELECT kind, reason, count(*) FROM events GROUP BY kind, reason"
    if db_url.startswith("sqlite:///"):
        con = sqlite3.connect(db_url.removeprefix("sqlite:///").split("?")[0])
        try:
            return Counter({(k, r): n for k, r, n in con.execute(sql)})
        finally:
            con.close()
    import asyncpg

    conn = await asyncpg.connect(db_url)
    try:
        return Counter({(k, r): n for k, r, n in await conn.fetch(sql)})
    finally:
        await conn.close()


def expected_totals(counts: Counter[tuple[str, str | None]]) -> dict[str, int]:
    by_kind: Counter[str] = Counter()
    for (kind, reason), n in counts.items():
        if kind == ev.RECOVERY and reason == "clean":
            continue  # the scorecard counts scans that repaired something
        by_kind[kind] += n
    return {name: by_kind.get(kind, 0) for name, kind in FIELDS.items()}


def assert_windows_once(
    rec: Recorded, n: int, length: timedelta | None = None, *, tiled: bool = True
) -> None:
    windows = [s for s in rec.sessions if s.status != "missed"]
    assert len(windows) == n
    opened = Counter(e.session_id for e in rec.of(ev.WINDOW_OPENED))
    closed = Counter(e.session_id for e in rec.of(ev.WINDOW_CLOSED))
    for s in windows:
        assert (opened[s.id], closed[s.id], s.status) == (1, 1, "closed"), s.window_key
        if length is not None:
            assert s.ends_at - s.starts_at == length, s.window_key
    assert sum(opened.values()) == sum(closed.values()) == n
    for a, b in itertools.pairwise(windows):
        assert a.ends_at == b.starts_at or not tiled  # windows tile the run


def assert_cycles(rec: Recorded, worker: str, anchor: datetime, every: timedelta, n: int,
                  first: int = 0) -> None:  # fmt: skip
    done = rec.of(ev.CYCLE_COMPLETED, worker)
    cycles = [e.payload["cycle"] for e in done]
    assert sorted(cycles) == list(range(first, first + n))  # each slot exactly once
    for e in done:
        at = anchor + every * (e.payload["cycle"] - first)
        assert e.created_at == at
        s = rec.session(e.session_id)
        assert s.starts_at <= e.created_at < s.ends_at


def assert_checkpoints(
    rec: Recorded, worker: str, every: int, n_cycles: int, first: int = 0
) -> None:
    want = [c for c in range(first, first + n_cycles) if c % every == every - 1]
    got = sorted(e.payload["cycle"] for e in rec.of(ev.CHECKPOINT, worker))
    assert got == want
    assert sorted(c.cycle for c in rec.checkpoints if c.worker == worker) == want


async def assert_scorecard_matches_table(rec: Recorded, db_url: str) -> None:
    counts = await raw_counts(db_url)
    assert rec.card.total == expected_totals(counts)
    # and per window: the scorecard's rows add up to the events of each window's stream
    for row in rec.card.windows:
        in_window = Counter(e.kind for e in rec.events if e.session_id == row["session_id"])
        for name, kind in FIELDS.items():
            if kind != ev.RECOVERY:
                assert row[name] == in_window.get(kind, 0), (row["window"], name)


def sequence(rec: Recorded) -> list[tuple[Any, ...]]:
    keys = {s.id: s.window_key for s in rec.sessions}
    return [(keys.get(e.session_id, e.session_id), e.seq, e.kind, e.reason, e.worker, e.payload,
             e.created_at) for e in rec.events]  # fmt: skip


def ids(rec: Recorded) -> list[tuple[Any, ...]]:
    return [(e.session_id, e.seq, e.command_id, e.correlation_id) for e in rec.events]


# -- the month ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def month(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Recorded, str]]:
    folder = tmp_path_factory.mktemp("month")
    config = make_config(folder)

    async def go() -> Recorded:
        await simulate(config, "month", NOV1, seed=1)
        return await read_back(config.db_url)

    yield anyio.run(go), config.db_url


def test_month_windows_cycles_and_checkpoints(month: tuple[Recorded, str]) -> None:
    rec, _url = month
    _length, every, n_windows, n_cycles, cp_every = PROFILES["month"]
    assert_windows_once(rec, n_windows)
    assert [s.window_key for s in rec.sessions][:2] == [
        "2026-11-01T00:00:00+00:00", "2026-11-02T00:00:00+00:00",
    ]  # fmt: skip
    assert rec.sessions[-1].ends_at == NOV1 + 30 * 24 * H
    assert len(rec.of(ev.CYCLE_COMPLETED, "support")) == 720
    assert_cycles(rec, "support", NOV1, every, n_cycles)
    assert_checkpoints(rec, "support", cp_every, n_cycles)
    assert len(rec.of(ev.CHECKPOINT, "support")) == 30
    assert len(rec.of(ev.RUN_STARTED)) == len(rec.of(ev.RUN_FINISHED)) == 1


def test_month_cron_worker_runs_once_a_night(month: tuple[Recorded, str]) -> None:
    rec, _url = month
    runs = rec.of(ev.CYCLE_COMPLETED, "maintenance")
    assert len(runs) == 30
    assert [e.created_at for e in runs] == [NOV1 + timedelta(days=d, hours=3) for d in range(30)]
    assert [e.payload["cycle"] for e in runs] == list(range(30))
    # each night asks for its three approvals once (nobody approves: they expire, deny by default)
    assert len(rec.of(ev.APPROVAL_REQUESTED, "maintenance")) == 90
    assert rec.card.total["expired"] == 90


async def test_month_scorecard_equals_counts_from_the_events_table(
    month: tuple[Recorded, str],
) -> None:
    rec, url = month
    await assert_scorecard_matches_table(rec, url)
    assert rec.card.total["cycles"] == 750  # 720 support + 30 maintenance
    assert rec.card.total["windows_opened"] == rec.card.total["windows_closed"] == 30
    assert rec.card.total["actions_started"] == rec.card.total["actions_succeeded"] > 0


# -- hour, day, week ----------------------------------------------------------------------------


@pytest.mark.parametrize("horizon", ["hour", "day", "week"])
async def test_horizon_profile(tmp_path: Path, horizon: str) -> None:
    length, every, n_windows, n_cycles, cp_every = PROFILES[horizon]
    config = make_config(tmp_path)
    card = await simulate(config, horizon, NOV1)
    rec = await read_back(config.db_url)
    assert_windows_once(rec, n_windows, length / n_windows)
    assert rec.sessions[0].starts_at == NOV1 and rec.sessions[-1].ends_at == NOV1 + length
    assert_cycles(rec, "support", NOV1, every, n_cycles)
    assert_checkpoints(rec, "support", cp_every, n_cycles)
    nights = {"hour": 0, "day": 1, "week": 7}[horizon]  # the 03:00 cron inside the run
    assert len(rec.of(ev.CYCLE_COMPLETED, "maintenance")) == nights
    await assert_scorecard_matches_table(rec, config.db_url)
    assert card.total == rec.card.total  # what the run printed is what the store says


async def test_day_on_postgres_matches_sqlite(tmp_path: Path, pg_url: str) -> None:
    """The same run on Postgres: same invariants, and the very same event sequence as SQLite
    with its workers one at a time, as on Postgres (whose waits end on the network's time, so
    it never runs them side by side): how workers side by side interleave within an instant
    is the event loop's, and what another task sees at that instant can differ (an alert
    resolved a minute later, say)."""
    _length, every, n_windows, n_cycles, cp_every = PROFILES["day"]
    pg = make_config(tmp_path / "pg", db=pg_url)
    await simulate(pg, "day", NOV1, seed=5)
    rec = await read_back(pg_url)
    assert_windows_once(rec, n_windows, H)
    assert_cycles(rec, "support", NOV1, every, n_cycles)
    assert_checkpoints(rec, "support", cp_every, n_cycles)
    await assert_scorecard_matches_table(rec, pg_url)

    lite = make_config(tmp_path / "lite")
    await simulate(lite, "day", NOV1, seed=5, side_by_side=False)
    rec_lite = await read_back(lite.db_url)
    assert sequence(rec) == sequence(rec_lite)
    assert ids(rec) == ids(rec_lite)


# -- daylight saving time -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "missing_or_doubled"),
    [
        # autumn: 02:00-03:00 local happens twice; the local date has 25 hourly windows
        ("2026-10-25T00:00:00+02:00", ["2026-10-25T02:00:00+02:00", "2026-10-25T02:00:00+01:00"]),
        # spring: 02:00-03:00 local does not exist; the local date has 23 hourly windows
        ("2026-03-29T00:00:00+01:00", []),
    ],
)
async def test_dst_day_is_one_local_calendar_day(
    tmp_path: Path, start: str, missing_or_doubled: list[str]
) -> None:
    """A `day` run covers one local calendar day: the 25-hour autumn date has 25 hourly windows
    (both 02:00s), the 23-hour spring date 23 (no 02:00). Cycles stay on the real 15-minute
    cadence from local midnight: 100 and 92."""
    berlin = ZoneInfo("Europe/Berlin")
    begin = datetime.fromisoformat(start)
    config = make_config(tmp_path, timezone="Europe/Berlin")
    await simulate(config, "day", begin)
    rec = await read_back(config.db_url)
    hours = 25 if missing_or_doubled else 23
    assert_windows_once(rec, hours, H)
    keys = [s.window_key for s in rec.sessions]
    assert keys[0] == start
    assert rec.sessions[-1].ends_at == begin + hours * H
    assert all(s.starts_at.astimezone(berlin).date() == begin.date() for s in rec.sessions)
    assert keys[-1].startswith(begin.date().isoformat() + "T23:00:00")
    if missing_or_doubled:  # autumn
        assert all(k in keys for k in missing_or_doubled)
    else:  # spring
        assert not [k for k in keys if k.startswith("2026-03-29T02:")]
    assert_cycles(rec, "support", begin.astimezone(UTC), timedelta(minutes=15), hours * 4)
    # the 03:00 local maintenance run happens once
    runs = rec.of(ev.CYCLE_COMPLETED, "maintenance")
    assert [e.created_at.astimezone(berlin).strftime("%H:%M") for e in runs] == ["03:00"]


# -- determinism --------------------------------------------------------------------------------


async def test_same_seed_same_sequence_other_seed_other_sequence(tmp_path: Path) -> None:
    recs = []
    for name, seed in (("a", 21), ("b", 21), ("c", 22)):
        config = make_config(tmp_path / name)
        await simulate(config, "day", NOV1, seed=seed)
        recs.append(await read_back(config.db_url))
    a, b, c = recs
    assert len(a.events) > 300
    assert sequence(a) == sequence(b)
    assert ids(a) == ids(b)  # session ids, command ids and correlation ids are derived too
    assert [s.id for s in a.sessions] == [s.id for s in b.sessions]
    assert sequence(a) != sequence(c)
    # and not only the seed in RUN_STARTED: the workers did something else
    in_windows = [e for e in sequence(a) if e[2] not in (ev.RUN_STARTED,)]
    assert in_windows != [e for e in sequence(c) if e[2] not in (ev.RUN_STARTED,)]
    denied = [{e.command_id for e in r.of(ev.ACTION_DENIED)} for r in (a, c)]
    assert denied[0] != denied[1]


# -- missed windows -----------------------------------------------------------------------------


async def test_downtime_records_missed_windows_and_opens_none(sqlite_url: str) -> None:
    clock = VirtualClock(datetime(2026, 11, 2, 9, 0, tzinfo=UTC))
    store = await open_store(sqlite_url, clock, migrate=True)
    try:
        windows = WindowManager(store, fleet=FLEET, length="hourly", tz=ZoneInfo("UTC"),
                                max_cost=None, max_actions=None, by="test")  # fmt: skip
        first = await windows.ensure(clock.now())
        assert first is not None and first.window_key == "2026-11-02T09:00:00+00:00"
        clock.advance(5 * H)  # the daemon was down from 09:xx to 14:00
        assert await windows.record_missed(clock.now()) == 4
        assert await windows.record_missed(clock.now()) == 0  # recorded once
        rec = await read_back(sqlite_url)
        missed = rec.of(ev.WINDOW_MISSED)
        assert [e.payload["key"] for e in missed] == [
            f"2026-11-02T{h}:00:00+00:00" for h in (10, 11, 12, 13)
        ]
        assert len(rec.of(ev.WINDOW_OPENED)) == 1  # none opened after the fact
        assert [s.status for s in rec.sessions] == ["open", "missed", "missed", "missed", "missed"]
        # the window for "now" opens next; the stale one is closed, the missed ones stay missed
        now_window = await windows.ensure(clock.now())
        assert now_window is not None and now_window.window_key == "2026-11-02T14:00:00+00:00"
        rec = await read_back(sqlite_url)
        assert [s.status for s in rec.sessions] == ["closed"] + ["missed"] * 4 + ["open"]
        assert len(rec.of(ev.WINDOW_OPENED)) == 2 and len(rec.of(ev.WINDOW_CLOSED)) == 1
    finally:
        await store.close()


# -- runs after runs: cycle numbering and cron coalescing ---------------------------------------


async def test_next_run_continues_cycles_and_coalesces_missed_cron_runs(tmp_path: Path) -> None:
    """A second day four days later: the support worker's cycle numbers go on (96..191, so its
    command ids are new) and fill the new day's slots; the maintenance runs missed in between
    (3 nights) are coalesced into one run at the start, then the 03:00 run."""
    config = make_config(tmp_path)
    await simulate(config, "day", NOV1)
    later = NOV1 + timedelta(days=4)
    await simulate(config, "day", later)
    rec = await read_back(config.db_url)
    assert_windows_once(rec, 48, H, tiled=False)
    second = [e for e in rec.events if e.created_at >= later]
    support = [e for e in second if e.kind == ev.CYCLE_COMPLETED and e.worker == "support"]
    assert sorted(e.payload["cycle"] for e in support) == list(range(96, 192))
    for e in support:
        assert e.created_at == later + timedelta(minutes=15) * (e.payload["cycle"] - 96)
    nightly = [e.created_at for e in second if e.kind == ev.CYCLE_COMPLETED
               and e.worker == "maintenance"]  # fmt: skip
    assert nightly == [later, later + 3 * H]
    started = [e.command_id for e in rec.of(ev.ACTION_STARTED)]
    assert len(started) == len(set(started))


# -- the operator CLI over a simulated run --------------------------------------------------------


ROOT = Path(__file__).resolve().parents[2]


class Cli:
    """The real command line, as a subprocess (the CLI configures logging once per process)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.state = folder / "state"
        self.db = f"sqlite:///{self.state / 'simulate.db'}"
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith("ACP_") and k != "NOTIFY_SOCKET"}  # fmt: skip
        self.env["PYTHONPATH"] = str(ROOT)

    def __call__(self, *argv: str, code: int = 0, with_db: bool = True) -> Any:
        args = [sys.executable, "-m", "supervisor", "--state-dir", str(self.state),
                *(["--db", self.db] if with_db else []), *argv]  # fmt: skip
        done = subprocess.run(args, cwd=self.folder, env=self.env, capture_output=True, text=True,
                              timeout=120)  # fmt: skip
        assert done.returncode == code, (argv, done.stdout[-2000:], done.stderr[-2000:])
        assert "Traceback" not in done.stderr
        if "--json" in argv and code == 0:
            return json.loads(done.stdout)
        return done.stdout + done.stderr


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path)


def test_checkpoint_restore_via_cli_and_next_run_resumes_from_it(cli: Cli) -> None:
    # --db names one database for both runs, so the second continues the first
    card = cli("run", "--horizon", "hour", "--simulate", "--start", "2026-11-01T00:00:00Z",
               "--json")  # fmt: skip
    assert card["total"]["cycles"] == 12
    cps = cli("checkpoints", "list", "--json")
    assert [(c["worker"], c["cycle"]) for c in cps] == [("support", 11), ("support", 5)]
    early = cps[1]
    said = cli("checkpoints", "restore", str(early["id"]), "--by", "me")
    assert "resumes from checkpoint" in said
    rollback = [e for e in cli("events", "replay", "--session", f"system:{FLEET}", "--json")
                if e["kind"] == ev.ROLLBACK]  # fmt: skip
    assert len(rollback) == 1
    assert rollback[0]["payload"]["checkpoint"] == early["id"]
    assert rollback[0]["payload"]["by"] == "me" and rollback[0]["worker"] == "support"

    effects_file = cli.state / "effects.jsonl"
    effects_before = effects_file.read_text().splitlines()
    cli("run", "--horizon", "hour", "--simulate", "--start", "2026-11-01T01:00:00Z", "--json")
    rec = anyio.run(read_back, cli.db)
    second = [e for e in rec.of(ev.CYCLE_COMPLETED, "support") if e.created_at >= NOV1 + H]
    # resumed from the checkpoint of cycle 5: cycles 6.. fill the new hour's 12 slots
    assert [e.payload["cycle"] for e in second] == list(range(6, 18))
    assert second[0].created_at == NOV1 + H
    # cycles 6..11 ran before: their actions replay the ledger, no effect runs twice
    effects = [json.loads(line) for line in effects_file.read_text().splitlines()]
    assert len(effects) > len(effects_before)
    assert len({e["command_id"] for e in effects}) == len(effects)
    assert not [e for e in effects[len(effects_before) :] if e["cycle"] < 12]
    # the resume point was used once: run 2 checkpointed on from cycle 6
    cps = cli("checkpoints", "list", "--json")
    assert [c["cycle"] for c in cps if c["worker"] == "support"] == [17, 11, 11, 5]


def test_sessions_events_and_scorecard_via_cli(cli: Cli) -> None:
    printed = cli("run", "--horizon", "day", "--simulate", "--start", "2026-11-01T00:00:00Z",
                  "--seed", "4", "--json")  # fmt: skip
    sessions = cli("sessions", "list", "--json")
    assert len(sessions) == 24
    assert [s["window_key"] for s in sessions] == sorted(
        (s["window_key"] for s in sessions), reverse=True
    )  # newest first
    assert {s["status"] for s in sessions} == {"closed"}
    busiest = max(sessions, key=lambda s: s["used_actions"])
    full = cli("events", "replay", "--session", busiest["id"], "--json")
    assert [e["seq"] for e in full] == list(range(1, len(full) + 1))
    kinds = [e["kind"] for e in full]
    assert kinds[0] == ev.WINDOW_OPENED and kinds.count(ev.WINDOW_CLOSED) == 1
    # cycle telemetry commits with the worker's next checkpoint, so it may follow the close
    assert set(kinds[kinds.index(ev.WINDOW_CLOSED) + 1 :]) <= {ev.CYCLE_COMPLETED}
    assert {e["session_id"] for e in full} == {busiest["id"]}
    tail = cli("events", "replay", "--session", busiest["id"], "--after", "3", "--json")
    assert tail == full[3:]
    assert all(e["seq"] > 3 for e in tail)
    assert cli("events", "replay", "--session", busiest["id"], "--after", "100000", "--json") == []
    assert "unknown session" in cli("events", "replay", "--session", "nope", "--json", code=1)
    card = cli("scorecard", "--json")
    assert card["total"] == printed["total"]
    assert len(card["windows"]) == 24
    counts = anyio.run(raw_counts, cli.db)
    assert card["total"] == expected_totals(counts)
    assert sum(w["cycles"] for w in card["windows"]) == card["total"]["cycles"] == 97


@pytest.mark.parametrize(
    ("zone", "start", "day"),
    [("America/Santiago", "2026-09-06T04:00:00Z", "2026-09-06"),  # 00:00 does not exist: 01:00-03
     ("America/Havana", "2026-03-08T05:00:00Z", "2026-03-08")],  # 00:00 does not exist: 01:00-04
)  # fmt: skip
def test_day_run_where_midnight_is_skipped_opens_23_windows(
    cli: Cli, zone: str, start: str, day: str
) -> None:
    config = cli.folder / "supervisor.toml"
    config.write_text(default_config_text().replace('timezone = "UTC"', f'timezone = "{zone}"'))
    cli("--config", str(config), "run", "--horizon", "day", "--simulate", "--start", start,
        "--json", with_db=False)  # fmt: skip
    sessions = cli("--config", str(config), "--run", "latest", "sessions", "list", "--json",
                   with_db=False)  # fmt: skip
    tz = ZoneInfo(zone)
    starts = sorted(datetime.fromisoformat(s["starts_at"]) for s in sessions)
    assert len(sessions) == 23, [s["window_key"] for s in sessions]
    assert {t.astimezone(tz).date().isoformat() for t in starts} == {day}
    assert starts[0].astimezone(tz).strftime("%H:%M") == "01:00"
    ends = max(datetime.fromisoformat(s["ends_at"]) for s in sessions)
    assert ends.astimezone(tz).strftime("%d %H:%M") == f"{int(day[-2:]) + 1:02d} 00:00"
