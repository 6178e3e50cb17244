"""ExternalWorker end to end: real child processes, a real Gate over a real SQLite store.

Each test writes a small child script into tmp_path (run with sys.executable) and drives the
worker's cycles with a CycleContext, as the fleet does.
"""

from __future__ import annotations

import json
import random
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import anyio
import pytest
from structlog.testing import capture_logs

from supervisor.config import load_config
from supervisor.errors import SupervisorError
from supervisor.governance.approvals import Approvals
from supervisor.governance.budgets import ModelGovernor, TokenBudgets
from supervisor.governance.escalation import EscalationChain
from supervisor.governance.gate import Gate
from supervisor.governance.policy import Policy
from supervisor.killswitch import HostSwitchFile
from supervisor.runtime import recovery
from supervisor.runtime.external import ExternalWorker
from supervisor.runtime.protocol import WorkerHung, WorkerProtocolError
from supervisor.runtime.worker import CycleContext, EffectLog
from supervisor.store import Session, Store, open_store
from supervisor.timing.clock import VirtualClock
from tests import storetools
from tests.waiting import eventually

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[2]
FLEET = "ext"

POLICY = {
    "rules": [
        {"name": "forbidden", "action": "test.forbidden", "outcome": "deny"},
        {"name": "needs-ok", "action": "test.needs_ok", "outcome": "require_approval"},
    ]
}

# What every child script starts with: line helpers and the hello.
PRELUDE = """
import json, os, sys, time
def send(m):
    sys.stdout.write(json.dumps(m) + "\\n"); sys.stdout.flush()
def raw(b):
    sys.stdout.buffer.write(b); sys.stdout.flush()
def recv():
    line = sys.stdin.readline()
    if not line:
        sys.exit(0)
    return json.loads(line)
def note(path, value):
    with open(path, "a") as f:
        f.write(json.dumps(value) + "\\n")
HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "pid"), "w") as f:
    f.write(str(os.getpid()))
hello = recv()
assert hello["type"] == "hello" and hello["protocol"] == 1, hello
state = hello["state"]
"""


@dataclass
class Harness:
    store: Store
    gate: Gate
    session: Session
    clock: VirtualClock
    tmp: Path
    approvals: Approvals

    def ctx(self, worker: str, cycle: int) -> CycleContext:
        return CycleContext(
            fleet=FLEET, worker=worker, cycle=cycle, session=self.session, gate=self.gate,
            clock=self.clock, rng=random.Random(cycle),
            effects=EffectLog(self.tmp / "effects.jsonl"), correlation_id=f"corr-{cycle}",
        )  # fmt: skip

    def script(self, body: str, name: str = "child.py") -> list[str]:
        path = self.tmp / name
        path.write_text(PRELUDE + textwrap.dedent(body))
        return [sys.executable, str(path)]

    def worker(self, body: str, **kwargs: Any) -> ExternalWorker:
        kwargs.setdefault("heartbeat_timeout", 10.0)
        kwargs.setdefault("shutdown_timeout", 1.0)
        return ExternalWorker("ext-1", {"p": 1}, argv=self.script(body), **kwargs)

    def child_pid(self) -> int:
        return int((self.tmp / "pid").read_text())

    def notes(self, name: str = "notes.jsonl") -> list[Any]:
        path = self.tmp / name
        if not path.exists():
            return []
        return [json.loads(x) for x in path.read_text().splitlines()]


def gone(pid: int) -> bool:
    """True once `pid` has exited (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


async def wait_gone(pid: int) -> bool:
    """True once `pid` has exited; fails, naming it, if it is still there after the deadline."""
    return await eventually(lambda: gone(pid), f"process {pid} to exit", every=0.02)


@pytest.fixture
async def h(sqlite_url: str, tmp_path: Path, clock: VirtualClock) -> AsyncIterator[Harness]:
    store = await open_store(sqlite_url, clock, migrate=True)
    approvals = Approvals(store, EscalationChain.from_config(None), FLEET)
    gate = Gate(
        store=store, fleet=FLEET, policy=Policy.from_config(POLICY), approvals=approvals,
        host_switch=HostSwitchFile(tmp_path / "killswitch.json", None),
        token_budgets=TokenBudgets(), models=ModelGovernor(), timezone=ZoneInfo("UTC"),
    )  # fmt: skip
    now = clock.now()
    session, _ = await store.open_window(
        fleet=FLEET, key="2026-11-02T09", starts_at=now, ends_at=now + timedelta(hours=1),
        max_cost=None, max_actions=None, by="test",
    )  # fmt: skip
    try:
        yield Harness(store, gate, session, clock, tmp_path, approvals)
    finally:
        await store.close()


ROUND_TRIP = """
while True:
    c = recv()
    assert c["type"] == "cycle", c
    send({"type": "heartbeat"})
    send({"type": "log", "level": "info", "message": "cycle %d" % c["cycle"]})
    send({"type": "propose", "id": "w%d" % c["cycle"], "action": {
        "name": "test.write", "params": {"cycle": c["cycle"]}, "risk": "low", "cost": 0.5}})
    d = recv()
    assert d["type"] == "decision" and d["decision"] == "approved", d
    note(os.path.join(HERE, "notes.jsonl"), {"cycle": c["cycle"], "command_id": d["command_id"]})
    send({"type": "result", "id": d["id"], "ok": True, "result": {"wrote": c["cycle"]}})
    state["count"] = state.get("count", 0) + 1
    state["last"] = d["command_id"]
    state["window"] = c["window"]
    send({"type": "cycle_done", "state": state})
