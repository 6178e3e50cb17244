"""The daemon with the soak's fault hooks, for bench/soak.py:

    python bench/soak_daemon.py --soak-plan PLAN.json <acp-supervisor arguments>

It runs the real CLI (`supervisor.cli.program`) in this process with three additions, all driven by
the plan file that bench/soak.py writes (the same file and arguments on every restart):

- State-bearing write failures: the SQLite backend's write transaction is wrapped so that a
  seeded share of the transactions made during a soak worker's cycle fail at COMMIT (rolled back,
  StateWriteError). Which ones is a hash of (seed, worker, cycle, n-th transaction of the cycle).
  Each injected failure is a line in <state>/soak-faults.jsonl.
- The operator: a duty on the daemon's own (virtual) clock that writes the host kill switch
  (HostSwitchFile.write, signed with ACP_KILLSWITCH_SECRET) at the plan's instants, in every mode,
  and records what it applied in <state>/soak-switch.json; it also approves a seeded share of the
  pending approvals at its ticks. Its instants have fractional seconds, so they never coincide with
  a cycle slot: every effect is unambiguously before or after a change.
- In simulated time the daemon has no kill-switch watch (that duty runs on the system clock only),
  so after each write the operator hands the new state to the daemon's `SwitchKeeper.record_host`, as the
  watch would: the engage/disengage event and, in emergency mode, the snapshot and the alert.

A restarted simulated run starts its virtual clock at the run's anchor again and walks forward
(workers resume from their checkpoints). The switch is a function of simulated time: before the
run starts, the file is set to the plan's mode at the earliest instant anything can act (the start
of the window that is not closed yet), and the operator applies the later changes as the clock
reaches them, so cycles re-run after a restart see the switch as it was at their instant.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import sqlite3
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if sys.path and sys.path[0] and Path(sys.path[0]).resolve() == HERE:
    sys.path.pop(0)  # bench/ itself must not shadow anything (bench/store.py, bench/fleet.py)
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import structlog  # noqa: E402

from bench.soak_workers import IN_CYCLE, draw, log_fault  # noqa: E402
from supervisor.cli import commands  # noqa: E402
from supervisor.cli.program import main as cli_main  # noqa: E402
from supervisor.errors import ApprovalError, StateWriteError, StoreError  # noqa: E402
from supervisor.killswitch import HostSwitchFile, Mode, load_secret  # noqa: E402
from supervisor.runtime.daemon import Daemon, Duty  # noqa: E402
from supervisor.store import sqlite as sqlite_backend  # noqa: E402
from supervisor.timing.sessions import WindowManager  # noqa: E402

log = structlog.get_logger("bench.soak")

PLAN: dict[str, Any] = {}


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text)


# -- the switch record ------------------------------------------------------------------------------


class SwitchRecord:
    """<state>/soak-switch.json: every planned change the operator applied (intent first: the
    change is recorded before the file is written, so a kill in between cannot hide it), and the
    intervals (mode, from, to) they make."""

    def __init__(self, path: Path, changes: list[dict[str, Any]], anchor: str, end: str) -> None:
        self.path = path
        self.changes = changes
        self.anchor, self.end = anchor, end
        try:
            self.data: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            self.data = {"applied": {}, "writes": []}

    def mode_at(self, instant: datetime) -> tuple[int, str]:
        """(index of the change in force at `instant`, its mode); -1 before the first change."""
        ats = [_at(c["at"]) for c in self.changes]
        i = bisect.bisect_right(ats, instant) - 1
        return i, (self.changes[i]["mode"] if i >= 0 else Mode.DISENGAGED.value)

    def intent(self, index: int, virtual_at: str) -> None:
        key = str(index)
        entry = self.data["applied"].setdefault(key, {"count": 0})
        entry["count"] += 1
        self.data["writes"].append({"index": index, "virtual_at": virtual_at, "pid": os.getpid()})
        self._save()

    def _save(self) -> None:
        applied = sorted(int(k) for k in self.data["applied"] if int(k) >= 0)
        intervals = []
        marks = [(self.anchor, Mode.DISENGAGED.value)]
        marks += [(self.changes[i]["at"], self.changes[i]["mode"]) for i in applied]
        for n, (start, mode) in enumerate(marks):
            stop = marks[n + 1][0] if n + 1 < len(marks) else self.end
            if start < stop:
                intervals.append({"mode": mode, "from": start, "to": stop})
        self.data["intervals"] = intervals
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        os.replace(tmp, self.path)


# -- state-bearing write failures -------------------------------------------------------------------


def _write_site() -> str:
    """Which part of the daemon asked for the failing transaction: the first caller outside the
    store, contextlib and this file (`supervisor/governance/gate.py:begin`, `supervisor/ops/alerts/engine.py:raise_alert`)."""
    frame = sys._getframe(1)
    while frame is not None:
        path = frame.f_code.co_filename
        if "supervisor" in path and "/store/" not in path:
            rel = path[path.rindex("supervisor") :]
            return f"{rel}:{frame.f_code.co_name}"
        frame = frame.f_back  # type: ignore[assignment]
    return "?"


def install_write_failures(seed: int, rate: float, faults_log: str) -> None:
    original = sqlite_backend.SQLiteBackend.transaction
    counters: dict[str, tuple[int, int]] = {}  # worker -> (cycle, transactions so far in it)

    @asynccontextmanager
    async def transaction(self: sqlite_backend.SQLiteBackend) -> AsyncIterator[Any]:
        where = IN_CYCLE.get()
        fault: dict[str, Any] | None = None
        if where is not None and rate > 0:
            cycle, n = counters.get(where[0], (where[1], 0))
            n = n + 1 if cycle == where[1] else 1
            counters[where[0]] = (where[1], n)
            if draw(seed, "write", where[0], where[1], n) < rate:
                fault = {"kind": "write", "worker": where[0], "cycle": where[1], "n": n,
                         "site": _write_site()}  # fmt: skip
        async with original(self) as tx:
            yield tx
            if fault is not None:
                log_fault(faults_log, **fault)
                # Raised inside the backend's transaction: it rolls back, as a failed COMMIT does.
                raise StateWriteError("soak: injected commit failure")

    sqlite_backend.SQLiteBackend.transaction = transaction  # type: ignore[method-assign]


# -- the operator -----------------------------------------------------------------------------------


class SoakDaemon(Daemon):
    """The daemon plus the operator duty, started beside the rotation duty on the same clock."""

    def _rotation(self, windows: WindowManager) -> Duty:
        # Asked for once, as the duties start: the soak's operator starts beside them.
        if self._tg is not None:
            self.clock.spawn(self._tg, self._soak_operator, name="soak-operator")
        return super()._rotation(windows)

    async def _soak_operator(self) -> None:
        plan = PLAN
        state_dir = Path(plan["state_dir"])
        switch = HostSwitchFile(state_dir / "killswitch.json", load_secret(os.environ, None))
        record = SwitchRecord(
            state_dir / "soak-switch.json", plan["switch"], plan["anchor"], plan["end"]
        )
        resume = _at(plan["resume_from"])
        end = _at(plan["end"])
        timeline: list[tuple[datetime, int, str]] = [
            (_at(c["at"]), i, "switch")
            for i, c in enumerate(plan["switch"])
            if _at(c["at"]) > resume
        ]
        timeline += [(_at(t), -1, "approve") for t in plan["approver_ticks"] if _at(t) > resume]
        timeline.sort()
        for when, index, what in timeline:
            if when >= end:
                return
            if not await self.clock.sleep_until(when, self.stopping):
                return
            if what == "switch":
                change = plan["switch"][index]
                record.intent(index, when.isoformat())
                state = switch.write(Mode(change["mode"]), reason=f"soak change {index}",
                                     by="soak-operator", at=when.isoformat())  # fmt: skip
                try:
                    await self.switch_keeper.record_host(state)
                except StoreError as exc:
                    log.warning("soak.observe_failed", error=str(exc))
            else:
                await self._soak_approve(when)

    async def _soak_approve(self, now: datetime) -> None:
        share = float(PLAN["approve_share"])
        approvals = self.gate.approvals
        try:
            rows = await self.gate.store.pending_approvals(fleet=self.config.fleet, limit=100_000)
        except StoreError:
            return
        for row in rows:
            if not (row.created_at <= now < row.deadline):
                continue  # created later in simulated time (a restart walks the days again)
            if draw(PLAN["seed"], "approve", row.id) >= share:
                continue
            try:
                await approvals.decide(row.id, approve=True, by="soak-operator",
                                       reason="soak approver")  # fmt: skip
            except (ApprovalError, StoreError) as exc:
                log.warning("soak.approve_failed", approval=row["id"], error=str(exc))


def resume_from(db_path: Path, fleet: str, anchor: str) -> str:
    """The earliest instant anything can act in this run: the end of the last closed window."""
    if not db_path.exists():
        return anchor
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        row = con.execute("SELECT max(ends_at) FROM sessions WHERE fleet = ? AND status != 'open'",
                          (fleet,)).fetchone()  # fmt: skip
    except sqlite3.Error:
        return anchor
    finally:
        con.close()
    if row is None or row[0] is None:
        return anchor
    return max(_at(row[0]), _at(anchor)).isoformat()


def prepare_switch(plan: dict[str, Any]) -> None:
    """Before the run: the file says what the plan says at the resume point."""
    state_dir = Path(plan["state_dir"])
    state_dir.mkdir(parents=True, exist_ok=True)
    switch = HostSwitchFile(state_dir / "killswitch.json", load_secret(os.environ, None))
    record = SwitchRecord(
        state_dir / "soak-switch.json", plan["switch"], plan["anchor"], plan["end"]
    )
    resume = _at(plan["resume_from"])
    index, mode = record.mode_at(resume)
    current = switch.read()
    if current.valid and current.mode.value == mode and (current.seq > 0 or mode == "disengaged"):
        if index >= 0 and str(index) not in record.data["applied"]:
            record.intent(index, resume.isoformat())
        return
    record.intent(index, resume.isoformat())
    switch.write(Mode(mode), reason=f"soak change {index} (restart at {resume.isoformat()})",
                 by="soak-operator", at=resume.isoformat())  # fmt: skip


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--soak-plan", required=True)
    args, rest = parser.parse_known_args(argv)
    PLAN.update(json.loads(Path(args.soak_plan).read_text()))
    state_dir = Path(PLAN["state_dir"])
    PLAN["resume_from"] = resume_from(Path(PLAN["db_path"]), PLAN["fleet"], PLAN["anchor"])
    prepare_switch(PLAN)
    install_write_failures(int(PLAN["seed"]), float(PLAN["write_fail_rate"]),
                           str(state_dir / "soak-faults.jsonl"))  # fmt: skip
    setattr(commands, "Daemon", SoakDaemon)  # noqa: B010 - the run command builds this class
    return cli_main(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
