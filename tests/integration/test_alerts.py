"""Alerts over both store backends: once per condition and window, resolve after raise, the
evaluated conditions from real approvals and synthetic rate events, and the sinks (webhook and
command) including failures, retries and a full queue."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import pytest

from supervisor import events as ev
from supervisor.actions import Action, derive_id
from supervisor.errors import StateWriteError
from supervisor.governance.approvals import Approvals
from supervisor.governance.escalation import EscalationChain
from supervisor.ops.alerts import AlertConfig, Alerts, CommandSink, Sink, WebhookSink
from supervisor.store import NewEvent, Store, system_stream
from supervisor.store.base import Event, Session
from supervisor.timing.clock import VirtualClock

pytestmark = pytest.mark.anyio

FLEET = "alpha"
HOUR = timedelta(hours=1)


# --- helpers -------------------------------------------------------------------------------------


async def open_window(store: Store, clock: VirtualClock, key: str, offset: int = 0) -> Session:
    start = clock.now() + offset * HOUR
    session, _ = await store.open_window(
        fleet=FLEET, key=key, starts_at=start, ends_at=start + HOUR, max_cost=None,
        max_actions=None, by="test",
    )  # fmt: skip
    return session


async def kinds(store: Store, stream: str, *wanted: str) -> list[Event]:
    return [e for e in await store.replay(stream) if e.kind in wanted]


def make(store: Store, clock: VirtualClock, *sinks: Sink, **config: Any) -> Alerts:
    cfg = AlertConfig(sinks=tuple(sinks), **config)
    return Alerts(store, fleet=FLEET, config=cfg, clock=clock, backoff=0.05)


@pytest.fixture
async def sinks_running() -> AsyncIterator[anyio.abc.TaskGroup]:
    async with anyio.create_task_group() as tg:
        yield tg
        tg.cancel_scope.cancel()


async def settle(alerts: Alerts, limit: float = 10.0) -> None:
    with anyio.fail_after(limit):
        await alerts.flush()


# --- a local webhook receiver --------------------------------------------------------------------


@dataclass
class Hook:
    url: str
    status: int = 200
    delay: float = 0.0
    bodies: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    hits: int = 0
    release: threading.Event = field(default_factory=threading.Event)


@pytest.fixture
def hook() -> Iterator[Hook]:
    state = Hook(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            raw = self.rfile.read(length)
            state.hits += 1
            state.headers.append(dict(self.headers.items()))
            state.bodies.append(json.loads(raw))
            if state.delay:
                state.release.wait(state.delay)
            try:
                self.send_response(state.status)
                self.send_header("Content-Length", "0")
                self.end_headers()
            except OSError:
                pass  # the client gave up (timeout test)

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.block_on_close = False
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hook?token=t0ps3cret"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)  # fmt: skip
    thread.start()
    try:
        yield state
    finally:
        state.release.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# --- raise and resolve ---------------------------------------------------------------------------


async def test_one_alert_per_condition_per_window(store: Store, clock: VirtualClock) -> None:
    w1 = await open_window(store, clock, "w1")
    w2 = await open_window(store, clock, "w2", offset=1)
    alerts = make(store, clock)
    detail = {"session": w1.id}
    assert await alerts.raise_alert("budget_exhausted", session_id=w1.id, detail=detail)
    assert not await alerts.raise_alert("budget_exhausted", session_id=w1.id, detail=detail)
    assert await alerts.raise_alert("budget_exhausted", session_id=w2.id, detail={"session": w2.id})
    assert not await alerts.raise_alert("budget_exhausted", session_id=w2.id, detail={})

    one = await kinds(store, w1.id, ev.ALERT)
    assert [(e.reason, e.payload, e.state_bearing) for e in one] == [
        ("budget_exhausted", detail, True)
    ]
    assert one[0].command_id == derive_id("alert", FLEET, "budget_exhausted", w1.id)
    assert len(await kinds(store, w2.id, ev.ALERT)) == 1
    # another condition in the same window is its own alert
    assert await alerts.raise_alert("worker_quarantined", session_id=w1.id, detail={"worker": "a"})
    assert len(await kinds(store, w1.id, ev.ALERT)) == 2


async def test_fleet_alert_goes_to_the_system_stream(store: Store, clock: VirtualClock) -> None:
    alerts = make(store, clock)
    assert await alerts.raise_alert(
        "killswitch_engaged", session_id=None, detail={"mode": "halt_all"}
    )
    assert not await alerts.raise_alert("killswitch_engaged", session_id=None, detail={})
    events = await kinds(store, system_stream(FLEET), ev.ALERT)
    assert [(e.reason, e.payload) for e in events] == [("killswitch_engaged", {"mode": "halt_all"})]
    assert events[0].command_id == derive_id("alert", FLEET, "killswitch_engaged", "fleet")


async def test_resolve_only_after_raise_then_a_new_episode(
    store: Store, clock: VirtualClock
) -> None:
    alerts = make(store, clock)
    stream = system_stream(FLEET)
    assert not await alerts.resolve("killswitch_engaged", session_id=None, detail={})
    assert await kinds(store, stream, ev.ALERT, ev.ALERT_RESOLVED) == []

    assert await alerts.raise_alert("killswitch_engaged", session_id=None, detail={"n": 1})
    assert await alerts.resolve("killswitch_engaged", session_id=None, detail={"by": "ops"})
    assert not await alerts.resolve("killswitch_engaged", session_id=None, detail={})
    # raised again after the resolve: a new alert, resolvable again
    assert await alerts.raise_alert("killswitch_engaged", session_id=None, detail={"n": 2})
    assert not await alerts.raise_alert("killswitch_engaged", session_id=None, detail={"n": 3})
    # a fresh Alerts (a restart, or another host) sees the same state in the store
    again = make(store, clock)
    assert not await again.raise_alert("killswitch_engaged", session_id=None, detail={"n": 4})
    assert await again.resolve("killswitch_engaged", session_id=None, detail={})
    assert not await alerts.resolve("killswitch_engaged", session_id=None, detail={})

    events = await kinds(store, stream, ev.ALERT, ev.ALERT_RESOLVED)
    assert [(e.kind, e.reason) for e in events] == [
        (ev.ALERT, "killswitch_engaged"),
        (ev.ALERT_RESOLVED, "killswitch_engaged"),
        (ev.ALERT, "killswitch_engaged"),
        (ev.ALERT_RESOLVED, "killswitch_engaged"),
    ]
    assert [e.payload for e in events] == [{"n": 1}, {"by": "ops"}, {"n": 2}, {}]
    assert len({e.command_id for e in events}) == 4


async def test_unserializable_detail_never_raises(store: Store, clock: VirtualClock) -> None:
    alerts = make(store, clock)
    detail = {"when": clock.now(), "path": Path("/x"), "bad": float("nan")}
    assert await alerts.raise_alert("recovery_in_doubt", session_id=None, detail=detail)
    (event,) = await kinds(store, system_stream(FLEET), ev.ALERT)
    assert "detail" in event.payload  # the repr stands in for what JSON cannot carry


# --- evaluated: approvals ------------------------------------------------------------------------


async def request(approvals: Approvals, session: Session, key: str) -> str:
    row = await approvals.request(
        key=key, action=Action(name="deploy", params={"key": key}, risk="high"), worker="w1",
        session_id=session.id, escalate_now=False, correlation_id=None,
    )  # fmt: skip
    return row.id


async def test_approval_age_and_backlog(store: Store, clock: VirtualClock) -> None:
    session = await open_window(store, clock, "w1")
    approvals = Approvals(store, EscalationChain.from_config(None), FLEET)
    alerts = make(store, clock, approval_age=30 * 60, approval_backlog=2)
    stream = system_stream(FLEET)

    await alerts.evaluate()  # nothing pending: nothing to say
    assert await kinds(store, stream, ev.ALERT, ev.ALERT_RESOLVED) == []

    first = await request(approvals, session, "a")
    clock.advance(timedelta(minutes=10))
    second = await request(approvals, session, "b")
    await alerts.evaluate()
    assert alerts.pending_approvals == 2
    assert await kinds(store, stream, ev.ALERT) == []  # young, and not above the backlog

    clock.advance(timedelta(minutes=21))  # the oldest is 31 minutes old
    third = await request(approvals, session, "c")
    await alerts.evaluate()
    await alerts.evaluate()  # the same state again: no second alert
    raised = await kinds(store, stream, ev.ALERT)
    assert sorted(e.reason or "" for e in raised) == ["approval_age", "approval_backlog"]
    age = next(e for e in raised if e.reason == "approval_age")
    assert age.payload["pending"] == 3
    assert age.payload["oldest_age_seconds"] == pytest.approx(31 * 60)

    # deciding the oldest clears the age (the next is 21 min old) and the backlog (2 <= 2)
    await approvals.decide(first, approve=True, by="ops", reason=None)
    await alerts.evaluate()
    resolved = await kinds(store, stream, ev.ALERT_RESOLVED)
    assert sorted(e.reason or "" for e in resolved) == ["approval_age", "approval_backlog"]
    await alerts.evaluate()
    assert len(await kinds(store, stream, ev.ALERT_RESOLVED)) == 2

    # it comes back: a new alert after the resolve
    clock.advance(timedelta(minutes=10))  # "b" is 31 minutes old
    await alerts.evaluate()
    again = await kinds(store, stream, ev.ALERT)
    assert [e.reason for e in again].count("approval_age") == 2
    await approvals.decide(second, approve=False, by="ops", reason="no")
    await approvals.decide(third, approve=True, by="ops", reason=None)
    await alerts.evaluate()
    assert alerts.pending_approvals == 0
    resolved = await kinds(store, stream, ev.ALERT_RESOLVED)
    assert [e.reason for e in resolved].count("approval_age") == 2


# --- evaluated: rate change ----------------------------------------------------------------------


async def window_with(
    store: Store,
    clock: VirtualClock,
    key: str,
    offset: int,
    counts: dict[str, int],
    close: bool = True,
) -> Session:
    session = await open_window(store, clock, key, offset)
    for kind, n in counts.items():
        for _ in range(n):
            await store.append(NewEvent(kind=kind, session_id=session.id))
    if close:
        await store.close_window(session.id, by="test")
    return session


def rates(denied: int, started: int, requested: int, granted: int) -> dict[str, int]:
    return {ev.ACTION_DENIED: denied, ev.ACTION_STARTED: started,
            ev.APPROVAL_REQUESTED: requested, ev.APPROVAL_GRANTED: granted}  # fmt: skip


async def test_rate_change_against_trailing_windows(store: Store, clock: VirtualClock) -> None:
    alerts = make(store, clock, rate_min_samples=10, trailing_windows=3, rate_change=0.3)
    # an old window beyond the trailing three (its wild rates must not count)
    await window_with(store, clock, "w0", 0, rates(20, 0, 10, 0))
    for i in (1, 2, 3):  # denial rate 0.1, approval rate 0.9
        await window_with(store, clock, f"w{i}", i, rates(2, 18, 10, 9))
    await window_with(store, clock, "w4-quiet", 4, rates(1, 2, 1, 1))  # too few samples: skipped
    await window_with(store, clock, "w5", 5, rates(1, 19, 10, 10))  # 0.05 and 1.0
    current = await window_with(store, clock, "w6", 6, rates(12, 8, 10, 2))  # 0.6 and 0.2
    # a later window does not count as trailing
    await window_with(store, clock, "w7", 7, rates(0, 30, 10, 10))

    await alerts.on_window_closed(current.id)
    await alerts.on_window_closed(current.id)  # once per window
    events = await kinds(store, current.id, ev.ALERT)
    by = {e.reason or "": e.payload for e in events}
    assert sorted(by) == ["approval_rate_change", "denial_rate_change"]
    # the last three closed windows before w6 are w5, w4 and w3; w4 has too few samples
    assert by["denial_rate_change"]["rate"] == pytest.approx(0.6)
    assert by["denial_rate_change"]["trailing_mean"] == pytest.approx((0.1 + 0.05) / 2)
    assert by["denial_rate_change"]["samples"] == 20
    assert by["approval_rate_change"]["rate"] == pytest.approx(0.2)
    assert by["approval_rate_change"]["trailing_mean"] == pytest.approx((0.9 + 1.0) / 2)
    assert by["approval_rate_change"]["trailing_windows"] == 2


async def test_rate_change_needs_samples_history_and_a_change(
    store: Store, clock: VirtualClock
) -> None:
    alerts = make(store, clock, rate_min_samples=10, trailing_windows=6, rate_change=0.3)
    first = await window_with(store, clock, "w1", 0, rates(15, 5, 10, 0))
    await alerts.on_window_closed(first.id)  # no trailing window: no comparison
    few = await window_with(store, clock, "w2", 1, rates(1, 8, 9, 9))
    await alerts.on_window_closed(few.id)  # below rate_min_samples (9 decisions, 9 requests)
    same = await window_with(store, clock, "w3", 2, rates(12, 8, 10, 1))  # 0.6 vs 0.75: small
    await alerts.on_window_closed(same.id)
    await alerts.on_window_closed("no-such-session")
    for session in (first, few, same):
        assert await kinds(store, session.id, ev.ALERT) == []


# --- a failing store -----------------------------------------------------------------------------


async def test_state_write_failure_still_logs_and_delivers(
    store: Store, clock: VirtualClock, hook: Hook, sinks_running: anyio.abc.TaskGroup,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    alerts = make(store, clock, WebhookSink(url=hook.url, timeout=2.0, retries=0))
    await sinks_running.start(alerts.run_sinks)

    async def broken_once(command_id: str, event: NewEvent) -> bool:
        raise StateWriteError("disk I/O error")

    monkeypatch.setattr(store, "once", broken_once)
    detail = {"error": "disk I/O error"}
    assert await alerts.raise_alert("state_write_failed", session_id=None, detail=detail) is False
    # the same unrecorded alert is not pushed again while the store keeps failing
    assert await alerts.raise_alert("state_write_failed", session_id=None, detail=detail) is False
    await settle(alerts)
    assert [(b["condition"], b["state"]) for b in hook.bodies] == [("state_write_failed", "raised")]
    monkeypatch.undo()
    assert await kinds(store, system_stream(FLEET), ev.ALERT) == []

    # the store is back and the condition cleared: the sinks hear it is over
    assert not await alerts.resolve("state_write_failed", session_id=None, detail={})
    await settle(alerts)
    assert [(b["condition"], b["state"]) for b in hook.bodies] == [
        ("state_write_failed", "raised"),
        ("state_write_failed", "resolved"),
    ]
    alerts.close()


# --- sinks ---------------------------------------------------------------------------------------


async def test_webhook_receives_json(
    store: Store, clock: VirtualClock, hook: Hook, sinks_running: anyio.abc.TaskGroup
) -> None:
    alerts = make(store, clock, WebhookSink(url=hook.url, timeout=2.0, retries=0))
    await sinks_running.start(alerts.run_sinks)
    session = await open_window(store, clock, "w1")
    assert await alerts.raise_alert("budget_exhausted", session_id=session.id,
                                    detail={"session": session.id, "used": 10.5})  # fmt: skip
    assert await alerts.resolve("budget_exhausted", session_id=session.id, detail={"ok": True})
    assert await alerts.raise_alert("worker_quarantined", session_id=None, detail={"worker": "w"})
    await settle(alerts)
    assert hook.bodies == [
        {"fleet": FLEET, "condition": "budget_exhausted", "state": "raised",
         "session_id": session.id, "detail": {"session": session.id, "used": 10.5},
         "at": clock.now().isoformat()},
        {"fleet": FLEET, "condition": "budget_exhausted", "state": "resolved",
         "session_id": session.id, "detail": {"ok": True}, "at": clock.now().isoformat()},
        {"fleet": FLEET, "condition": "worker_quarantined", "state": "raised",
         "session_id": None, "detail": {"worker": "w"}, "at": clock.now().isoformat()},
    ]  # fmt: skip
    assert all(h["Content-Type"] == "application/json" for h in hook.headers)
    assert (alerts.delivered, alerts.failed, alerts.dropped) == (3, 0, 0)
    alerts.close()


async def test_webhook_500_is_retried_then_recorded_as_failed(
    store: Store, clock: VirtualClock, hook: Hook, sinks_running: anyio.abc.TaskGroup
) -> None:
    hook.status = 500
    alerts = make(store, clock, WebhookSink(url=hook.url, timeout=2.0, retries=2))
    await sinks_running.start(alerts.run_sinks)
    started = time.monotonic()
    assert await alerts.raise_alert("restart_intensity", session_id=None, detail={"worker": "w"})
    assert time.monotonic() - started < 0.5
    await settle(alerts)
    assert hook.hits == 3  # the first attempt and two retries
    assert (alerts.delivered, alerts.failed) == (0, 1)
    (failed,) = await kinds(store, system_stream(FLEET), ev.ALERT_DELIVERY_FAILED)
    assert failed.state_bearing and failed.reason == "restart_intensity"
    assert failed.payload["error"] == "HTTP 500"
    assert failed.payload["attempts"] == 3
    assert failed.payload["state"] == "raised"
    assert "t0ps3cret" not in json.dumps(failed.payload)  # the URL's token is not recorded
    alerts.close()


async def test_webhook_timeout_does_not_block_the_caller(
    store: Store, clock: VirtualClock, hook: Hook, sinks_running: anyio.abc.TaskGroup
) -> None:
    hook.delay = 5.0
    alerts = make(store, clock, WebhookSink(url=hook.url, timeout=0.3, retries=1))
    await sinks_running.start(alerts.run_sinks)
    session = await open_window(store, clock, "w1")
    started = time.monotonic()
    assert await alerts.raise_alert("budget_exhausted", session_id=session.id, detail={})
    assert await alerts.raise_alert("token_budget_exhausted", session_id=session.id, detail={})
    assert time.monotonic() - started < 0.5  # the sink is slow, the caller is not
    await settle(alerts)
    assert hook.hits == 4
    assert (alerts.delivered, alerts.failed) == (0, 2)
    failures = await kinds(store, session.id, ev.ALERT_DELIVERY_FAILED)
    assert sorted(e.reason or "" for e in failures) == [
        "budget_exhausted",
        "token_budget_exhausted",
    ]
    assert all(e.payload["error"] == "timed out after 0.3s" for e in failures)
    alerts.close()


def sink_script(tmp_path: Path) -> tuple[list[str], Path]:
    out = tmp_path / "received.jsonl"
    script = tmp_path / "sink.py"
    script.write_text(
        "import sys\n"
        "data = sys.stdin.buffer.read()\n"
        "with open(sys.argv[1], 'ab') as f:\n"
        "    f.write(data + b'\\n')\n"
    )
    return [sys.executable, str(script), str(out)], out


async def test_command_sink_gets_json_on_stdin(
    store: Store, clock: VirtualClock, tmp_path: Path, sinks_running: anyio.abc.TaskGroup
) -> None:
    argv, out = sink_script(tmp_path)
    alerts = make(store, clock, CommandSink(argv=tuple(argv), timeout=30.0))
    await sinks_running.start(alerts.run_sinks)
    assert await alerts.raise_alert("recovery_in_doubt", session_id=None, detail={"actions": 2})
    assert await alerts.resolve("recovery_in_doubt", session_id=None, detail={})
    await settle(alerts, limit=60)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(b["condition"], b["state"], b["detail"]) for b in lines] == [
        ("recovery_in_doubt", "raised", {"actions": 2}),
        ("recovery_in_doubt", "resolved", {}),
    ]
    assert lines[0]["fleet"] == FLEET and lines[0]["session_id"] is None
    assert (alerts.delivered, alerts.failed) == (2, 0)
    alerts.close()


async def test_failing_command_is_recorded(
    store: Store, clock: VirtualClock, sinks_running: anyio.abc.TaskGroup
) -> None:
    argv = (
        sys.executable,
        "-c",
        "import sys; sys.stdin.read(); sys.stderr.write('nope'); sys.exit(1)",
    )
    alerts = make(store, clock, CommandSink(argv=argv, timeout=30.0, retries=1))
    await sinks_running.start(alerts.run_sinks)
    assert await alerts.raise_alert("worker_quarantined", session_id=None, detail={"worker": "w"})
    await settle(alerts, limit=60)
    assert (alerts.delivered, alerts.failed) == (0, 1)
    (failed,) = await kinds(store, system_stream(FLEET), ev.ALERT_DELIVERY_FAILED)
    assert failed.payload["error"] == "exit status 1: nope"
    assert failed.payload["attempts"] == 2
    assert failed.payload["sink"] == f"command {sys.executable}"
    alerts.close()


async def test_command_timeout_kills_it(
    store: Store, clock: VirtualClock, sinks_running: anyio.abc.TaskGroup
) -> None:
    argv = (sys.executable, "-c", "import time; time.sleep(30)")
    alerts = make(store, clock, CommandSink(argv=argv, timeout=0.5))
    await sinks_running.start(alerts.run_sinks)
    assert await alerts.raise_alert("worker_quarantined", session_id=None, detail={})
    await settle(alerts, limit=20)
    (failed,) = await kinds(store, system_stream(FLEET), ev.ALERT_DELIVERY_FAILED)
    assert failed.payload["error"] == "timed out after 0.5s"
    alerts.close()


async def test_full_queue_drops_and_never_blocks(
    store: Store, clock: VirtualClock, hook: Hook
) -> None:
    cfg = AlertConfig(sinks=(WebhookSink(url=hook.url, timeout=1.0, retries=0),))
    alerts = Alerts(store, fleet=FLEET, config=cfg, clock=clock, queue_size=2)
    session = await open_window(store, clock, "w1")
    started = time.monotonic()
    conditions = ["budget_exhausted", "token_budget_exhausted", "worker_quarantined",
                  "restart_intensity", "recovery_in_doubt"]  # fmt: skip
    with anyio.fail_after(5):
        for condition in conditions:  # the sinks are not running: nothing drains the queue
            assert await alerts.raise_alert(condition, session_id=session.id, detail={})
    assert time.monotonic() - started < 2
    assert alerts.dropped == 3 and alerts.queued == 2
    # every alert is recorded even though its delivery was dropped
    assert len(await kinds(store, session.id, ev.ALERT)) == 5

    async with anyio.create_task_group() as tg:
        await tg.start(alerts.run_sinks)
        await settle(alerts)
        alerts.close()  # run_sinks ends once drained
    assert [b["condition"] for b in hook.bodies] == conditions[:2]
    assert (alerts.delivered, alerts.dropped) == (2, 3)
    # after close, later deliveries are dropped, not raised
    assert await alerts.raise_alert("approval_backlog", session_id=None, detail={})
    assert alerts.dropped == 4


async def test_no_sinks(store: Store, clock: VirtualClock) -> None:
    alerts = make(store, clock)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await tg.start(alerts.run_sinks)  # nothing to drain: returns
    assert await alerts.raise_alert("budget_exhausted", session_id=None, detail={})
    assert alerts.queued == 0 and alerts.dropped == 0
    await settle(alerts)


async def test_close_before_the_sinks_ran_drops_what_is_queued(
    store: Store, clock: VirtualClock, hook: Hook
) -> None:
    alerts = make(store, clock, WebhookSink(url=hook.url, timeout=1.0, retries=0))
    assert await alerts.raise_alert("budget_exhausted", session_id=None, detail={})
    assert alerts.queued == 1
    alerts.close()
    assert (alerts.queued, alerts.dropped) == (0, 1)
    await settle(alerts, limit=1)  # nothing left to wait for
    async with anyio.create_task_group() as tg:
        await tg.start(alerts.run_sinks)  # closed: nothing to run, returns
    assert hook.hits == 0