"""


async def test_round_trip_approved_effect_and_state(h: Harness) -> None:
    worker = h.worker(ROUND_TRIP)
    worker.restore({"count": 5})
    try:
        with capture_logs() as logs:
            await worker.cycle(h.ctx("ext-1", 0))
            first = worker.snapshot()
            await worker.cycle(h.ctx("ext-1", 1))  # same child: no second hello
        state = worker.snapshot()
        assert state["count"] == 7 and first["count"] == 6
        assert state["window"] == h.session.window_key
        notes = h.notes()
        assert [n["cycle"] for n in notes] == [0, 1]
        for note in notes:
            row = await h.store.get_action(note["command_id"])
            assert row is not None and row.status == "succeeded"
            assert row.worker == "ext-1" and row.name == "test.write"
        assert state["last"] == notes[-1]["command_id"]
        assert worker.running
        child_logs = [e for e in logs if e["event"] == "worker.log"]
        assert [(e["worker"], e["message"], e["log_level"]) for e in child_logs] == [
            ("ext-1", "cycle 0", "info"), ("ext-1", "cycle 1", "info"),
        ]  # fmt: skip
        assert sum(e["event"] == "worker.child_started" for e in logs) == 1
    finally:
        await worker.close()
    assert not worker.running
    assert await wait_gone(h.child_pid())


async def test_ok_false_is_a_failed_outcome_and_the_cycle_goes_on(h: Harness) -> None:
    worker = h.worker("""
        c = recv()
        send({"type": "propose", "id": "a", "action": {"name": "test.write", "risk": "low"}})
        d = recv()
        send({"type": "result", "id": "a", "ok": False, "error": "disk full"})
        send({"type": "cycle_done", "state": {"command_id": d["command_id"]}})
        recv()
    """)
    try:
        await worker.cycle(h.ctx("ext-1", 0))
        row = await h.store.get_action(worker.snapshot()["command_id"])
        assert row is not None and row.status == "failed"
        assert "disk full" in row.error
    finally:
        await worker.close()


async def test_gate_refusals_reach_the_child(h: Harness) -> None:
    worker = h.worker("""
        c = recv()
        seen = {}
        for ident, name in [("f", "test.forbidden"), ("n", "test.needs_ok")]:
            send({"type": "propose", "id": ident, "action": {"name": name, "risk": "low"}})
            seen[ident] = recv()
        send({"type": "cycle_done", "state": seen})
        recv()
    """)
    try:
        await worker.cycle(h.ctx("ext-1", 0))
        seen = worker.snapshot()
    finally:
        await worker.close()
    denied, pending = seen["f"], seen["n"]
    assert denied["type"] == "decision" and denied["decision"] == "denied"
    assert denied["reason"] == "policy" and "forbidden" in denied["detail"]
    assert await h.store.get_action(denied["command_id"]) is None  # nothing started
    assert pending["decision"] == "pending" and pending["reason"] == "approval_pending"
    assert pending["approval_id"]


async def test_a_result_after_a_denial_is_a_violation(h: Harness) -> None:
    worker = h.worker("""
        c = recv()
        send({"type": "propose", "id": "f", "action": {"name": "test.forbidden", "risk": "low"}})
        d = recv()
        assert d["decision"] == "denied"
        send({"type": "result", "id": "f", "ok": True, "result": {"did": "it anyway"}})
        time.sleep(30)
    """)
    with pytest.raises(WorkerProtocolError) as info:
        await worker.cycle(h.ctx("ext-1", 0))
    assert info.value.reason == "unexpected"
    assert "'f'" in str(info.value)
    assert not worker.running
    assert await wait_gone(h.child_pid())


async def test_a_key_replayed_is_done_and_runs_once(h: Harness) -> None:
    worker = h.worker("""
        while True:
            c = recv()
            send({"type": "propose", "id": "k", "action": {
                "name": "test.write", "risk": "low", "params": {"x": 1}, "key": "once"}})
            d = recv()
            if d["decision"] == "approved":
                note(os.path.join(HERE, "notes.jsonl"), d)
                send({"type": "result", "id": "k", "ok": True, "result": {"n": 1}})
            state[str(c["cycle"])] = d
            send({"type": "cycle_done", "state": state})
    """)
    try:
        await worker.cycle(h.ctx("ext-1", 0))
        await worker.cycle(h.ctx("ext-1", 1))
        state = worker.snapshot()
    finally:
        await worker.close()
    assert len(h.notes()) == 1
    first, second = state["0"], state["1"]
    assert first["decision"] == "approved"
    assert second["decision"] == "done" and second["reason"] == "already_done"
    assert second["status"] == "succeeded" and second["result"] == {"n": 1}
    assert second["command_id"] == first["command_id"]


VIOLATIONS = {
    "malformed": ('raw(b"this is not json\\n")', "malformed", {}),
    "not_an_object": ('raw(b"[1,2,3]\\n")', "malformed", {}),
    "oversized": ('raw(b"{" + b"x" * 300000)', "oversized", {"max_line": 1024}),
    "oversized_line": ('raw(b"x" * 5000 + b"\\n")', "oversized", {"max_line": 1024}),
    "unknown_type": ('send({"type": "reboot"})', "unknown_type", {}),
    "result_never_approved": ('send({"type": "result", "id": "zz", "ok": True})', "unexpected", {}),
    "flood": (
        'for _ in range(1000): send({"type": "heartbeat"})',
        "flood",
        {"max_messages": 50},
    ),
    "duplicate_id": (
        "p = {'type': 'propose', 'id': 'a', 'action': {'name': 'test.forbidden', 'risk': 'low'}}\n"
        "send(p)\nrecv()\nsend(p)",
        "unexpected",
        {},
    ),
    "bad_field": (
        'send({"type": "propose", "id": "a", "action": {"name": "x", "risk": "low", "cost": -5}})',
        "invalid",
        {},
    ),
}


@pytest.mark.parametrize("case", sorted(VIOLATIONS))
async def test_violations_raise_and_kill_the_child(h: Harness, case: str) -> None:
    body, reason, kwargs = VIOLATIONS[case]
    worker = h.worker("c = recv()\n" + body + "\ntime.sleep(60)\n", **kwargs)
    started = time.monotonic()
    with pytest.raises(WorkerProtocolError) as info:
        await worker.cycle(h.ctx("ext-1", 0))
    assert info.value.reason == reason, info.value
    assert not isinstance(info.value, SupervisorError)  # the fleet counts it as a crash
    assert not worker.running
    assert await wait_gone(h.child_pid())
    assert time.monotonic() - started < 8  # no wait for the heartbeat timeout


async def test_a_violation_mid_action_leaves_the_action_open(h: Harness) -> None:
    worker = h.worker("""
        c = recv()
        send({"type": "propose", "id": "a", "action": {"name": "test.write", "risk": "low"}})
        d = recv()
        note(os.path.join(HERE, "notes.jsonl"), d)
        send({"type": "propose", "id": "b", "action": {"name": "test.write", "risk": "low"}})
        time.sleep(60)
    """)
    with pytest.raises(WorkerProtocolError) as info:
        await worker.cycle(h.ctx("ext-1", 0))
    assert info.value.reason == "unexpected"
    [decision] = h.notes()
    row = await h.store.get_action(decision["command_id"])
    assert row is not None and row.status == "started"


async def test_child_exiting_mid_action_leaves_it_in_doubt(h: Harness) -> None:
    worker = h.worker("""
        c = recv()
        send({"type": "propose", "id": "a", "action": {"name": "test.write", "risk": "low"}})
        d = recv()
        note(os.path.join(HERE, "notes.jsonl"), d)
        sys.stderr.write("about to die\\n")
        os._exit(3)
    """)
    with capture_logs() as logs, pytest.raises(WorkerProtocolError) as info:
        await worker.cycle(h.ctx("ext-1", 0))
    assert info.value.reason == "exited"
    assert "exit code 3" in str(info.value)
    [decision] = h.notes()
    command_id = decision["command_id"]
    row = await h.store.get_action(command_id)
    assert row is not None and row.status == "started"  # no outcome recorded
    assert any(e["event"] == "worker.stderr" and e["line"] == "about to die" for e in logs)
    # the recovery scan marks it in-doubt; it is not safe to retry, so it is never re-run
    report = await recovery.scan(h.store, fleet=FLEET, approvals=h.approvals, host_switch=None,
                                 by="test")  # fmt: skip
    assert report.in_doubt == 1
    row = await h.store.get_action(command_id)
    assert row is not None and row.status == "in_doubt"


async def test_hung_child_is_detected_within_the_heartbeat_timeout(h: Harness) -> None:
    worker = h.worker("c = recv()\ntime.sleep(60)\n", heartbeat_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(WorkerHung) as info:
        await worker.cycle(h.ctx("ext-1", 0))
    assert info.value.reason == "hung"
    assert 0.4 < time.monotonic() - started < 4
    assert await wait_gone(h.child_pid())


async def test_hung_mid_action_leaves_the_action_open(h: Harness) -> None:
    worker = h.worker("""
        c = recv()
        send({"type": "propose", "id": "a", "action": {"name": "test.write", "risk": "low"}})
        d = recv()
        note(os.path.join(HERE, "notes.jsonl"), d)
        time.sleep(60)
    """, heartbeat_timeout=1.0)  # fmt: skip
    with pytest.raises(WorkerHung):
        await worker.cycle(h.ctx("ext-1", 0))
    [decision] = h.notes()
    row = await h.store.get_action(decision["command_id"])
    assert row is not None and row.status == "started"


async def test_heartbeats_keep_a_slow_child_alive(h: Harness) -> None:
    worker = h.worker("""
        c = recv()
        send({"type": "heartbeat"})
        for _ in range(8):
            time.sleep(0.25)
            send({"type": "heartbeat"})
        send({"type": "cycle_done", "state": {"slow": True}})
        recv()
    """, heartbeat_timeout=0.6)  # fmt: skip
    # 2 s of work, no message ever more than 0.25 s apart: alive throughout.
    try:
        await worker.cycle(h.ctx("ext-1", 0))
        assert worker.snapshot() == {"slow": True}
    finally:
        await worker.close()


async def test_cancellation_by_the_cycle_deadline_kills_the_child(h: Harness) -> None:
    worker = h.worker("""
        c = recv()
        send({"type": "propose", "id": "a", "action": {"name": "test.write", "risk": "low"}})
        d = recv()
        note(os.path.join(HERE, "notes.jsonl"), d)
        while True:
            send({"type": "heartbeat"})
            time.sleep(0.05)
    """)
    with pytest.raises(TimeoutError), anyio.fail_after(1.0):
        await worker.cycle(h.ctx("ext-1", 0))
    assert not worker.running
    assert await wait_gone(h.child_pid())
    [decision] = h.notes()
    row = await h.store.get_action(decision["command_id"])
    assert row is not None and row.status == "started"


async def test_close_kills_a_child_that_ignores_sigterm(h: Harness) -> None:
    worker = h.worker("""
        import signal
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        c = recv()
        send({"type": "cycle_done", "state": {}})
        while True:
            time.sleep(1)  # ignores end of input too
    """, shutdown_timeout=0.3)  # fmt: skip
    await worker.cycle(h.ctx("ext-1", 0))
    pid = h.child_pid()
    assert not gone(pid)
    started = time.monotonic()
    with capture_logs() as logs:
        await worker.close()
    assert time.monotonic() - started < 3
    assert await wait_gone(pid)
    assert any(e["event"] == "worker.child_killed" for e in logs)
    await worker.close()  # idempotent


async def test_grandchildren_go_with_the_child(h: Harness) -> None:
    worker = h.worker("""
        import subprocess
        c = recv()
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        with open(os.path.join(HERE, "grandchild"), "w") as f:
            f.write(str(p.pid))
        send({"type": "reboot"})
        time.sleep(60)
    """)
    with pytest.raises(WorkerProtocolError):
        await worker.cycle(h.ctx("ext-1", 0))
    assert await wait_gone(int((h.tmp / "grandchild").read_text()))


async def test_stderr_is_logged_line_by_line_with_the_worker_name(h: Harness) -> None:
    worker = h.worker("""
        c = recv()
        sys.stderr.write("first line\\nsecond \\x1b[31mred\\x1b[0m line\\n")
        sys.stderr.flush()
        send({"type": "cycle_done", "state": {}})
        recv()
    """)
    with capture_logs() as logs:
        await worker.cycle(h.ctx("ext-1", 0))
        await worker.close()
    lines = [e for e in logs if e["event"] == "worker.stderr"]
    assert [e["worker"] for e in lines] == ["ext-1", "ext-1"]
    assert lines[0]["line"] == "first line"
    assert lines[1]["line"] == "second \ufffd[31mred\ufffd[0m line"  # no terminal escapes
    assert all(e["log_level"] == "info" for e in lines)


async def test_a_child_that_exits_between_cycles_is_a_crash(h: Harness) -> None:
    worker = h.worker("""
        c = recv()
        send({"type": "cycle_done", "state": {"n": 1}})
        sys.exit(0)
    """)
    await worker.cycle(h.ctx("ext-1", 0))
    with pytest.raises(WorkerProtocolError) as info:
        await worker.cycle(h.ctx("ext-1", 1))
    assert info.value.reason == "exited"
    assert worker.snapshot() == {"n": 1}  # the last reported state is kept for the restart


async def test_a_command_that_does_not_exist(h: Harness) -> None:
    worker = ExternalWorker("ext-1", {}, argv=[str(h.tmp / "no-such-program")])
    with pytest.raises(WorkerProtocolError) as info:
        await worker.cycle(h.ctx("ext-1", 0))
    assert info.value.reason == "start_failed"


async def test_the_example_worker_runs_a_cycle_end_to_end(
    h: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_config(REPO / "workers" / "external_example.toml", env={})
    [spec] = config.workers
    assert spec.command is not None and spec.command[-1] == "workers/example_external.py"
    h.gate.policy = config.policy  # the example's own policy: notes may write notes, nothing else
    notes = tmp_path / "notes.jsonl"
    argv = [sys.executable, *spec.command[1:]]
    worker = ExternalWorker(spec.name, {**spec.params, "effects_file": str(notes)}, argv=argv,
                            cwd=REPO, heartbeat_timeout=spec.heartbeat_timeout)  # fmt: skip
    with capture_logs() as logs:
        try:
            await worker.cycle(h.ctx(spec.name, 0))
            await worker.cycle(h.ctx(spec.name, 1))
            assert worker.snapshot() == {"notes": 2, "cycles": 2}
        finally:
            await worker.close()
    written = [json.loads(x) for x in notes.read_text().splitlines()]
    assert [(w["worker"], w["cycle"]) for w in written] == [("notes", 0), ("notes", 1)]
    for entry in written:
        row = await h.store.get_action(entry["command_id"])
        assert row is not None and row.status == "succeeded"
        assert row.rule == "notes-may-write-notes"
    assert not any(e["event"] == "worker.decision" for e in logs)  # approved: no refusal sent
    stderr = [e["line"] for e in logs if e["event"] == "worker.stderr"]
    assert "example_external: notes starting with 0 notes written" in stderr
    # A restart picks the state up from the checkpointed snapshot, and the idempotency key
    # stops a replayed cycle from writing its note twice.
    again = ExternalWorker(spec.name, {"effects_file": str(notes)}, argv=argv, cwd=REPO)
    again.restore({"notes": 2, "cycles": 2})
    with capture_logs() as logs:
        try:
            await again.cycle(h.ctx(spec.name, 1))
            assert again.snapshot() == {"notes": 2, "cycles": 3}
        finally:
            await again.close()
    assert len(notes.read_text().splitlines()) == 2
    [done] = [e for e in logs if e["event"] == "worker.decision"]
    assert (done["decision"], done["reason"]) == ("done", "already_done")


async def test_the_example_policy_denies_anything_else(h: Harness) -> None:
    h.gate.policy = load_config(REPO / "workers" / "external_example.toml", env={}).policy
    worker = ExternalWorker("notes", {}, argv=h.script("""
        c = recv()
        send({"type": "propose", "id": "a", "action": {"name": "shell.run", "risk": "low"}})
        send({"type": "cycle_done", "state": recv()})
        recv()
    """))  # fmt: skip
    try:
        await worker.cycle(h.ctx("notes", 0))
    finally:
        await worker.close()
    decision = worker.snapshot()
    assert (decision["decision"], decision["reason"]) == ("denied", "policy")
    assert "notes-nothing-else" in decision["detail"]


async def test_long_stderr_lines_are_truncated_not_fatal(h: Harness) -> None:
    worker = h.worker("""
        c = recv()
        sys.stderr.write("e" * 5000 + "\\nafter\\n")
        sys.stderr.flush()
        send({"type": "cycle_done", "state": {}})
        recv()
    """, max_line=1024)  # fmt: skip
    with capture_logs() as logs:
        await worker.cycle(h.ctx("ext-1", 0))
        await worker.close()
    lines = [e for e in logs if e["event"] == "worker.stderr"]
    assert [(len(e["line"]), e.get("truncated", False)) for e in lines] == [
        (1024, True), (5, False),
    ]  # fmt: skip


async def test_a_stderr_flood_is_bounded_per_cycle(h: Harness) -> None:
    worker = h.worker("""
        c = recv()
        for i in range(3000):
            sys.stderr.write("line %d\\n" % i)
        sys.stderr.flush()
        time.sleep(0.3)
        send({"type": "cycle_done", "state": {}})
        recv()
    """)
    with capture_logs() as logs:
        try:
            await worker.cycle(h.ctx("ext-1", 0))
        finally:
            await worker.close()
    logged = [e for e in logs if e["event"] == "worker.stderr"]
    dropped = sum(e["lines"] for e in logs if e["event"] == "worker.stderr_dropped")
    assert len(logged) <= 2 * 1000  # this cycle's budget, then the one for the final drain
    assert len(logged) + dropped == 3000
    assert dropped > 0


async def test_the_kill_switch_reaches_the_child_as_a_denial(h: Harness) -> None:
    # An unsigned (here: unreadable) switch file counts as halt_all.
    (h.tmp / "killswitch.json").write_text("not a switch")
    worker = h.worker("""
        c = recv()
        send({"type": "propose", "id": "a", "action": {"name": "test.write", "risk": "low"}})
        d = recv()
        note(os.path.join(HERE, "notes.jsonl"), d)
        send({"type": "cycle_done", "state": d})
        recv()
    """)
    try:
        await worker.cycle(h.ctx("ext-1", 0))
    finally:
        await worker.close()
    decision = worker.snapshot()
    assert (decision["decision"], decision["reason"]) == ("denied", "killswitch")
    assert await h.store.get_action(decision["command_id"]) is None


# -- the trust boundary (docs/security.md) ---------------------------------------------------------


async def _engage(h: Harness, scope: str, target: str, mode: str) -> None:
    await storetools.write_switch(h.store, FLEET, scope, target, mode, "test", "op", h.clock.now())


async def _events(h: Harness, kind: str) -> list[Any]:
    return [e for e in await h.store.replay(h.session.id) if e.kind == kind]


CLAIMS = """
c = recv()
for ident, name in (("a", "test.claimed"), ("b", "test.policy_critical")):
    send({"type": "propose", "id": ident, "action": {"name": name, "risk": "low",
          "critical": True, "safe_to_retry": True}})
    d = recv()
    note(os.path.join(HERE, "notes.jsonl"), [ident, d["decision"], d.get("reason")])
    if d["decision"] == "approved":
        send({"type": "result", "id": ident, "ok": True})
