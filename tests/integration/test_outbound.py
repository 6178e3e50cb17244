"""What leaves the daemon carries no secrets: alert commands get a scrubbed environment, webhook
URLs with credentials are redacted in logs and stored errors, redirects are not followed, and a
signature header lets the receiver check the sender."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from supervisor.errors import ConfigError
from supervisor.ops.alerts import AlertConfig, Alerts, CommandSink, WebhookSink
from supervisor.store import Store, system_stream
from supervisor.timing.clock import VirtualClock

pytestmark = pytest.mark.anyio
FLEET = "out"


class Receiver:
    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.status = 200
        self.location = ""


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, int]]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            state.requests.append(
                (self.path, {k.lower(): v for k, v in self.headers.items()}, body)
            )
            self.send_response(state.status)
            if state.location:
                self.send_header("Location", state.location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)  # fmt: skip
    thread.start()
    try:
        yield state, server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
async def running() -> AsyncIterator[anyio.abc.TaskGroup]:
    async with anyio.create_task_group() as tg:
        yield tg
        tg.cancel_scope.cancel()


async def deliver(store: Store, clock: VirtualClock, tg: anyio.abc.TaskGroup, sink: Any) -> Alerts:
    alerts = Alerts(
        store, fleet=FLEET, config=AlertConfig(sinks=(sink,)), clock=clock, backoff=0.01
    )
    await tg.start(alerts.run_sinks)
    await alerts.raise_alert("worker_cap", session_id=None, detail={"cap": "approval_cap"})
    with anyio.fail_after(10):
        await alerts.flush()
    return alerts


async def test_the_body_is_signed_with_the_configured_secret(
    store: Store, clock: VirtualClock, receiver: tuple[Receiver, int], running: anyio.abc.TaskGroup,
    tmp_path: Path,
) -> None:  # fmt: skip
    state, port = receiver
    (tmp_path / "hook.secret").write_text("s3cret-key\n")
    cfg = AlertConfig.from_config({"sinks": [{"type": "webhook", "url": f"http://127.0.0.1:{port}/h",
                                              "signing_secret_file": str(tmp_path / "hook.secret")}]})  # fmt: skip
    alerts = await deliver(store, clock, running, cfg.sinks[0])
    assert alerts.delivered == 1
    _path, headers, body = state.requests[0]
    expected = hmac.new(b"s3cret-key", body, hashlib.sha256).hexdigest()
    assert headers["x-acp-signature"] == f"sha256={expected}"
    alerts.close()


def test_an_unreadable_signing_secret_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="signing_secret_file: cannot read"):
        AlertConfig.from_config({"sinks": [{"type": "webhook", "url": "https://h.example/x",
                                            "signing_secret_file": str(tmp_path / "none")}]})  # fmt: skip


async def test_redirects_are_not_followed_and_credentials_never_logged_or_stored(
    store: Store, clock: VirtualClock, receiver: tuple[Receiver, int], running: anyio.abc.TaskGroup,
) -> None:  # fmt: skip
    state, port = receiver
    state.status, state.location = 302, f"http://127.0.0.1:{port}/elsewhere"
    url = f"http://127.0.0.1:{port}/hook?token=t0ps3cret"
    with capture_logs() as logs:
        alerts = await deliver(store, clock, running, WebhookSink(url=url, timeout=2.0, retries=0))
    assert [p for p, _h, _b in state.requests] == ["/hook?token=t0ps3cret"]  # not /elsewhere
    assert alerts.failed == 1
    stored = [
        e for e in await store.replay(system_stream(FLEET)) if e.kind == "ALERT_DELIVERY_FAILED"
    ]
    assert stored[0].payload["error"] == "HTTP 302"
    assert "t0ps3cret" not in json.dumps([stored[0].payload, logs], default=str)
    alerts.close()


def test_errors_quoting_the_url_are_redacted() -> None:
    sink = WebhookSink(url="https://bot:hunter2@hooks.example/x?key=abc123")
    message = sink.redact("URLError: cannot reach https://bot:hunter2@hooks.example/x?key=abc123")
    assert "hunter2" not in message and "abc123" not in message and "bot" not in message
    assert "hooks.example/x" in message


async def test_an_alert_command_gets_a_scrubbed_environment(
    store: Store, clock: VirtualClock, running: anyio.abc.TaskGroup, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("ACP_KILLSWITCH_SECRET", "never-to-a-sink")
    monkeypatch.setenv("PGPASSWORD", "db-password")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "cloud-key")
    out = tmp_path / "env.json"
    script = (
        "import json, os, sys; sys.stdin.read(); "
        "caps = [l for l in open('/proc/self/status') if l.startswith(('CapEff', 'CapAmb', 'NoNew'))]; "
        "json.dump({'env': dict(os.environ), 'caps': caps}, open(sys.argv[1], 'w'))"
    )
    sink = CommandSink(argv=(sys.executable, "-c", script, str(out)), timeout=30.0)
    alerts = await deliver(store, clock, running, sink)
    assert alerts.delivered == 1
    seen = json.loads(out.read_text())
    env = seen["env"]
    # None of the daemon's capabilities either (a service holds CAP_SETUID, CAP_SETGID, CAP_KILL).
    caps = dict(line.strip().split(":\t") for line in seen["caps"])
    assert (
        int(caps["CapEff"], 16) == 0 and int(caps["CapAmb"], 16) == 0 and caps["NoNewPrivs"] == "1"
    )
    assert not [
        k for k in env if k.startswith("ACP_") or k in ("PGPASSWORD", "AWS_SECRET_ACCESS_KEY")
    ]
    assert env.get("PATH") == os.environ["PATH"]
    alerts.close()
