"""Soak: a simulated horizon with a fleet of workers and faults injected on a seeded schedule, the
daemon SIGKILLed and restarted along the way, then every promise checked against the store and
the effect log.

    .venv/bin/python bench/soak.py [--horizon month] [--workers 100] [--kills 12] [--seed 1]
                                   [--start 2026-11-01T00:00:00Z] [--state-dir DIR] [--json]

Quick: `--horizon week --workers 10 --kills 2`.

What runs: bench/soak_daemon.py (the real CLI, `run --horizon H --simulate --start S --seed N`,
plus the fault hooks) with a generated config in the state directory:

- `chaos` workers (bench.soak_workers:ChaosWorker, 90% of --workers): one or two actions a cycle,
  some flagged critical, some high risk (denied by policy); seeded crashes and hangs keyed by
  (seed, worker, cycle). Hangs block in real time past a small real-time `cycle_deadline`
  (--cycle-deadline, 50 ms), so they are rare.
- `approvals` workers (ApprovalWorker, 10%): new approval keys every cycle, earlier keys retried;
  the soak operator approves a seeded share, the rest are escalated and denied at the deadline.
- The operator duty in soak_daemon.py: the host kill switch in every mode at seeded simulated
  instants (recorded in <state>/soak-switch.json), and the approvals it grants.
- State-bearing write failures: a seeded share (--write-fail-rate) of the write transactions made
  during a soak worker's cycle fail at COMMIT (soak_daemon.py wraps the SQLite backend).
- Budgets: the horizon's window budget is set to ~90% of what the fleet asks for on a day
  without halts (--budget-share), so budgets run out on some days.
- Kills: --kills points, seeded: a simulated instant spread over the horizon plus a seeded
  real-time delay (0-300 ms) after the run reaches it, so each SIGKILL lands at a random point
  of the daemon's real-time work (mid-transaction, mid-effect, in startup). Each restart has the
  same arguments, until the run exits 0.

The store is SQLite with `synchronous=normal` (--synchronous): WAL without an fsync per commit.
That keeps everything committed across a process kill (what the soak does); only an OS crash or a
power loss could lose the last commits, and the soak does not simulate those.

Checks (each prints pass/fail and its counts; any failure makes the exit code 1):
no effect twice; no effect without a started record; every started action has an outcome or is
in doubt (an action still `started` at the end is allowed only if no recovery scan could have
seen it yet: started by the last incarnation after its last scan); no effect outside its window;
no effect while the switch forbade it; no overspend; no approval past its deadline; no window
left open; each window opened and closed exactly once; every worker's cycles continue across
restarts (no cycle completed twice, no slot lost); every injected write failure reported as a
crash (fail-closed, never swallowed); daemon RSS flat.

RSS: /proc/<pid>/status RssAnon of the daemon (its own memory: heap, SQLite's page cache) every
0.5 s, mapped to simulated progress through the latest closed window in the store; reported for
the first and the last simulated week (day, for horizons of a week or less). Not VmRSS: that
counts the database file's pages the store reads through mmap (up to 256 MB), which are the
OS's page cache, shared and reclaimable, and grow with the file, not with a leak.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import random
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if sys.path and sys.path[0] and Path(sys.path[0]).resolve() == HERE:
    sys.path.pop(0)  # bench/ itself must not shadow anything
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from supervisor import events as ev  # noqa: E402
from supervisor.timing.horizons import DEFAULTS  # noqa: E402
from supervisor.timing.windows import window_at, windows_between  # noqa: E402

FLEET = "soak"
SECRET = "soak-kill-switch-secret"
TZ = ZoneInfo("UTC")  # the soak config's timezone
HALT_MODES = ("halt_noncritical", "halt_all", "emergency")
TERMINAL = {"succeeded", "failed", "halted", "in_doubt", "resolved_done", "resolved_failed"}


def _iso(value: str) -> datetime:
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _fmt(d: datetime) -> str:
    return d.astimezone(UTC).isoformat()


# -- the plan -----------------------------------------------------------------------------------------


@dataclass
class Setup:
    args: argparse.Namespace
    state: Path
    anchor: datetime
    end: datetime
    cadence: timedelta
    window: str
    chaos: int
    approvers: int
    bait: int = 0
    bait_at: datetime | None = None
    plan: dict[str, Any] = field(default_factory=dict)
    kill_points: list[tuple[datetime, float]] = field(default_factory=list)

    @property
    def db(self) -> Path:
        return self.state / "simulate.db"

    @property
    def slots(self) -> int:
        return int((self.end - self.anchor) / self.cadence)


def switch_schedule(rng: random.Random, anchor: datetime, end: datetime) -> list[dict[str, Any]]:
    """About one halt episode a simulated day, every halt mode at least once, each followed by
    disengaged (some go through two modes first). Instants carry fractional seconds."""
    total = (end - anchor).total_seconds()
    episodes = max(4, round(total / 86400))
    modes = list(HALT_MODES) + [rng.choice(HALT_MODES) for _ in range(episodes - len(HALT_MODES))]
    rng.shuffle(modes)
    slot = total / episodes
    changes: list[dict[str, Any]] = []
    for i, mode in enumerate(modes):
        length = rng.uniform(1200, min(4 * 3600, slot * 0.6))
        begin = i * slot + rng.uniform(0.05 * slot, slot - length - 0.05 * slot)
        begin += 0.25 + rng.random() * 0.5  # never on a whole second: never on a cycle slot
        changes.append({"at": begin, "mode": mode})
        if rng.random() < 0.25:
            other = rng.choice([m for m in HALT_MODES if m != mode])
            changes.append({"at": begin + length * rng.uniform(0.3, 0.7), "mode": other})
        changes.append({"at": begin + length, "mode": "disengaged"})
    return [{"at": _fmt(anchor + timedelta(seconds=c["at"])), "mode": c["mode"]} for c in changes]


def build(args: argparse.Namespace) -> Setup:
    profile = DEFAULTS[args.horizon]
    start = _iso(args.start)
    anchor = window_at(start, profile.window, TZ).start
    end = anchor + profile.run_length
    if args.state_dir:
        state = Path(args.state_dir).absolute()
        if state.exists() and any(state.iterdir()):
            raise SystemExit(f"soak: state directory {state} is not empty (a soak starts fresh)")
    else:
        state = Path(tempfile.mkdtemp(prefix="acp-soak-"))
    state.mkdir(parents=True, exist_ok=True)
    if args.kill_at:
        args.kills = len(args.kill_at.split(","))
    bait = 1 if args.kills > 0 else 0
    approvers = max(1, round(args.workers * 0.1))
    if args.workers - approvers - bait < 1:
        raise SystemExit("soak: --workers must be at least 3 (2 without kills)")
    setup = Setup(args, state, anchor, end, profile.cycle_every, profile.window,
                  args.workers - approvers - bait, approvers, bait)  # fmt: skip

    rng = random.Random(f"soak:{args.seed}")
    per_window = window_at(anchor, profile.window, TZ)
    cycles_per_window = (per_window.end - per_window.start) / profile.cycle_every
    # ChaosWorker: 1.35 actions a cycle, 90% not high risk; ApprovalWorker: a few approved runs.
    demand = setup.chaos * cycles_per_window * 1.35 * 0.9 + approvers * cycles_per_window * 0.5
    max_actions = max(10, int(demand * args.budget_share))
    cost = 0.05
    schedule = switch_schedule(rng, anchor, end)
    ticks = []
    tick = anchor + timedelta(minutes=7, seconds=17.25)
    while tick < end:
        ticks.append(_fmt(tick))
        tick += timedelta(minutes=20)
    fractions = sorted(rng.uniform(0.03, 0.97) for _ in range(args.kills - bait))
    if args.kill_at:
        fractions = sorted(float(x) for x in args.kill_at.split(","))[: args.kills - bait]
    setup.kill_points = [(anchor + (end - anchor) * f, rng.uniform(0.0, 0.3)) for f in fractions]
    if bait:
        setup.bait_at = bait_instant(schedule, anchor, end, profile.window)
    faults_log = str(state / "soak-faults.jsonl")
    setup.plan = {
        "seed": args.seed, "fleet": FLEET, "state_dir": str(state), "db_path": str(setup.db),
        "anchor": _fmt(anchor), "end": _fmt(end), "switch": schedule, "approver_ticks": ticks,
        "approve_share": args.approve_share, "write_fail_rate": args.write_fail_rate,
        "kill_points": [{"at": _fmt(a), "delay": d} for a, d in setup.kill_points],
        "bait_at": _fmt(setup.bait_at) if setup.bait_at else None,
    }  # fmt: skip
    (state / "soak-plan.json").write_text(json.dumps(setup.plan, indent=1))
    chaos_params = {"seed": args.seed, "crash_rate": args.crash_rate, "hang_rate": args.hang_rate,
                    "faults_log": faults_log, "cost": cost}  # fmt: skip
    approval_params = {"seed": args.seed, "keys_per_cycle": 3, "retry_cycles": 2,
                       "faults_log": faults_log, "cost": cost}  # fmt: skip
    (state / "soak.toml").write_text(f"""
