"""The real daemon under a fake systemd: NOTIFY_SOCKET is a datagram socket this test reads."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.acceptance

CONFIG = """
[daemon]
fleet = "sd"
profile = "hour"
shutdown_timeout = "5s"
[horizons.hour]
cycle_every = "200ms"
[[workers]]
name = "staller"
class = "tests.acceptance.stall_worker:StallWorker"
cycle_deadline = "30s"
params = {{ stall_file = "{stall}" }}
"""


class Notifications:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.received: list[tuple[float, str]] = []

    def drain(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.received.append((time.monotonic(), data.decode()))

    def wait_for(self, field: str, seconds: float = 15.0) -> float:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for at, message in self.received:
                if field in message.split("\n"):
                    return at
            self.drain(0.1)
        raise AssertionError(f"no {field} within {seconds}s; got {[m for _, m in self.received]}")

    def kinds(self) -> list[str]:
        out = []
        for _at, message in self.received:
            for line in message.split("\n"):
                key = line.split("=", 1)[0]
                if key in ("READY", "STATUS", "WATCHDOG", "STOPPING", "RELOADING") and (
                    not out or out[-1] != key
                ):
                    out.append(key)
        return out


@pytest.fixture
def notify_socket() -> Iterator[tuple[str, Notifications]]:
    folder = tempfile.mkdtemp(dir="/tmp", prefix="sd")
    path = os.path.join(folder, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    try:
        yield path, Notifications(sock)
    finally:
        sock.close()
        os.unlink(path)
        os.rmdir(folder)


def start(tmp_path: Path, socket_path: str, stall: Path) -> subprocess.Popen[bytes]:
    cfg = tmp_path / "config.toml"
    cfg.write_text(CONFIG.format(stall=stall))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACP_")}
    env.update(NOTIFY_SOCKET=socket_path, WATCHDOG_USEC="400000", PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-m", "supervisor", "--config", str(cfg), "--state-dir",
         str(tmp_path / "state"), "run"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def test_ready_status_watchdog_stopping_in_order(
    tmp_path: Path, notify_socket: tuple[str, Notifications]
) -> None:
    path, notes = notify_socket
    proc = start(tmp_path, path, tmp_path / "no-stall")
    try:
        notes.wait_for("READY=1")
        notes.drain(1.0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        notes.drain(0.2)
    finally:
        proc.kill()
    kinds = notes.kinds()
    assert kinds[0] == "READY", kinds
    assert "WATCHDOG" in kinds and "STATUS" in kinds
    assert kinds[-1] == "STOPPING", kinds
    status = [m for _, m in notes.received if m.startswith("STATUS=") or "\nSTATUS=" in m]
    assert any("horizon continuous" in m and "window" in m for m in status), status


def test_stalled_loop_stops_watchdog_pings(
    tmp_path: Path, notify_socket: tuple[str, Notifications]
) -> None:
    path, notes = notify_socket
    stall = tmp_path / "stall"
    proc = start(tmp_path, path, stall)
    try:
        notes.wait_for("READY=1")
        notes.drain(1.0)
        pings_before = sum("WATCHDOG=1" in m for _, m in notes.received)
        stall.touch()  # the next cycle (every 200 ms) blocks the event loop
        notes.drain(0.8)  # pings sent before the stall began are read here, not counted
        mark = len(notes.received)
        notes.drain(1.5)
        pings_during = sum("WATCHDOG=1" in m for _, m in notes.received[mark:])
        stall.unlink()
        notes.drain(1.0)
        pings_after = sum("WATCHDOG=1" in m for _, m in notes.received[mark:])
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
    finally:
        proc.kill()
    assert pings_before >= 2
    assert pings_during == 0, "a stuck loop must not ping the watchdog"
    assert pings_after > 0, "pings resume once the loop runs again"


def test_sighup_reloads_with_reloading_then_ready(
    tmp_path: Path, notify_socket: tuple[str, Notifications]
) -> None:
    path, notes = notify_socket
    proc = start(tmp_path, path, tmp_path / "no-stall")
    try:
        notes.wait_for("READY=1")
        ready_count = sum("READY=1" in m.split("\n") for _, m in notes.received)
        proc.send_signal(signal.SIGHUP)
        notes.wait_for("RELOADING=1")
        deadline = time.monotonic() + 10
        while sum("READY=1" in m.split("\n") for _, m in notes.received) <= ready_count:
            assert time.monotonic() < deadline, "no READY after RELOADING"
            notes.drain(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        proc.kill()
    reloading = next(m for _, m in notes.received if "RELOADING=1" in m)
    assert "MONOTONIC_USEC=" in reloading
    kinds = notes.kinds()
    assert kinds.index("RELOADING") < len(kinds) - 1 - kinds[::-1].index("READY")