send({"type": "cycle_done", "state": {}})
recv()
"""


async def test_critical_and_safe_to_retry_come_from_policy_not_from_the_child(h: Harness) -> None:
    h.gate.policy = Policy.from_config({**POLICY, "critical": ["test.policy_critical"]})
    await _engage(h, "worker", "ext-1", "halt_noncritical")
    worker = h.worker(CLAIMS)
    try:
        await worker.cycle(h.ctx("ext-1", 0))
    finally:
        await worker.close()
    # The child's "critical: true" did not carry it through halt_noncritical; policy's did.
    assert h.notes() == [["a", "denied", "killswitch"], ["b", "approved", None]]
    claims = await _events(h, "WORKER_CLAIM_IGNORED")
    assert {e.payload["action"] for e in claims} == {"test.claimed", "test.policy_critical"}
    assert claims[0].payload["claims"] == {"critical": True, "safe_to_retry": True}
    rows = await storetools.fetchall(h.store, "actions_with_status", FLEET, "succeeded", 10)
    assert [(r["name"], bool(r["critical"]), bool(r["safe_to_retry"])) for r in rows] == [
        ("test.policy_critical", True, False)
    ]


APPROVAL_FLOOD = """
c = recv()
for i in range(8):
    send({"type": "propose", "id": "p%d" % i, "action": {"name": "test.needs_ok",
          "params": {"i": i}, "risk": "low"}})
    d = recv()
    note(os.path.join(HERE, "notes.jsonl"), [d["decision"], d.get("reason")])