[daemon]
fleet = "{FLEET}"
host_id = "soak-host"
shutdown_timeout = "5s"
seed = {args.seed}

[horizons.{args.horizon}]
max_actions = {max_actions}
max_cost = {max_actions * cost * 1.02:.4f}

[policy]
unmatched = "deny"

[policy.risk]
low = "allow"
medium = "allow"
high = "deny"
critical = "deny"

[[policy.rules]]
name = "soak-approvals"
action = "soak.approval.*"
outcome = "require_approval"

[approvals]
timeout = "60m"
initial_tier = "operators"
escalation = [{{ after = "15m", tier = "oncall" }}]

[[workers]]
name = "chaos"
class = "bench.soak_workers:ChaosWorker"
replicas = {setup.chaos}
cycle_deadline = {args.cycle_deadline}
backoff = {{ initial = "30s", max = "5m" }}
params = {_toml(chaos_params)}

[[workers]]
name = "approvals"
class = "bench.soak_workers:ApprovalWorker"
replicas = {approvers}
cycle_deadline = "2s"
params = {_toml(approval_params)}
""")
    if bait:
        assert setup.bait_at is not None
        bait_params = {"seed": args.seed, "bait_cycle": int((setup.bait_at - anchor) / profile.cycle_every),
                       "bait_marker": str(state / "soak-bait.json"), "bait_block": 30.0, "cost": cost}  # fmt: skip
        with (state / "soak.toml").open("a") as f:
            f.write(f"""
