"""The metrics endpoint over real HTTP: /metrics text, and /healthz that fails when the main loop
stops ticking or the store is failing, answered from its own thread."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from supervisor.ops.metrics import METRICS, Metrics, MetricsConfig, metrics_markdown
from tests.waiting import eventually_sync


@pytest.fixture
def metrics() -> Iterator[Metrics]:
    m = Metrics(MetricsConfig(enabled=True, host="127.0.0.1", port=0, stall_after=0.5))
    try:
        yield m
    finally:
        m.close()


def get(port: int, path: str) -> tuple[int, str, str]:
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers["Content-Type"], exc.read().decode()


def sample(text: str, name: str, labels: str = "") -> float:
    """The value of one series in the Prometheus text format."""
    series = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{series} not in:\n{text}")


def test_metrics_text(metrics: Metrics) -> None:
    port = metrics.serve()
    assert port > 0 and metrics.port == port
    metrics.set_workers({"running": 3, "backoff": 1})
    metrics.set_workers({"running": 2, "quarantined": 1})  # "backoff" went away: 0
    metrics.observe_action("succeeded")
    metrics.observe_action("succeeded")
    metrics.observe_action("denied", "policy")
    metrics.set_approvals(4, datetime.now(UTC) - timedelta(seconds=95.5))
    metrics.set_budget_used(cost=12.5, actions=7)
    for seconds in (0.0003, 0.002, 0.004, 2.0):
        metrics.observe_latency(seconds)
    metrics.set_killswitch_mode("halt_all")

    status, content_type, text = get(port, "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain")
    assert sample(text, "acp_workers", 'state="running"') == 2
    assert sample(text, "acp_workers", 'state="quarantined"') == 1
    assert sample(text, "acp_workers", 'state="backoff"') == 0
    assert sample(text, "acp_actions_total", 'outcome="succeeded",reason=""') == 2
    assert sample(text, "acp_actions_total", 'outcome="denied",reason="policy"') == 1
    assert sample(text, "acp_approvals_pending") == 4
    assert 95.5 <= sample(text, "acp_oldest_pending_approval_seconds") < 100
    assert sample(text, "acp_window_budget_used_cost") == 12.5
    assert sample(text, "acp_window_budget_used_actions") == 7
    assert sample(text, "acp_gate_latency_seconds_bucket", 'le="0.0005"') == 1
    assert sample(text, "acp_gate_latency_seconds_bucket", 'le="0.005"') == 3
    assert sample(text, "acp_gate_latency_seconds_bucket", 'le="1.0"') == 3
    assert sample(text, "acp_gate_latency_seconds_bucket", 'le="+Inf"') == 4
    assert sample(text, "acp_gate_latency_seconds_count") == 4
    assert sample(text, "acp_killswitch_mode", 'mode="halt_all"') == 1
    assert sample(text, "acp_killswitch_mode", 'mode="disengaged"') == 0
    assert sample(text, "acp_killswitch_mode", 'mode="emergency"') == 0
    assert sample(text, "acp_store_ok") == 1
    assert 0 <= sample(text, "acp_progress_age_seconds") < 5
    # its own registry: no process-global collectors (python_gc_*, process_*)
    assert "python_gc" not in text and "process_cpu" not in text

    metrics.set_approvals(0, None)
    metrics.set_killswitch_mode("disengaged")
    _status, _ct, text = get(port, "/metrics")
    assert sample(text, "acp_approvals_pending") == 0
    assert sample(text, "acp_killswitch_mode", 'mode="halt_all"') == 0
    assert sample(text, "acp_killswitch_mode", 'mode="disengaged"') == 1


def test_healthz(metrics: Metrics) -> None:
    port = metrics.serve()
    status, content_type, body = get(port, "/healthz")
    assert (status, content_type) == (200, "application/json")
    report: dict[str, Any] = json.loads(body)
    assert report["ok"] is True and report["store_ok"] is True

    time.sleep(0.7)  # longer than stall_after without a tick: the loop looks stuck
    status, _ct, body = get(port, "/healthz")
    assert status == 503
    report = json.loads(body)
    assert report["ok"] is False
    assert len(report["reasons"]) == 1 and report["reasons"][0].startswith("main loop stalled")

    metrics.tick()
    assert get(port, "/healthz")[0] == 200

    metrics.set_store_ok(False, "sqlite commit failed: disk I/O error")
    status, _ct, body = get(port, "/healthz")
    assert status == 503
    assert json.loads(body)["reasons"] == ["store failing: sqlite commit failed: disk I/O error"]
    _s, _c, text = get(port, "/metrics")
    assert sample(text, "acp_store_ok") == 0

    metrics.set_store_ok(True)
    metrics.tick()
    assert get(port, "/healthz")[0] == 200


def test_unknown_path_and_method(metrics: Metrics) -> None:
    port = metrics.serve()
    assert get(port, "/nope")[0] == 404
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=5)
    with info.value:
        assert info.value.code == 405


def test_close_stops_serving(metrics: Metrics) -> None:
    port = metrics.serve()
    assert metrics.serve() == port  # already serving: the same port
    metrics.close()
    metrics.close()  # idempotent
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)


def test_two_instances_do_not_share_a_registry() -> None:
    config = MetricsConfig(enabled=True, port=0)
    a, b = Metrics(config), Metrics(config)
    a.observe_action("succeeded")
    assert b"acp_actions_total" in a.render()
    assert 'outcome="succeeded"' not in b.render().decode()


@pytest.mark.anyio
async def test_healthz_answers_while_the_event_loop_is_blocked(metrics: Metrics) -> None:
    import threading

    port = metrics.serve()
    metrics.tick()
    answers: list[int] = []

    def probe() -> None:
        time.sleep(0.7)  # by now the loop below has been stuck for longer than stall_after
        answers.append(get(port, "/healthz")[0])

    thread = threading.Thread(target=probe)
    thread.start()
    # A stuck event loop (a blocking wait: nothing runs on it, nothing ticks) until the server's
    # own thread has answered, however late a loaded machine lets it.
    eventually_sync(lambda: answers, "/healthz answered while the loop is blocked")
    assert answers == [503]
    thread.join()
    metrics.tick()
    assert get(port, "/healthz")[0] == 200


def families(text: str) -> dict[str, str]:
    """Metric name -> type, from the `# TYPE` lines of the text format."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            found[name] = kind
    return found


