"""sd_notify: exact datagrams on a real AF_UNIX socket, as PID 1 would receive them."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from supervisor.ops.systemd import NOTIFY_ENV_VARS, Notifier


@pytest.fixture
def receiver() -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket at a short filesystem path (AF_UNIX paths max 108 bytes)."""
    directory = tempfile.mkdtemp(prefix="acp-", dir="/tmp")
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2.0)
    try:
        yield sock, path
    finally:
        sock.close()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def abstract_receiver() -> Iterator[tuple[socket.socket, str]]:
    name = f"acp-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2.0)
    try:
        yield sock, "@" + name
    finally:
        sock.close()


def _recv(sock: socket.socket) -> bytes:
    return sock.recv(65536)


@pytest.mark.parametrize(
    ("send", "expected"),
    [
        (lambda n: n.ready(), b"READY=1"),
        (lambda n: n.ready("serving 4 workers"), b"READY=1\nSTATUS=serving 4 workers"),
        (lambda n: n.status("recovery scan: 3 in-doubt"), b"STATUS=recovery scan: 3 in-doubt"),
        (lambda n: n.watchdog(), b"WATCHDOG=1"),
        (lambda n: n.stopping(), b"STOPPING=1"),
        (lambda n: n.reloading(123456789), b"RELOADING=1\nMONOTONIC_USEC=123456789"),
        (lambda n: n.extend_timeout(90), b"EXTEND_TIMEOUT_USEC=90000000"),
        (lambda n: n.extend_timeout(0.25), b"EXTEND_TIMEOUT_USEC=250000"),
        (lambda n: n.notify(STATUS="x", ERRNO=5), b"STATUS=x\nERRNO=5"),
        (lambda n: n.notify(READY=True), b"READY=1"),
        (lambda n: n.status("two\nlines\r"), b"STATUS=two lines "),
    ],
    ids=[
        "ready",
        "ready-status",
        "status",
        "watchdog",
        "stopping",
        "reloading",
        "extend",
        "extend-fraction",
        "notify",
        "notify-bool",
        "no-injection",
    ],
)
def test_exact_datagrams(
    receiver: tuple[socket.socket, str],
    send: Callable[[Notifier], bool],
    expected: bytes,
) -> None:
    sock, path = receiver
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert send(notifier) is True
    assert _recv(sock) == expected


def test_abstract_socket(abstract_receiver: tuple[socket.socket, str]) -> None:
    sock, address = abstract_receiver
    notifier = Notifier({"NOTIFY_SOCKET": address})
    assert notifier.ready("up") is True
    assert _recv(sock) == b"READY=1\nSTATUS=up"
    assert notifier.watchdog() is True
    assert _recv(sock) == b"WATCHDOG=1"


def test_reloading_defaults_to_clock_monotonic(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert Notifier({"NOTIFY_SOCKET": path}).reloading() is True
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = _recv(sock).split(b"\n")
    assert first == b"RELOADING=1"
    key, value = second.split(b"=")
    assert key == b"MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_reads_os_environ_by_default(
    receiver: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    notifier = Notifier()
    monkeypatch.delenv("NOTIFY_SOCKET")  # read once, at construction
    assert notifier.stopping() is True
    assert _recv(sock) == b"STOPPING=1"


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"NOTIFY_SOCKET": ""},
        {"NOTIFY_SOCKET": "relative/sock"},
        {"NOTIFY_SOCKET": "vsock:2:1234"},
    ],
)
def test_without_socket_everything_is_a_noop(env: dict[str, str]) -> None:
    notifier = Notifier({**env, "WATCHDOG_USEC": "30000000"})
    assert not notifier.enabled
    assert notifier.ready("x") is False
    assert notifier.status("x") is False
    assert notifier.watchdog() is False
    assert notifier.stopping() is False
    assert notifier.reloading(1) is False
    assert notifier.extend_timeout(1) is False
    assert notifier.notify(READY=1) is False
    assert notifier.watchdog_interval() is None


def test_unset_in_os_environ_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in NOTIFY_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    assert Notifier().ready() is False


def test_failed_send_returns_false_without_raising() -> None:
    directory = tempfile.mkdtemp(prefix="acp-", dir="/tmp")
    try:
        notifier = Notifier({"NOTIFY_SOCKET": os.path.join(directory, "gone")})
        assert notifier.enabled
        assert notifier.ready() is False  # ENOENT
    finally:
        shutil.rmtree(directory)


def test_send_never_blocks_when_the_receiver_is_full(
    receiver: tuple[socket.socket, str],
) -> None:
    """A stalled PID 1 must cost a False, not a hung event loop."""
    sock, path = receiver
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    notifier = Notifier({"NOTIFY_SOCKET": path})
    deadline = time.monotonic() + 10
    results = []
    while time.monotonic() < deadline:
        results.append(notifier.status("x" * 512))
        if results[-1] is False:
            break
    assert results[0] is True
    assert results[-1] is False


def test_empty_notify_sends_nothing(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.notify() is False
    sock.settimeout(0.05)
    with pytest.raises(TimeoutError):
        sock.recv(16)


@pytest.mark.parametrize("name", ["ready", "A=B", "X\nY", ""])
def test_bad_field_names_are_programming_errors(name: str) -> None:
    with pytest.raises(ValueError, match="field name"):
        Notifier({}).notify(**{name: "1"})


@pytest.mark.parametrize("seconds", [-1.0, float("nan"), float("inf")])
def test_bad_extend_timeout_is_a_programming_error(seconds: float) -> None:
    with pytest.raises(ValueError, match="extend_timeout"):
        Notifier({}).extend_timeout(seconds)


def _watchdog_env(**extra: str) -> dict[str, str]:
    return {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "30000000", **extra}


def test_watchdog_interval_is_half_of_watchdog_usec_without_pid() -> None:
    assert Notifier(_watchdog_env()).watchdog_interval() == 15.0


def test_watchdog_interval_with_our_pid() -> None:
    env = _watchdog_env(WATCHDOG_PID=str(os.getpid()))
    assert Notifier(env).watchdog_interval() == 15.0


def test_watchdog_interval_with_another_pid_is_none() -> None:
    env = _watchdog_env(WATCHDOG_PID=str(os.getpid() + 1))
    assert Notifier(env).watchdog_interval() is None


@pytest.mark.parametrize("usec", ["", "0", "-5", "soon"])
def test_watchdog_interval_invalid_usec_is_none(usec: str) -> None:
    assert Notifier(_watchdog_env(WATCHDOG_USEC=usec)).watchdog_interval() is None


def test_watchdog_interval_without_watchdog_is_none() -> None:
    assert Notifier({"NOTIFY_SOCKET": "/run/systemd/notify"}).watchdog_interval() is None


def test_short_socket_path_fits_sun_path(receiver: tuple[socket.socket, str]) -> None:
    _, path = receiver
    assert len(os.fsencode(path)) < 108
    assert Path(path).is_socket()