[[workers]]
name = "bait"
class = "bench.soak_workers:ChaosWorker"
cycle_deadline = "60s"
params = {_toml(bait_params)}
""")
    return setup


def bait_instant(
    schedule: list[dict[str, Any]], anchor: datetime, end: datetime, length: str
) -> datetime:
    """The start of the latest window (not the first) at which a critical action may run: a fresh
    budget, and a switch that is disengaged or halt_noncritical."""
    starts = [w.start for w in windows_between(anchor, end, length, TZ)][1:]  # type: ignore[arg-type]
    ats = [_iso(c["at"]) for c in schedule]
    for start in reversed(starts):
        k = bisect.bisect_right(ats, start) - 1
        if k < 0 or schedule[k]["mode"] in ("disengaged", "halt_noncritical"):
            return start
    return starts[-1] if starts else anchor


def _toml(params: dict[str, Any]) -> str:
    return "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in params.items()) + " }"


def instance_names(name: str, replicas: int) -> list[str]:
    return [name] if replicas == 1 else [f"{name}-{i}" for i in range(1, replicas + 1)]


# -- running it, with kills -------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACP_") and k != "NOTIFY_SOCKET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["ACP_KILLSWITCH_SECRET"] = SECRET
    return env


def argv(setup: Setup) -> list[str]:
    a = setup.args
    return [sys.executable, str(HERE / "soak_daemon.py"), "--soak-plan", str(setup.state / "soak-plan.json"),
            "--config", str(setup.state / "soak.toml"), "--state-dir", str(setup.state),
            "--db", f"sqlite:///{setup.db}?synchronous={a.synchronous}", "--log-level", a.log_level,
            "run", "--horizon", a.horizon, "--simulate", "--start", _fmt(setup.anchor),
            "--seed", str(a.seed), "--json"]  # fmt: skip


class Probe:
    """Read-only looks at the daemon's store while it runs (WAL: readers do not block it)."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.con: sqlite3.Connection | None = None

    def _one(self, query: str, *args: Any) -> Any:
        if self.con is None:
            if not self.db.exists():
                return None
            try:
                self.con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=0.2)
            except sqlite3.Error:
                return None
        try:
            row = self.con.execute(query, args).fetchone()
        except sqlite3.Error:
            return None
        return row

    def latest_event(self) -> tuple[int, datetime] | None:
        row = self._one("SELECT id, created_at FROM events ORDER BY id DESC LIMIT 1")
        return (int(row[0]), _iso(row[1])) if row else None

    def closed_until(self) -> datetime | None:
        row = self._one(
            "SELECT max(ends_at) FROM sessions WHERE fleet = ? AND status != 'open'", FLEET
        )
        return _iso(row[0]) if row and row[0] else None

    def close(self) -> None:
        if self.con is not None:
            self.con.close()
            self.con = None


def _bait_pid(marker: Path) -> int | None:
    try:
        return int(json.loads(marker.read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


@dataclass
class RunLog:
    incarnations: list[dict[str, Any]] = field(default_factory=list)
    kills: list[dict[str, Any]] = field(default_factory=list)
    rss: list[dict[str, Any]] = field(default_factory=list)
    exit_code: int | None = None
    scorecard: dict[str, Any] | None = None
    problem: str | None = None
    seconds: float = 0.0


def run(setup: Setup, out: Any) -> RunLog:
    log = RunLog()
    probe = Probe(setup.db)
    pending = list(setup.kill_points)
    bait_pending = setup.bait_at is not None
    marker = setup.state / "soak-bait.json"
    progress: datetime | None = None
    t_start = time.monotonic()
    deadline = t_start + setup.args.timeout
    daemon_log = (setup.state / "daemon.log").open("ab")
    armed_at: float | None = None

    def kill_due(
        now: float, progress: datetime | None, live: bool
    ) -> tuple[str, datetime, float] | None:
        """(kind, planned instant, delay) when the daemon is to be killed now."""
        nonlocal bait_pending, armed_at
        if bait_pending and setup.bait_at is not None and _bait_pid(marker) == proc.pid:
            bait_pending = False
            return "mid-action", setup.bait_at, 0.0
        if pending and live and progress is not None and progress >= pending[0][0]:
            armed_at = now if armed_at is None else armed_at
            if now - armed_at >= pending[0][1]:  # a seeded real-time delay after the instant
                armed_at = None
                at, delay = pending.pop(0)
                return "seeded", at, delay
        return None

    try:
        while True:
            t0 = time.monotonic()
            stdout_path = setup.state / "daemon-stdout.json"
            with stdout_path.open("wb") as stdout:
                proc = subprocess.Popen(argv(setup), cwd=ROOT, env=_env(), stdout=stdout,
                                        stderr=daemon_log)  # fmt: skip
            base = probe.latest_event()
            base_id = base[0] if base else 0
            inc = {
                "n": len(log.incarnations) + 1,
                "pid": proc.pid,
                "started_real": round(t0 - t_start, 3),
            }
            log.incarnations.append(inc)
            killed = False
            last_rss = 0.0
            armed_at = None
            while proc.poll() is None:
                now = time.monotonic()
                if now > deadline:
                    proc.kill()
                    proc.wait()
                    log.problem = f"timed out after {setup.args.timeout:.0f}s"
                    return log
                latest = probe.latest_event()
                if latest is not None and latest[0] > base_id:
                    progress = latest[1] if progress is None else max(progress, latest[1])
                if now - last_rss >= 0.5:
                    last_rss = now
                    kb = rss_kb(proc.pid)
                    if kb is not None:
                        closed = probe.closed_until()
                        live = latest is not None and latest[0] > base_id
                        log.rss.append({"t": round(now - t_start, 2), "pid": proc.pid, "rss_kb": kb,
                                        "live": live, "closed_until": _fmt(closed) if closed else None,
                                        "progress": _fmt(progress) if progress else None})  # fmt: skip
                due = kill_due(now, progress, latest is not None and latest[0] > base_id)
                if due is not None:
                    kind, at, delay = due
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    killed = True
                    after = probe.latest_event()
                    log.kills.append({"n": len(log.kills) + 1, "kind": kind, "pid": proc.pid,
                                      "planned_at": _fmt(at), "delay": round(delay, 3),
                                      "progress": _fmt(progress) if progress else None,
                                      "real": round(time.monotonic() - t_start, 2),
                                      "max_event_id": after[0] if after else 0})  # fmt: skip
                    print(f"  kill {len(log.kills)}/{setup.args.kills} ({kind}): SIGKILL pid {proc.pid} "
                          f"at simulated {progress:%Y-%m-%d %H:%M} ({time.monotonic() - t_start:.1f}s)",
                          file=out, flush=True)  # fmt: skip
                    break
                time.sleep(0.1)
            inc["seconds"] = round(time.monotonic() - t0, 2)
            inc["exit"] = proc.returncode
            if killed:
                continue
            log.exit_code = proc.returncode
            if proc.returncode != 0:
                log.problem = (
                    f"daemon exited with {proc.returncode} (see {setup.state / 'daemon.log'})"
                )
                return log
            try:
                log.scorecard = json.loads(stdout_path.read_bytes() or b"null")
            except ValueError:
                log.problem = "the daemon's scorecard is not JSON"
            return log
    finally:
        log.seconds = round(time.monotonic() - t_start, 2)
        daemon_log.close()
        probe.close()


# -- the checks --------------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    checked: int = 0
    failures: list[str] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)
    failed_count: int = 0

    def fail(self, what: str) -> None:
        self.failed_count += 1
        if len(self.failures) < 10:
            self.failures.append(what)

    @property
    def ok(self) -> bool:
        return self.failed_count == 0

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "pass": self.ok, "checked": self.checked,
                "failed": self.failed_count, "examples": self.failures, **self.notes}  # fmt: skip