for i in range(40):
    send({"type": "log", "level": "info", "message": "log %d" % i})
    print("stderr %d" % i, file=sys.stderr, flush=True)
send({"type": "cycle_done", "state": {}})
recv()
"""


async def test_caps_per_worker_refuse_and_drop_with_an_event_once(h: Harness) -> None:
    alerts: list[tuple[str, Any]] = []

    async def on_alert(condition: str, detail: Any) -> None:
        alerts.append((condition, dict(detail)))

    h.gate.on_alert = on_alert
    worker = h.worker(APPROVAL_FLOOD, max_pending_approvals=5, max_log_lines=30)
    try:
        with capture_logs() as logs:
            await worker.cycle(h.ctx("ext-1", 0))
    finally:
        await worker.close()
    assert h.notes() == [["pending", "approval_pending"]] * 5 + [["denied", "approval_cap"]] * 3
    pending = await h.store.pending_approvals(fleet=FLEET, limit=100)
    assert len(pending) == 5
    forwarded = [e for e in logs if e["event"] in ("worker.log", "worker.stderr")]
    assert len(forwarded) == 30  # log messages and stderr lines share one budget
    dropped = [e for e in logs if e["event"] == "worker.stderr_dropped"]
    assert dropped and dropped[0]["lines"] == 50
    hits = await _events(h, "WORKER_CAP_HIT")
    assert sorted(e.reason for e in hits) == ["approval_cap", "log_lines"]  # once each per window
    assert sorted(d["cap"] for c, d in alerts if c == "worker_cap") == ["approval_cap", "log_lines"]


STDERR_THEN_DONE = """
c = recv()
for i in range(3000):  # about 180 KB: more than one pipe's worth and one read's worth
    print("line %04d " % i + "x" * 50, file=sys.stderr)
