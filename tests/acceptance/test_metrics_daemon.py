"""Metrics from the real daemon: restart and quarantine counters of a crashing worker, and the
age of a pending approval growing between two scrapes (computed when scraped)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.waiting import eventually_sync

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.acceptance

WORKERS = """
from supervisor import CycleContext, Worker


class Crasher(Worker):
    async def cycle(self, ctx: CycleContext) -> None:
        raise RuntimeError("boom")


class Asker(Worker):
    async def cycle(self, ctx: CycleContext) -> None:
        async with ctx.guard("db.drop", params={"table": "t"}, risk="high", idempotency_key="drop-t"):
            pass
"""

CONFIG = """
[daemon]
fleet = "metered"
profile = "hour"
shutdown_timeout = "2s"
[horizons.hour]
cycle_every = "100ms"
[metrics]
enabled = true
port = 0
[[workers]]
name = "crasher"
class = "metered_workers:Crasher"
max_restarts = 1
restart_window = "1m"
quarantine_for = "1m"
backoff = { initial = "50ms", max = "100ms" }
[[workers]]
name = "asker"
class = "metered_workers:Asker"
"""


def value(text: str, series: str) -> float | None:
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text: str = resp.read().decode()
    return text


def test_counters_and_approval_age_from_the_real_daemon(tmp_path: Path) -> None:
    (tmp_path / "metered_workers.py").write_text(WORKERS)
    (tmp_path / "config.toml").write_text(CONFIG)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACP_")}
    env.update(ACP_KILLSWITCH_SECRET="metrics-acceptance", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "supervisor", "--config", "config.toml", "--state-dir", "s", "run"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        port = None
        deadline = time.monotonic() + 20
        while port is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            found = re.search(
                r'"metrics.serving".*"port": (\d+)|"port": (\d+).*"metrics.serving"', line
            )
            if found:
                port = int(found.group(1) or found.group(2))
        assert port, "the daemon never said where it serves metrics"
        threading.Thread(target=lambda: [None for _ in proc.stdout or []], daemon=True).start()

        served: int = port  # (for the closures below: no longer optional)

        def counted() -> tuple[str, float, float, float] | None:
            text = scrape(served)
            restarts = value(text, 'acp_worker_restarts_total{worker="crasher"}')
            quarantines = value(text, 'acp_worker_quarantines_total{worker="crasher"}')
            age = value(text, "acp_oldest_pending_approval_seconds")
            if restarts and quarantines and age:
                return text, restarts, quarantines, age
            return None

        text, restarts, quarantines, age = eventually_sync(
            counted, "the crasher's restarts and quarantine and a pending approval's age",
            every=0.1, context=lambda: scrape(served),
        )  # fmt: skip
        assert restarts >= 1 and quarantines == 1
        assert value(text, "acp_approvals_pending") == 1
        time.sleep(1.5)  # the age is the scrape's own: it grows with the wall clock
        later = value(scrape(port), "acp_oldest_pending_approval_seconds")
        assert later is not None and later >= age + 1.0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        proc.kill()
        proc.wait()