@dataclass
class Data:
    sessions: dict[str, dict[str, Any]]
    events: list[dict[str, Any]]
    actions: dict[str, dict[str, Any]]
    approvals: dict[str, dict[str, Any]]
    runs: list[dict[str, Any]]
    effects: list[dict[str, Any]]
    torn_effect_lines: int
    faults: list[dict[str, Any]]
    switch: dict[str, Any]


def load(setup: Setup) -> Data:
    con = sqlite3.connect(f"file:{setup.db}?mode=ro", uri=True)
    con.row_factory = sqlite3.Row

    def rows(query: str, *args: Any) -> list[dict[str, Any]]:
        return [dict(r) for r in con.execute(query, args)]

    try:
        sessions = {r["id"]: r for r in rows("SELECT * FROM sessions WHERE fleet = ?", FLEET)}
        kinds = (ev.ACTION_STARTED, ev.WINDOW_OPENED, ev.WINDOW_CLOSED, ev.CYCLE_COMPLETED,
                 ev.WORKER_CRASHED, ev.RECOVERY, ev.APPROVAL_GRANTED, ev.APPROVAL_EXPIRED,
                 ev.APPROVAL_ESCALATED, ev.APPROVAL_REQUESTED, ev.ACTION_DENIED,
                 ev.KILLSWITCH_ENGAGED, ev.KILLSWITCH_DISENGAGED, ev.BUDGET_EXHAUSTED,
                 ev.ACTION_IN_DOUBT, ev.ALERT, ev.WORKER_RESTARTED, ev.WORKER_QUARANTINED,
                 ev.ACTION_SUCCEEDED, ev.ACTION_FAILED)  # fmt: skip
        marks = ",".join("?" * len(kinds))
        events = rows(f"SELECT id, session_id, kind, reason, payload, command_id, correlation_id, "
                      f"worker, created_at FROM events WHERE kind IN ({marks}) ORDER BY id", *kinds)  # fmt: skip
        actions = {r["command_id"]: r for r in rows("SELECT * FROM actions WHERE fleet = ?", FLEET)}
        approvals = {r["id"]: r for r in rows("SELECT * FROM approvals WHERE fleet = ?", FLEET)}
        runs = rows("SELECT * FROM runs WHERE fleet = ?", FLEET)
    finally:
        con.close()
    effects, torn = [], 0
    path = setup.state / "effects.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                effects.append(json.loads(line))
            except ValueError:
                torn += 1
    faults = []
    fpath = setup.state / "soak-faults.jsonl"
    if fpath.exists():
        faults = [json.loads(line) for line in fpath.read_text().splitlines() if line.strip()]
    spath = setup.state / "soak-switch.json"
    switch = json.loads(spath.read_text()) if spath.exists() else {"intervals": [], "applied": {}}
    return Data(sessions, events, actions, approvals, runs, effects, torn, faults, switch)