def exercised() -> Metrics:
    m = Metrics(MetricsConfig(enabled=True, port=0))
    m.set_workers({"running": 1})
    m.observe_action("succeeded")
    m.observe_latency(0.001)
    m.set_approvals(1, datetime.now(UTC))
    m.count_from("acp_worker_restarts_total", lambda: {"w": 2})
    m.count_from("acp_alert_deliveries_total", lambda: {"sent": 1, "failed": 0})
    return m


def test_the_exposition_follows_prometheus_conventions() -> None:
    text = exercised().render().decode()
    assert "_created" not in text
    found = families(text)
    assert found == {d.name: d.kind for d in METRICS}  # the registry is the documented table
    for name, kind in found.items():
        assert name.startswith("acp_"), name
        assert (kind == "counter") == name.endswith("_total"), name
        if "second" in name or name.endswith(("_age", "_latency", "_duration")):
            assert name.endswith("_seconds") or name.endswith("_seconds_total"), name
    labels = {d.name: d.labels for d in METRICS}
    assert labels["acp_window_budget_used_cost"] == labels["acp_window_budget_used_actions"] == ()


def test_build_info() -> None:
    text = exercised().render().decode()
    line = next(x for x in text.splitlines() if x.startswith("acp_build_info{"))
    assert 'version="' in line and 'python="' in line and line.endswith(" 1.0")


def test_oldest_pending_approval_age_is_computed_at_scrape_time() -> None:
    t0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
    now = [t0 + timedelta(seconds=10)]
    m = Metrics(MetricsConfig(enabled=True, port=0), now=lambda: now[0])
    m.set_approvals(1, t0)
    assert sample(m.render().decode(), "acp_oldest_pending_approval_seconds") == 10
    now[0] = t0 + timedelta(minutes=5)  # no new reading from the store: the age still grows
    assert sample(m.render().decode(), "acp_oldest_pending_approval_seconds") == 300
    m.set_approvals(0, None)
    assert sample(m.render().decode(), "acp_oldest_pending_approval_seconds") == 0