sys.stderr.flush()
send({"type": "cycle_done", "state": {}})
recv()
"""


async def test_stderr_written_before_cycle_done_counts_in_that_cycle(h: Harness) -> None:
    """The child's stderr and its cycle_done arrive on two pipes. Whatever it wrote to stderr
    before ending its cycle is counted in that cycle, however far behind the reader was when
    cycle_done arrived: never carried into the next cycle's budget or its exit."""
    worker = h.worker(STDERR_THEN_DONE, max_log_lines=30)
    try:
        with capture_logs() as logs:
            await worker.cycle(h.ctx("ext-1", 0))
    finally:
        await worker.close()
    lines = [e["line"] for e in logs if e["event"] == "worker.stderr"]
    assert [line[:9] for line in lines] == [f"line {i:04d}" for i in range(30)]
    dropped = [e for e in logs if e["event"] == "worker.stderr_dropped"]
    assert [d["lines"] for d in dropped] == [2970]


SLOW_EFFECT = """
import signal
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a child that ignores SIGTERM gets SIGKILL
c = recv()
send({"type": "propose", "id": "slow", "action": {"name": "test.slow", "risk": "low"}})
d = recv()
note(os.path.join(HERE, "notes.jsonl"), "effect started")
time.sleep(60)
send({"type": "result", "id": "slow", "ok": True})
"""