def check_all(setup: Setup, data: Data, log: RunLog) -> tuple[list[Check], dict[str, Any]]:
    anchor, end = setup.anchor, setup.end
    by_kind: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in data.events:
        by_kind[e["kind"]].append(e)
    started_event = {e["command_id"]: e for e in by_kind[ev.ACTION_STARTED]}
    checks: list[Check] = []

    # run completed
    c = Check("run completed (exit 0, run finished)")
    c.checked = 1
    if log.exit_code != 0 or log.problem:
        c.fail(log.problem or f"exit {log.exit_code}")
    if [r["status"] for r in data.runs] != ["finished"]:
        c.fail(f"runs: {[r['status'] for r in data.runs]}")
    c.notes["kills"] = len(log.kills)
    checks.append(c)

    # 1. no effect twice
    c = Check("no effect twice")
    counts = Counter(e["command_id"] for e in data.effects)
    c.checked = len(data.effects)
    for cid, n in counts.items():
        if n > 1:
            c.fail(f"{cid} ran {n} times")
    if data.torn_effect_lines:
        c.fail(f"{data.torn_effect_lines} torn lines in effects.jsonl")
    checks.append(c)

    # 2. no effect without a started record
    c = Check("no effect without ACTION_STARTED")
    c.checked = len(data.effects)
    for e in data.effects:
        if e["command_id"] not in started_event:
            c.fail(
                f"effect {e['command_id']} ({e['worker']} cycle {e['cycle']}) has no started record"
            )
        elif e["command_id"] not in data.actions:
            c.fail(f"effect {e['command_id']} has no action row")
    checks.append(c)

    # 2b. every started action has an outcome or is in doubt
    c = Check("every started action has an outcome or is in_doubt")
    c.checked = len(started_event)
    longest = max(setup.args.cycle_deadline, 2.0)
    last_kill_id = max((k["max_event_id"] for k in log.kills), default=0)
    scans = [(e["id"], _iso(e["created_at"])) for e in by_kind[ev.RECOVERY]]
    statuses = Counter(a["status"] for a in data.actions.values())
    awaiting = 0
    for cid in started_event:
        if cid not in data.actions:
            c.fail(f"ACTION_STARTED {cid} without an action row")
    for cid, a in data.actions.items():
        if a["status"] in TERMINAL:
            continue
        if a["status"] != "started":
            c.fail(f"{cid}: unknown status {a['status']}")
            continue
        sid = started_event.get(cid, {}).get("id", 0)
        at = _iso(a["started_at"])
        if sid <= last_kill_id:
            c.fail(
                f"{cid} ({a['worker']}) started by a killed incarnation, still 'started' after the restart's scan"
            )
        elif any(i > sid and t - timedelta(seconds=2 * longest) > at for i, t in scans):
            c.fail(
                f"{cid} ({a['worker']}) started {a['started_at']}, a later recovery scan left it 'started'"
            )
        else:
            awaiting += 1
    # Actions in flight at a kill (started, no outcome when the process died): the restart's
    # startup scan marks them in doubt before any worker runs. On the virtual clock that scan runs
    # at the run's anchor, so its ACTION_IN_DOUBT events carry the anchor as their time.
    first_outcome: dict[str, int] = {}
    first_in_doubt: dict[str, dict[str, Any]] = {}
    for kind in (ev.ACTION_SUCCEEDED, ev.ACTION_FAILED):
        for e in by_kind[kind]:
            first_outcome.setdefault(e["command_id"], e["id"])
    for e in by_kind[ev.ACTION_IN_DOUBT]:
        first_in_doubt.setdefault(e["command_id"], e)
    in_flight = 0
    for kill in log.kills:
        k = kill["max_event_id"]
        for cid, e in started_event.items():
            if e["id"] > k or first_outcome.get(cid, k + 1) <= k:
                continue
            marked = first_in_doubt.get(cid)
            if marked is not None and marked["id"] <= k:
                continue
            in_flight += 1
            if marked is None or _iso(marked["created_at"]) != anchor:
                when = f"at {marked['created_at']}" if marked else "never"
                c.fail(
                    f"{cid} in flight at kill {kill['n']}: not marked in doubt by the restart (marked {when})"
                )
    c.notes["statuses"] = dict(statuses)
    c.notes["in_flight_at_kills"] = in_flight
    c.notes["awaiting_next_scan"] = awaiting
    checks.append(c)

    # 3. no effect outside its window
    c = Check("no effect outside its window")
    c.checked = len(data.effects)
    for e in data.effects:
        s = data.sessions.get(e["session"])
        at = _iso(e["at"])
        if s is None:
            c.fail(f"effect {e['command_id']} in unknown session {e['session']}")
        elif not (_iso(s["starts_at"]) <= at < _iso(s["ends_at"])):
            c.fail(
                f"effect {e['command_id']} at {e['at']} outside [{s['starts_at']}, {s['ends_at']})"
            )
        elif not (anchor <= at < end):
            c.fail(f"effect {e['command_id']} at {e['at']} outside the run")
    checks.append(c)

    # 4. no effect during a halt
    c = Check("no effect during a halt (kill switch)")
    intervals = data.switch.get("intervals") or [
        {"mode": "disengaged", "from": _fmt(anchor), "to": _fmt(end)}
    ]
    starts = [_iso(i["from"]) for i in intervals]
    per_mode: Counter[str] = Counter()
    c.checked = len(data.effects)
    for e in data.effects:
        at = _iso(e["at"])
        k = bisect.bisect_right(starts, at) - 1
        mode = intervals[k]["mode"] if k >= 0 else "disengaged"
        if at in starts[1:] or (at == starts[0] and intervals[0]["from"] != _fmt(anchor)):
            c.fail(f"effect {e['command_id']} exactly at a switch change {e['at']} (ambiguous)")
        row = data.actions.get(e["command_id"])
        critical = bool(row["critical"]) if row else bool(e.get("critical"))
        per_mode[f"{mode}{' (critical)' if critical and mode == 'halt_noncritical' else ''}"] += 1
        if mode in ("halt_all", "emergency") or (mode == "halt_noncritical" and not critical):
            c.fail(
                f"effect {e['command_id']} ({'critical' if critical else 'non-critical'}) at {e['at']} under {mode}"
            )
    planned = [x for x in setup.plan["switch"] if _iso(x["at"]) < end]
    applied = {int(k) for k in data.switch.get("applied", {}) if int(k) >= 0}
    c.notes["effects_by_mode"] = dict(per_mode)
    c.notes["switch_changes_applied"] = f"{len(applied)}/{len(planned)}"
    c.notes["halted_hours"] = {m: round(sum((_iso(i["to"]) - _iso(i["from"])).total_seconds()
                                            for i in intervals if i["mode"] == m) / 3600, 1)
                               for m in HALT_MODES}  # fmt: skip
    if len(applied) != len(planned):
        c.fail(f"only {len(applied)} of {len(planned)} planned switch changes were applied")
    checks.append(c)

    # 5. no overspend
    c = Check("no overspend")
    c.checked = len(data.sessions)
    unsettled = {cid for cid, a in data.actions.items() if a["status"] not in ("succeeded",)}
    effects_per_session = Counter(
        e["session"] for e in data.effects if e["command_id"] not in unsettled
    )
    succeeded = Counter(
        a["session_id"] for a in data.actions.values() if a["status"] == "succeeded"
    )
    exhausted = 0
    for sid, s in data.sessions.items():
        if s["max_actions"] is not None:
            if s["used_actions"] > s["max_actions"]:
                c.fail(f"{s['window_key']}: used_actions {s['used_actions']} > {s['max_actions']}")
            if succeeded[sid] > s["max_actions"] or effects_per_session[sid] > s["max_actions"]:
                c.fail(
                    f"{s['window_key']}: {succeeded[sid]} succeeded, {effects_per_session[sid]} effects > {s['max_actions']}"
                )
            exhausted += int(s["used_actions"] + 1 > s["max_actions"] or
                             (s["max_cost"] is not None and s["used_cost"] + 0.05 > s["max_cost"]))  # fmt: skip
        if s["max_cost"] is not None and s["used_cost"] > s["max_cost"] + 1e-6:
            c.fail(f"{s['window_key']}: used_cost {s['used_cost']:.4f} > {s['max_cost']}")
        if succeeded[sid] != s["used_actions"]:
            c.fail(
                f"{s['window_key']}: used_actions {s['used_actions']} but {succeeded[sid]} succeeded"
            )
    c.notes["windows_spent_out"] = exhausted
    c.notes["budget_exhausted_events"] = len(by_kind[ev.BUDGET_EXHAUSTED])
    checks.append(c)

    # 6. no approval past its deadline
    c = Check("no approval past its deadline")
    c.checked = len(data.approvals)
    lags = []
    by_status = Counter(a["status"] for a in data.approvals.values())
    for aid, a in data.approvals.items():
        deadline = _iso(a["deadline"])
        if a["status"] == "pending" and deadline < end:
            c.fail(f"approval {aid} still pending, deadline {a['deadline']} before the run's end")
        if a["status"] == "approved" and not (a["decided_at"] and _iso(a["decided_at"]) < deadline):
            c.fail(f"approval {aid} approved at {a['decided_at']}, deadline {a['deadline']}")
        if a["status"] == "expired":
            lag = (_iso(a["decided_at"]) - deadline).total_seconds()
            lags.append(lag)
            if lag < 0 or lag > 60:
                c.fail(f"approval {aid} expired {lag:.0f}s after its deadline")
    for e in by_kind[ev.APPROVAL_GRANTED]:
        aid = json.loads(e["payload"]).get("approval")
        row = data.approvals.get(aid)
        if row is None or _iso(e["created_at"]) >= _iso(row["deadline"]):
            c.fail(f"APPROVAL_GRANTED {aid} at {e['created_at']} not before its deadline")
    c.notes["approvals"] = dict(by_status)
    c.notes["max_expiry_lag_s"] = max(lags, default=0.0)
    checks.append(c)

    # 7. no window left open; 8. each window opened and closed exactly once
    expected = {w.key for w in windows_between(anchor, end, setup.window, TZ)}  # type: ignore[arg-type]
    c = Check("no window left open")
    c.checked = len(data.sessions)
    for s in data.sessions.values():
        if s["status"] == "open":
            c.fail(f"window {s['window_key']} still open")
    checks.append(c)
    c = Check("each window opened and closed exactly once")
    opened = Counter(e["session_id"] for e in by_kind[ev.WINDOW_OPENED])
    closed = Counter(e["session_id"] for e in by_kind[ev.WINDOW_CLOSED])
    keys = {s["window_key"] for s in data.sessions.values()}
    c.checked = len(expected)
    for key in sorted(expected - keys):
        c.fail(f"window {key} never opened")
    for key in sorted(keys - expected):
        c.fail(f"window {key} outside the run")
    for sid, s in data.sessions.items():
        if opened[sid] != 1 or closed[sid] != 1:
            c.fail(f"window {s['window_key']} opened {opened[sid]}x, closed {closed[sid]}x")
    c.notes["status"] = dict(Counter(s["status"] for s in data.sessions.values()))
    checks.append(c)

    # 9. cycles continue across restarts
    c = Check("cycles continue across restarts")
    completed: dict[str, list[int]] = defaultdict(list)
    for e in by_kind[ev.CYCLE_COMPLETED]:
        completed[e["worker"]].append(json.loads(e["payload"])["cycle"])
    crashed: dict[str, set[int]] = defaultdict(set)
    for e in by_kind[ev.WORKER_CRASHED]:
        crashed[e["worker"]].add(json.loads(e["payload"])["cycle"])
    names = instance_names("chaos", setup.chaos) + instance_names("approvals", setup.approvers)
    names += ["bait"] if setup.bait else []
    c.checked = sum(len(v) for v in completed.values())
    missing_total = 0
    for name in names:
        cycles = completed.get(name, [])
        dup = [n for n, k in Counter(cycles).items() if k > 1]
        if dup:
            c.fail(f"{name}: cycles completed twice: {sorted(dup)[:5]}")
        missing = set(range(setup.slots)) - set(cycles) - crashed.get(name, set())
        extra = {n for n in cycles if n >= setup.slots or n < 0}
        missing_total += len(missing)
        if missing:
            c.fail(
                f"{name}: {len(missing)} slots neither completed nor crashed, e.g. {sorted(missing)[:5]}"
            )
        if extra:
            c.fail(f"{name}: cycles outside the run: {sorted(extra)[:5]}")
    c.notes["workers"] = len(names)
    c.notes["slots_per_worker"] = setup.slots
    c.notes["missing_slots"] = missing_total
    checks.append(c)

    # 10. every injected state-bearing write failure was reported (fail-closed, never swallowed)
    c = Check("injected write failures reported as crashes")
    writes = [f for f in data.faults if f["kind"] == "write"]
    crash_errors: dict[tuple[str, int], list[str]] = defaultdict(list)
    for e in by_kind[ev.WORKER_CRASHED]:
        p = json.loads(e["payload"])
        crash_errors[(e["worker"], p["cycle"])].append(p.get("error") or "")
    killed_pids = {k["pid"] for k in log.kills}
    last_of_pid = {}
    for i, f in enumerate(data.faults):
        last_of_pid[f["pid"]] = i
    lost = 0
    by_design: Counter[str] = Counter()
    c.checked = len(writes)
    for i, f in enumerate(data.faults):
        if f["kind"] != "write":
            continue
        if f.get("site", "").startswith("supervisor/ops/alerts/"):
            by_design[f["site"]] += 1  # alerts never raise: a failed alert record is logged
            continue
        if any(
            err.startswith("state write failed")
            for err in crash_errors.get((f["worker"], f["cycle"]), [])
        ):
            continue
        if f["pid"] in killed_pids and last_of_pid[f["pid"]] == i:
            lost += 1  # the kill landed between the failure and its crash record
            continue
        c.fail(f"write failure in {f['worker']} cycle {f['cycle']} (#{f['n']}) not reported")
    c.notes["lost_to_a_kill"] = lost
    c.notes["alert_records_logged_not_raised"] = sum(by_design.values())
    c.notes["sites"] = dict(Counter(f.get("site", "?") for f in writes))
    checks.append(c)

    # 11. RSS flat
    c, rss = rss_check(setup, log)
    checks.append(c)

    # what was exercised
    denied = Counter(e["reason"] for e in by_kind[ev.ACTION_DENIED])
    crash_reasons: Counter[str] = Counter()
    for e in by_kind[ev.WORKER_CRASHED]:
        err = json.loads(e["payload"]).get("error") or ""
        kind = ("hang" if e["reason"] == "hang" else "write failure" if err.startswith("state write failed")
                else "injected crash" if "soak: injected crash" in err else "other")  # fmt: skip
        crash_reasons[kind] += 1
    injected = Counter(f["kind"] for f in data.faults)
    modes_applied = Counter(setup.plan["switch"][i]["mode"] for i in applied)
    snapshots = len(list(setup.state.glob("emergency-host-*.json")))
    faults = {
        "kills": len(log.kills),
        "injected": {
            "crash": injected["crash"],
            "hang": injected["hang"],
            "write": injected["write"],
        },
        "observed_worker_crashes": dict(crash_reasons),
        "switch_changes_by_mode": dict(modes_applied),
        "killswitch_events": len(by_kind[ev.KILLSWITCH_ENGAGED])
        + len(by_kind[ev.KILLSWITCH_DISENGAGED]),
        "emergency_snapshots": snapshots,
        "approvals_requested": len(by_kind[ev.APPROVAL_REQUESTED]),
        "approvals_escalated": len(by_kind[ev.APPROVAL_ESCALATED]),
        "approvals_expired": len(by_kind[ev.APPROVAL_EXPIRED]),
        "approvals_granted": len(by_kind[ev.APPROVAL_GRANTED]),
        "denials_by_reason": dict(denied),
        "in_doubt": len(by_kind[ev.ACTION_IN_DOUBT]),
        "effects": len(data.effects),
        "actions_succeeded": statuses.get("succeeded", 0),
        "worker_restarts": len(by_kind[ev.WORKER_RESTARTED]),
        "quarantines": len(by_kind[ev.WORKER_QUARANTINED]),
    }
    return checks, {"faults": faults, "rss": rss}


