"""The systemd notification protocol (sd_notify), written by hand.

A :class:`Notifier` sends ``KEY=value`` lines as one datagram to the AF_UNIX socket named by
``$NOTIFY_SOCKET`` (a filesystem path, or ``@name`` for an abstract socket). Outside systemd
the variable is unset and every method is a no-op returning ``False``.

Sends never block and never raise: the socket is non-blocking, so a stalled PID 1 costs a
``False`` rather than a hung event loop; the caller logs it. Only programming errors (a bad
field name, a negative timeout) raise ``ValueError``.

The environment is read once, when the notifier is made. Processes the daemon spawns should
not inherit :data:`NOTIFY_ENV_VARS`.
"""

from __future__ import annotations

import math
import os
import re
import socket
import time
from collections.abc import Mapping

__all__ = ["NOTIFY_ENV_VARS", "Notifier"]

#: Variables systemd sets for the main process; strip them from a child's environment.
NOTIFY_ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")

_FIELD_NAME = re.compile(r"[A-Z0-9_]+")


def _address(value: str | None) -> bytes | None:
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + os.fsencode(value[1:])
    if value.startswith("/"):
        return os.fsencode(value)
    return None  # vsock: and relative paths are not supported


def _text(value: str | int) -> str:
    if isinstance(value, bool):
        value = int(value)
    return str(value).replace("\r", " ").replace("\n", " ")


class Notifier:
    """Tell systemd about readiness, status, liveness, reloads and stops."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self._address = _address(env.get("NOTIFY_SOCKET"))
        self._watchdog_usec = env.get("WATCHDOG_USEC")
        self._watchdog_pid = env.get("WATCHDOG_PID")

    @property
    def enabled(self) -> bool:
        """True when a usable ``$NOTIFY_SOCKET`` was given."""
        return self._address is not None

    def notify(self, **fields: str | int) -> bool:
        """Send ``KEY=value`` lines in one datagram; True if the datagram was sent.

        True/False are sent as 1/0. Line breaks in values become spaces, so a value (a status
        naming a worker, say) cannot inject another field.
        """
        for name in fields:
            if not _FIELD_NAME.fullmatch(name):
                raise ValueError(f"invalid sd_notify field name: {name!r}")
        if self._address is None or not fields:
            return False
        lines = (f"{k}={_text(v)}" for k, v in fields.items())
        data = "\n".join(lines).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                return sock.sendto(data, self._address) == len(data)
        except OSError:
            return False

    def ready(self, status: str | None = None) -> bool:
        """READY=1, optionally with a STATUS= line."""
        return self.notify(READY=1) if status is None else self.notify(READY=1, STATUS=status)

    def status(self, text: str) -> bool:
        """STATUS=text: the one-line status `systemctl status` shows."""
        return self.notify(STATUS=text)

    def watchdog(self) -> bool:
        """WATCHDOG=1: the keep-alive ping."""
        return self.notify(WATCHDOG=1)

    def stopping(self) -> bool:
        """STOPPING=1: the drain has begun."""
        return self.notify(STOPPING=1)

    def reloading(self, monotonic_usec: int | None = None) -> bool:
        """RELOADING=1 with MONOTONIC_USEC (CLOCK_MONOTONIC, never the injected clock).

        Send READY=1 when the reload is done.
        """
        if monotonic_usec is None:
            monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(RELOADING=1, MONOTONIC_USEC=monotonic_usec)

    def extend_timeout(self, seconds: float) -> bool:
        """EXTEND_TIMEOUT_USEC: ask for `seconds` more from now (start, stop or reload)."""
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"extend_timeout needs a finite, non-negative delay: {seconds!r}")
        return self.notify(EXTEND_TIMEOUT_USEC=math.ceil(seconds * 1_000_000))

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None.

        None when there is no notify socket, no valid WATCHDOG_USEC, or WATCHDOG_PID names
        another process (the variables were inherited, not meant for us).
        """
        if self._address is None or not self._watchdog_usec:
            return None
        if self._watchdog_pid and self._watchdog_pid != str(os.getpid()):
            return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            return None
        return usec / 2 / 1_000_000 if usec > 0 else None