async def test_emergency_terminates_the_childs_process_group_and_records_in_doubt(
    h: Harness,
) -> None:
    from supervisor.errors import ActionDenied
    from supervisor.killswitch import Mode

    worker = h.worker(SLOW_EFFECT, shutdown_timeout=0.5)
    outcome: list[BaseException] = []

    async def run() -> None:
        try:
            await worker.cycle(h.ctx("ext-1", 0))
        except BaseException as exc:
            outcome.append(exc)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await eventually(h.notes, "the child's note that its effect started", every=0.02)
            pid = h.child_pid()
            await _engage(h, "fleet", "", "emergency")
            t0 = time.monotonic()
            assert h.gate.stop_in_flight("fleet", "", Mode.EMERGENCY) == 1
    finally:
        await worker.close()
    assert isinstance(outcome[0], ActionDenied) and outcome[0].reason == "killswitch", outcome
    assert time.monotonic() - t0 < 5
    assert await wait_gone(pid)
    rows = await storetools.fetchall(h.store, "actions_with_status", FLEET, "in_doubt", 10)
    assert [r["name"] for r in rows] == ["test.slow"]
    assert await _events(h, "ACTION_SUCCEEDED") == []
    in_doubt = await _events(h, "ACTION_IN_DOUBT")
    assert in_doubt[0].payload["stopped_by"] == "fleet emergency"