def rss_check(setup: Setup, log: RunLog) -> tuple[Check, dict[str, Any]]:
    c = Check("daemon RSS flat")
    bucket = (
        timedelta(days=7) if setup.end - setup.anchor > timedelta(days=7) else timedelta(days=1)
    )
    label = "week" if bucket.days == 7 else "day"
    # A sample's simulated progress: the window being worked on starts where the latest closed one
    # ended (the anchor before any closed). Samples of a daemon still starting up do not count.
    samples = [s for s in log.rss if s["live"]]

    def progress(s: dict[str, Any]) -> datetime:
        return _iso(s["closed_until"]) if s["closed_until"] else setup.anchor

    c.checked = len(log.rss)

    def stats(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
        if not rows:
            return None
        mb = [r["rss_kb"] / 1024 for r in rows]
        return {"samples": len(mb), "min_mb": round(min(mb), 1), "median_mb": round(statistics.median(mb), 1),
                "max_mb": round(max(mb), 1)}  # fmt: skip

    first_end = setup.anchor + bucket
    last_start = setup.end - bucket
    first = [s for s in samples if progress(s) < first_end]
    last = [s for s in samples if last_start <= progress(s) < setup.end]
    per_pid: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for s in log.rss:
        per_pid[s["pid"]].append(s)
    incarnations = []
    for pid, rows in per_pid.items():
        rows = [r for r in rows if r["live"]] or rows  # from its first event on: not the startup
        mb = [r["rss_kb"] / 1024 for r in rows]
        closed = [_iso(r["closed_until"]) for r in rows if r["closed_until"]]
        span = (max(closed) - min(closed)).total_seconds() / 86400 if closed else 0.0
        incarnations.append({"pid": pid, "samples": len(rows), "first_mb": round(mb[0], 1),
                             "last_mb": round(mb[-1], 1), "max_mb": round(max(mb), 1),
                             "simulated_days": round(span, 1)})  # fmt: skip
    by_day: dict[int, list[float]] = defaultdict(list)
    for s in samples:
        by_day[int((progress(s) - setup.anchor) / timedelta(days=1)) + 1].append(s["rss_kb"] / 1024)
    out: dict[str, Any] = {"bucket": label, "first": stats(first), "last": stats(last),
           "median_mb_by_simulated_day": {d: round(statistics.median(v), 1) for d, v in sorted(by_day.items())},
           "incarnations": incarnations}  # fmt: skip
    f, la = out["first"], out["last"]
    if f and la:
        limit = f["median_mb"] * 1.25 + 10
        c.notes["limit_mb"] = round(limit, 1)
        if la["median_mb"] > limit:
            c.fail(f"RSS grew: last {label} median {la['median_mb']} MB > {limit:.1f} MB "
                   f"(first {label} median {f['median_mb']} MB)")  # fmt: skip
    else:
        c.notes["note"] = "too few samples to compare"
    c.notes[f"first_{label}_median_mb"] = f["median_mb"] if f else None
    c.notes[f"last_{label}_median_mb"] = la["median_mb"] if la else None
    return c, out


# -- main ---------------------------------------------------------------------------------------------


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--horizon", choices=["day", "week", "month"], default="month")
    p.add_argument("--workers", type=int, default=100)
    p.add_argument("--kills", type=int, default=12)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--kill-at",
        metavar="FRACTIONS",
        help="kill points as fractions of the horizon (0.5,0.99), instead of seeded ones",
    )
    p.add_argument("--start", default="2026-11-01T00:00:00Z")
    p.add_argument("--state-dir", help="an empty or new directory (default: a new temp directory)")
    p.add_argument("--keep", action="store_true", help="keep the temp state directory after a pass")
    p.add_argument("--crash-rate", type=float, default=0.01, help="per chaos cycle")
    p.add_argument("--hang-rate", type=float, default=0.001, help="per chaos cycle")
    p.add_argument(
        "--write-fail-rate", type=float, default=0.005, help="per write transaction in a cycle"
    )
    p.add_argument("--approve-share", type=float, default=0.3)
    p.add_argument("--budget-share", type=float, default=0.9)
    p.add_argument("--cycle-deadline", type=float, default=0.05, help="real seconds")
    p.add_argument("--synchronous", choices=["normal", "full"], default="normal")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="warning")
    p.add_argument("--timeout", type=float, default=3600.0, help="real seconds for the whole run")
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    out = sys.stderr if args.json else sys.stdout
    setup = build(args)
    print(f"soak: {args.horizon} from {_fmt(setup.anchor)}, {setup.chaos} chaos + {setup.approvers} "
          f"approval workers, {args.kills} kills, seed {args.seed}, state {setup.state}",
          file=out, flush=True)  # fmt: skip
    log = run(setup, out)
    (setup.state / "soak-rss.json").write_text(json.dumps(log.rss))
    checks: list[Check] = []
    extra: dict[str, Any] = {}
    if setup.db.exists():
        data = load(setup)
        checks, extra = check_all(setup, data, log)
    else:
        c = Check("run completed (exit 0, run finished)")
        c.fail(log.problem or "no store")
        checks = [c]
    ok = all(c.ok for c in checks)
    report = {
        "pass": ok, "horizon": args.horizon, "workers": args.workers, "seed": args.seed,
        "start": _fmt(setup.anchor), "state_dir": str(setup.state), "seconds": log.seconds,
        "incarnations": log.incarnations, "kills": log.kills,
        "checks": [c.as_dict() for c in checks], **extra,
        "scorecard_total": (log.scorecard or {}).get("total"),
    }  # fmt: skip
    if args.json:
        print(json.dumps(report, indent=1, default=str))
    else:
        print(render(report))
    if ok and not args.keep and not args.state_dir:
        import shutil

        shutil.rmtree(setup.state, ignore_errors=True)
    return 0 if ok else 1