def test_counters_are_read_from_their_sources_at_scrape_time() -> None:
    m = Metrics(MetricsConfig(enabled=True, port=0))
    text = m.render().decode()
    assert sample(text, "acp_windows_opened_total") == 0  # present before anything happened
    opened, restarts = {"": 1}, {"a": 1}
    deliveries = {"sent": 3, "failed": 1, "dropped": 0}
    m.count_from("acp_windows_opened_total", opened.copy)
    m.count_from("acp_worker_restarts_total", restarts.copy)
    m.count_from("acp_worker_quarantines_total", lambda: {"a": 1})
    m.count_from("acp_alert_deliveries_total", deliveries.copy)
    opened[""], restarts["b"] = 2, 4
    text = m.render().decode()
    assert sample(text, "acp_windows_opened_total") == 2
    assert sample(text, "acp_worker_restarts_total", 'worker="a"') == 1
    assert sample(text, "acp_worker_restarts_total", 'worker="b"') == 4
    assert sample(text, "acp_worker_quarantines_total", 'worker="a"') == 1
    assert sample(text, "acp_alert_deliveries_total", 'result="sent"') == 3
    assert sample(text, "acp_alert_deliveries_total", 'result="failed"') == 1
    with pytest.raises(ValueError, match="not a scraped counter"):
        m.count_from("acp_workers", dict)


def test_docs_metrics_md_is_generated_from_the_table() -> None:
    from pathlib import Path

    doc = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
    assert doc.read_text(encoding="utf-8") == metrics_markdown(), (
        "docs/metrics.md is stale: python -m supervisor.docgen"
    )


def test_the_listener_holds_a_bounded_number_of_connections_with_read_timeouts() -> None:
    """Idle connections (sending nothing) cannot pile up threads: at most max_connections are
    held, each dropped after read_timeout; the listener answers again once they are gone."""
    import socket
    import threading

    m = Metrics(MetricsConfig(enabled=True, host="127.0.0.1", port=0, max_connections=4,
                              read_timeout=0.5))  # fmt: skip
    port = m.serve()
    before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]
    try:
        eventually_sync(lambda: m._server is None or getattr(m._server, "refused", 0) >= 36,
                        "36 of the 40 idle connections refused",
                        context=lambda: f"refused: {getattr(m._server, 'refused', 0)}")  # fmt: skip
        assert threading.active_count() - before <= 4
        for s in idle:  # every one is closed by the daemon: refused at once, or timed out
            s.settimeout(5)
            assert s.recv(1) == b""
    finally:
        for s in idle:
            s.close()
    status, _type, _body = get(port, "/healthz")
    assert status in (200, 503)
    m.close()


def test_a_client_trickling_its_request_is_dropped_after_read_timeout_in_all() -> None:
    """A byte every so often keeps each read under read_timeout: without a bound on the whole
    request, a few such clients (a worker on the same host) held every slot, and /healthz never
    answered again."""
    import contextlib
    import socket
    import threading

    m = Metrics(MetricsConfig(enabled=True, host="127.0.0.1", port=0, max_connections=2,
                              read_timeout=0.5))  # fmt: skip
    port = m.serve()
    slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
    stop = threading.Event()

    def trickle() -> None:
        while not stop.is_set():
            for s in slow:
                with contextlib.suppress(OSError):
                    s.send(b"X")
            stop.wait(0.2)

    feeder = threading.Thread(target=trickle, daemon=True)
    feeder.start()
    try:
        for s in slow:  # each is cut once read_timeout has passed since it connected
            s.settimeout(5)
            started = time.monotonic()
            try:
                while s.recv(64):
                    pass
            except ConnectionResetError:
                pass
            assert time.monotonic() - started < 3

        def answered() -> int | None:
            try:
                return get(port, "/healthz")[0]
            except OSError:  # refused while the slots are still taken
                return None

        # their threads end and give the slots back
        status = eventually_sync(answered, "/healthz answering once the slots are given back")
        assert status in (200, 503)
    finally:
        stop.set()
        feeder.join(2)
        for s in slow:
            s.close()
        m.close()