async def test_no_success_is_recorded_after_an_emergency_engage_returned(h: Harness) -> None:
    """The effect finishes after the engage, before any watcher noticed: its outcome is checked
    against the switches inside the outcome transaction, and recorded in-doubt."""
    from supervisor.actions import Action
    from supervisor.errors import ActionDenied

    async def effect() -> str:
        await _engage(h, "fleet", "", "emergency")  # lands while the effect is running
        return "done"

    with pytest.raises(ActionDenied) as refused:
        await h.gate.run(Action("test.write", risk="low"), effect, worker="w", session=h.session,
                         command_id="late")  # fmt: skip
    assert refused.value.reason == "killswitch"
    assert await _events(h, "ACTION_SUCCEEDED") == []
    row = await h.store.get_action("late")
    assert row is not None and row.status == "in_doubt"


async def test_an_in_process_effect_is_cancelled_at_its_next_await(h: Harness) -> None:
    from supervisor.actions import Action
    from supervisor.errors import ActionDenied
    from supervisor.killswitch import Mode

    started = anyio.Event()

    async def effect() -> None:
        started.set()
        await anyio.sleep(60)

    refused: list[ActionDenied] = []

    async def run() -> None:
        try:
            await h.gate.run(Action("test.write", risk="low"), effect, worker="w",
                             session=h.session, command_id="long")  # fmt: skip
        except ActionDenied as exc:
            refused.append(exc)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await started.wait()
            assert h.gate.stop_in_flight("worker", "w", Mode.EMERGENCY) == 1
    assert refused and refused[0].reason == "killswitch"
    row = await h.store.get_action("long")
    assert row is not None and row.status == "in_doubt"


async def test_halt_all_stops_effects_in_flight_only_when_configured_to_terminate(
    h: Harness,
) -> None:
    from supervisor.actions import Action
    from supervisor.errors import ActionDenied
    from supervisor.killswitch import Mode

    assert h.gate.halt_in_flight == "finish"
    assert h.gate.stop_in_flight("fleet", "", Mode.HALT_ALL) == 0  # nothing to do by default
    h.gate.halt_in_flight = "terminate"
    started = anyio.Event()

    async def effect() -> None:
        started.set()
        await anyio.sleep(60)

    refused: list[ActionDenied] = []

    async def run() -> None:
        try:
            await h.gate.run(Action("test.write", risk="low"), effect, worker="w",
                             session=h.session, command_id="halted")  # fmt: skip
        except ActionDenied as exc:
            refused.append(exc)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await started.wait()
            assert h.gate.stop_in_flight("session", "another-session", Mode.HALT_ALL) == 0
            assert h.gate.stop_in_flight("session", h.session.id, Mode.HALT_ALL) == 1
    assert refused and refused[0].reason == "killswitch"
    row = await h.store.get_action("halted")
    assert row is not None and row.status == "in_doubt"


LATE_RESULT = """
c = recv()
send({"type": "propose", "id": "late", "action": {"name": "test.late", "risk": "low"}})
d = recv()
note(os.path.join(HERE, "notes.jsonl"), "effect started")
while not os.path.exists(os.path.join(HERE, "go")):
    time.sleep(0.01)
send({"type": "result", "id": "late", "ok": True, "result": {"done": True}})
send({"type": "cycle_done", "state": {"finished": True}})
recv()
"""


