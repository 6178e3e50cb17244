"""Alerts and metrics from the real daemon: a webhook in this test receives the kill-switch alert,
and the daemon serves /metrics and /healthz while it runs."""

from __future__ import annotations

import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.waiting import eventually_sync

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.acceptance
SECRET = "alerts-acceptance-secret"

CONFIG = """
[daemon]
fleet = "alerting"
profile = "hour"
shutdown_timeout = "3s"
[horizons.hour]
cycle_every = "100ms"
[metrics]
enabled = true
port = 0
[alerts]
evaluate_every = "1s"
[[alerts.sinks]]
type = "webhook"
url = "http://127.0.0.1:{port}/hook"
timeout = "2s"
retries = 1
[[workers]]
name = "support"
class = "workers.support:SupportAgent"
"""


class Hook(http.server.BaseHTTPRequestHandler):
    received: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Hook.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *_args: Any) -> None:
        pass


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text: str = resp.read().decode()
    return text


@pytest.fixture
def webhook() -> Iterator[int]:
    Hook.received = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_webhook_alert_and_metrics_from_the_real_daemon(tmp_path: Path, webhook: int) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(CONFIG.format(port=webhook))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACP_")}
    env.update(ACP_KILLSWITCH_SECRET=SECRET, PYTHONPATH=str(ROOT))
    base = [
        sys.executable,
        "-m",
        "supervisor",
        "--config",
        str(cfg),
        "--state-dir",
        str(tmp_path / "s"),
    ]
    proc = subprocess.Popen(
        [*base, "run"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        assert proc.stderr is not None
        port = None
        deadline = time.monotonic() + 20
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if b'"metrics.serving"' in line:
                port = json.loads(line)["port"]
        assert port, "the daemon never said where it serves metrics"
        threading.Thread(target=lambda: [None for _ in proc.stderr or []], daemon=True).start()

        served: int = port  # (for the closures below: no longer optional)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
            assert resp.status == 200 and json.loads(resp.read())["ok"] is True

        def metrics_with(*lines: str) -> Callable[[], str | None]:
            """A probe: the /metrics text once it has all of `lines`."""

            def probe() -> str | None:
                text = scrape(served)
                return text if all(line in text for line in lines) else None

            return probe

        text = eventually_sync(
            metrics_with('acp_workers{state="running"} 1.0', "acp_gate_latency_seconds_count",
                         'acp_killswitch_mode{mode="disengaged"} 1.0'),
            "a running worker, a gate latency and a disengaged switch in /metrics", every=0.1,
            context=lambda: scrape(served),
        )  # fmt: skip

        engage = subprocess.run([*base, "killswitch", "engage", "--mode", "halt_all", "--reason", "drill",
                                 "--by", "tester"], cwd=ROOT, env=env, capture_output=True, text=True)  # fmt: skip
        assert engage.returncode == 0, engage.stderr
        alert = eventually_sync(
            lambda: next((a for a in Hook.received if a["condition"] == "killswitch_engaged"), None),
            "the kill-switch alert at the webhook", every=0.1,
            context=lambda: f"received: {Hook.received}",
        )  # fmt: skip
        assert alert["state"] == "raised" and alert["fleet"] == "alerting"
        assert alert["detail"]["by"] == "tester"

        def halted_and_delivered() -> str | None:
            text = scrape(served)
            halted = 'acp_killswitch_mode{mode="halt_all"} 1.0' in text
            sent = re.search(r'^acp_alert_deliveries_total\{result="sent"\} (\S+)$', text, re.M)
            return text if halted and sent and float(sent.group(1)) >= 1 else None

        # counted at scrape time from the daemon's own counts; Prometheus naming throughout
        text = eventually_sync(halted_and_delivered, "the halt and the alert's delivery in /metrics",
                               every=0.1, context=lambda: scrape(served))  # fmt: skip
        assert "acp_windows_opened_total 1.0" in text
        assert 'acp_build_info{python="' in text and "_created" not in text

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        proc.kill()
        proc.wait()