def render(r: dict[str, Any]) -> str:
    lines = [f"soak {r['horizon']}: {r['workers']} workers, seed {r['seed']}, "
             f"{len(r['kills'])} kills, {len(r['incarnations'])} runs of the daemon, {r['seconds']:.1f}s"]  # fmt: skip
    lines.append(f"{'check':<54} {'result':<6} {'checked':>8} {'failed':>7}")
    for c in r["checks"]:
        lines.append(
            f"{c['name']:<54} {'pass' if c['pass'] else 'FAIL':<6} {c['checked']:>8} {c['failed']:>7}"
        )
        notes = {
            k: v for k, v in c.items() if k not in ("name", "pass", "checked", "failed", "examples")
        }
        if notes:
            lines.append("    " + json.dumps(notes, default=str))
        for ex in c["examples"]:
            lines.append(f"    ! {ex}")
    if "faults" in r:
        lines.append("faults and governance exercised:")
        for k, v in r["faults"].items():
            lines.append(f"    {k}: {json.dumps(v) if isinstance(v, dict) else v}")
    if "rss" in r:
        rss = r["rss"]
        lines.append(f"daemon RSS, first simulated {rss['bucket']}: {rss['first']}")
        lines.append(f"daemon RSS, last simulated {rss['bucket']}:  {rss['last']}")
        lines.append("    median MB by simulated day: " + " ".join(
            f"{d}:{v}" for d, v in rss["median_mb_by_simulated_day"].items()))  # fmt: skip
        for inc in rss["incarnations"]:
            lines.append(f"    pid {inc['pid']}: {inc['first_mb']} -> {inc['last_mb']} MB (max {inc['max_mb']}) "
                         f"over {inc['simulated_days']} simulated days, {inc['samples']} samples")  # fmt: skip
    lines.append("PASS" if r["pass"] else f"FAIL (state kept in {r['state_dir']})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