async def test_a_result_after_an_unobserved_emergency_is_recorded_in_doubt(h: Harness) -> None:
    """The watcher has not seen the engage yet (stop_in_flight not called): the outcome check in
    the outcome transaction still refuses the success, and the child gets no second decision."""
    worker = h.worker(LATE_RESULT)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.cycle, h.ctx("ext-1", 0))
            await eventually(h.notes, "the child's note that its effect started", every=0.02)
            await _engage(h, "fleet", "", "emergency")
            (h.tmp / "go").write_text("")
        assert worker.snapshot() == {"finished": True}  # the cycle ended normally
    finally:
        await worker.close()
    assert await _events(h, "ACTION_SUCCEEDED") == []
    rows = await storetools.fetchall(h.store, "actions_with_status", FLEET, "in_doubt", 10)
    assert [r["name"] for r in rows] == ["test.late"]
    (in_doubt,) = await _events(h, "ACTION_IN_DOUBT")
    assert in_doubt.payload["reported"] == {"done": True}  # what the child said, for the operator


async def test_an_emergency_observed_during_the_last_look_stops_the_action_before_its_effect(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    from supervisor.actions import Action
    from supervisor.errors import ActionDenied
    from supervisor.killswitch import Mode

    real = h.store.kill_switches

    async def kill_switches(fleet: str) -> Any:
        records = await real(fleet)
        h.gate.stop_in_flight("fleet", "", Mode.EMERGENCY)  # the watcher fires meanwhile
        return records

    monkeypatch.setattr(h.store, "kill_switches", kill_switches)
    ran: list[int] = []

    async def effect() -> None:
        ran.append(1)

    with pytest.raises(ActionDenied) as refused:
        await h.gate.run(Action("test.write", risk="low"), effect, worker="w", session=h.session,
                         command_id="raced")  # fmt: skip
    assert refused.value.reason == "killswitch" and ran == []
    row = await h.store.get_action("raced")
    assert row is not None and row.status == "halted"
    assert h.gate.in_flight == {}


async def test_an_emergency_on_a_replicated_workers_name_stops_its_replicas_in_flight(
    h: Harness,
) -> None:
    """`--scope worker rep` names every replica (rep-1, rep-2): an emergency on it reaches their
    effects in flight, and an outcome reported after it is not recorded as a success."""
    from supervisor.actions import Action
    from supervisor.errors import ActionDenied
    from supervisor.killswitch import Mode

    h.gate.worker_groups = {"rep-1": "rep", "rep-2": "rep"}
    started = anyio.Event()

    async def long_effect() -> None:
        started.set()
        await anyio.sleep(60)

    refused: list[ActionDenied] = []

    async def run() -> None:
        try:
            await h.gate.run(Action("test.write", risk="low"), long_effect, worker="rep-1",
                             session=h.session, command_id="long")  # fmt: skip
        except ActionDenied as exc:
            refused.append(exc)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await started.wait()
            assert h.gate.stop_in_flight("worker", "other", Mode.EMERGENCY) == 0
            assert h.gate.stop_in_flight("worker", "rep", Mode.EMERGENCY) == 1
    assert refused and refused[0].reason == "killswitch"

    async def late_effect() -> str:
        await _engage(h, "worker", "rep", "emergency")  # lands while the effect runs, unobserved
        return "done"

    with pytest.raises(ActionDenied) as late:
        await h.gate.run(Action("test.write", risk="low"), late_effect, worker="rep-2",
                         session=h.session, command_id="late")  # fmt: skip
    assert late.value.reason == "killswitch"
    assert await _events(h, "ACTION_SUCCEEDED") == []
    for command_id in ("long", "late"):
        row = await h.store.get_action(command_id)
        assert row is not None and row.status == "in_doubt", command_id


async def test_a_lone_surrogate_or_an_infinite_number_is_a_protocol_violation(h: Harness) -> None:
    """`"\\ud800"` and `1e400` are valid JSON that the store cannot take: they are refused as
    protocol errors (the child is killed and restarted), not raised from inside the gate as a
    UnicodeEncodeError or a checkpoint that can never be saved."""
    worker = h.worker(r"""
        c = recv()
        send({"type": "propose", "id": "a", "action": {"name": "test.write", "risk": "low"}})
        d = recv()
        raw(b'{"type":"result","id":"a","ok":false,"error":"bad \\ud800"}\n')
        recv()
    """)
    with pytest.raises(WorkerProtocolError, match="lone surrogate") as violation:
        await worker.cycle(h.ctx("ext-1", 0))
    assert violation.value.reason == "malformed" and not worker.running
    worker = h.worker(r"""
        c = recv()
        raw(b'{"type":"cycle_done","state":{"n":1e400}}\n')
        recv()
    """)
    with pytest.raises(WorkerProtocolError, match="out of range"):
        await worker.cycle(h.ctx("ext-1", 1))
    assert worker.snapshot() == {}
