"""Acceptance helpers: the real daemon as a subprocess, the real CLI, the real store.

Use the `daemon` fixture, a factory::

    async def test_x(daemon: DaemonFactory) -> None:
        d = daemon()                                  # support agent x3, 100 ms cycles
        d = daemon(workers=MY_TOML, extra=POLICY)     # or any [[workers]] / sections of TOML
        await d.wait_until(d.started_after(t0), what="actions")
        result = await d.cli("killswitch", "engage", ...)
        assert await d.stop() == 0                    # SIGTERM, exit code

Each daemon gets its own config file and state directory under tmp_path and
ACP_KILLSWITCH_SECRET in its environment; the CLI runs the same way (secret optional). Every
started process is killed at teardown, whatever the test did. Assertions read the store (opened
with `open_store` on the daemon's SQLite URL), the effect log and the daemon's log.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar, overload

import anyio
import pytest

from supervisor.store import Event, Store, open_store, system_stream
from supervisor.store.base import Row
from supervisor.store.records import ActionStatus
from supervisor.timing.clock import SystemClock
from tests.waiting import EVERY, WITHIN, eventually

REPO = Path(__file__).resolve().parents[2]
SECRET = "acceptance-kill-switch-secret"
FLEET = "acceptance"

T = TypeVar("T")

BASE_CONFIG = f"""
[daemon]
fleet = "{FLEET}"
profile = "hour"
shutdown_timeout = "5s"

[horizons.hour]
cycle_every = "100ms"
max_actions = 1000000
max_cost = 1000000.0
"""

# The support agent x3. High-risk cases are denied outright, so no approvals pile up.
SUPPORT_WORKERS = """
[policy.risk]
high = "deny"

[[workers]]
name = "support"
class = "workers.support:SupportAgent"
replicas = 3
"""


def _clean_env(*, secret: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("ACP_") and k != "NOTIFY_SOCKET"}  # fmt: skip
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    if secret:
        env["ACP_KILLSWITCH_SECRET"] = SECRET
    return env


@dataclass
class Daemon:
    """One daemon's config, state directory and (once started) process."""

    root: Path
    config_text: str
    db: str | None = None  # a postgresql:// URL; else the SQLite file in the state directory
    proc: subprocess.Popen[bytes] | None = None
    _log: Any = field(default=None, repr=False)
    _ready: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_text)

    # -- paths ----------------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.root / "supervisor.toml"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def log_path(self) -> Path:
        return self.root / "daemon.log"

    @property
    def switch_path(self) -> Path:
        return self.state_dir / "killswitch.json"

    @property
    def db_url(self) -> str:
        return self.db or f"sqlite:///{self.state_dir / 'supervisor.db'}"

    def argv(self, *args: str) -> list[str]:
        db = ["--db", self.db] if self.db else []
        return [sys.executable, "-m", "supervisor", "--config", str(self.config_path),
                "--state-dir", str(self.state_dir), *db, *args]  # fmt: skip

    # -- the process ----------------------------------------------------------------------------

    def start(self) -> None:
        """`run` without --horizon: continuous until SIGTERM."""
        assert self.proc is None, "already started"
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(self.argv("run"), cwd=REPO, env=_clean_env(secret=True),
                                     stdout=self._log, stderr=subprocess.STDOUT)  # fmt: skip

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_events(self) -> list[dict[str, Any]]:
        """The daemon's structured log lines (JSON, as it writes them to a pipe)."""
        out = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def stop(self, grace: float = 10.0) -> int:
        """SIGTERM and wait; the exit code. A daemon that does not stop in time is killed."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        proc = self.proc
        try:
            return await anyio.to_thread.run_sync(lambda: proc.wait(grace))
        except subprocess.TimeoutExpired:
            self.kill()
            tail = self.log()[-3000:]
            raise AssertionError(f"daemon ignored SIGTERM for {grace}s\n{tail}") from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None

    # -- the CLI --------------------------------------------------------------------------------

    @staticmethod
    def one_line(text: bytes | str) -> str:
        """The single non-empty line of a CLI's stderr (the CLI's promise for expected errors)."""
        raw = text.decode() if isinstance(text, bytes) else text
        lines = [ln for ln in raw.splitlines() if ln.strip()]
        assert len(lines) == 1, f"expected one line, got {lines}"
        return lines[0]

    async def cli(self, *args: str, secret: bool = True) -> subprocess.CompletedProcess[bytes]:
        return await anyio.run_process(self.argv(*args), cwd=REPO, env=_clean_env(secret=secret),
                                       check=False)  # fmt: skip

    async def cli_ok(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        result = await self.cli(*args)
        assert result.returncode == 0, (args, result.stdout, result.stderr)
        return result

    # -- the store and the effect log -----------------------------------------------------------

    @asynccontextmanager
    async def store(self) -> AsyncIterator[Store]:
        """The daemon's store, once the daemon has migrated it (said `daemon.ready`)."""
        if self.proc is not None and not self._ready:
            await self.wait_until(self.ready, what="daemon.ready in the log")
            self._ready = True
        store = await open_store(self.db_url, SystemClock())
        try:
            yield store
        finally:
            await store.close()

    async def events(self, kind: str | None = None, *, reason: str | None = None,
                     after: datetime | None = None) -> list[Event]:  # fmt: skip
        """Events of every window and of the fleet's system stream, filtered."""
        async with self.store() as store:
            streams = [s.id for s in await store.list_sessions(FLEET)] + [system_stream(FLEET)]
            found = [e for sid in streams for e in await store.replay(sid, 0, 1_000_000)]
        return [e for e in found
                if (kind is None or e.kind == kind) and (reason is None or e.reason == reason)
                and (after is None or e.created_at > after)]  # fmt: skip

    async def actions(self) -> list[Row]:
        """Every action row of the fleet, read in one snapshot: read status by status in
        separate reads, an action finishing in between was listed twice (started, succeeded)."""
        reads = [("actions_with_status", (FLEET, s.value, 1_000_000)) for s in ActionStatus]
        async with self.store() as store:
            rows: list[Row] = await store.read_off_loop(
                reads, lambda found: [row for rows in found for row in rows]
            )
        return rows

    async def approvals(self) -> list[Row]:
        async with self.store() as store:
            return [a.as_row() for a in await store.list_approvals(fleet=FLEET, limit=10_000)]

    def effects(self, after: datetime | None = None) -> list[dict[str, Any]]:
        path = self.state_dir / "effects.jsonl"
        if not path.exists():
            return []
        entries = [json.loads(line) for line in path.read_text().splitlines() if line]
        return [e for e in entries if after is None or datetime.fromisoformat(e["at"]) > after]

    # -- waiting --------------------------------------------------------------------------------

    def ready(self) -> bool:
        return any(e.get("event") == "daemon.ready" for e in self.log_events())

    def exited(self) -> str | None:
        """Why waiting on this daemon is pointless: it was started and has exited."""
        if self.proc is not None and not self.alive():
            return f"daemon exited ({self.proc.returncode})"
        return None

    def log_tail(self) -> str:
        return self.log()[-3000:]

    @overload
    async def wait_until(self, check: Callable[[], Awaitable[T | None]], *, what: str,
                         within: float = ..., every: float = ...) -> T: ...  # fmt: skip
    @overload
    async def wait_until(self, check: Callable[[], T | None], *, what: str,
                         within: float = ..., every: float = ...) -> T: ...  # fmt: skip
    async def wait_until(self, check: Callable[[], Any], *, what: str, within: float = WITHIN,
                         every: float = EVERY) -> Any:  # fmt: skip
        """Poll `check` (sync or async) until it returns something truthy; return that.

        Fails at once, with the log's tail, if the daemon died meanwhile."""
        return await eventually(check, what, within=within, every=every, abort=self.exited,
                                context=self.log_tail)  # fmt: skip

    def started_after(self, instant: datetime, n: int = 1) -> Callable[[], Awaitable[list[Event]]]:
        """A check for `wait_until`: at least n ACTION_STARTED events after `instant`."""

        async def check() -> list[Event]:
            found = await self.events("ACTION_STARTED", after=instant)
            return found if len(found) >= n else []

        return check

    def refused_after(self, instant: datetime, reason: str,
                      workers: int = 1) -> Callable[[], Awaitable[list[Event]]]:  # fmt: skip
        """A check: ACTION_DENIED with `reason` after `instant` from at least `workers` workers."""

        async def check() -> list[Event]:
            found = await self.events("ACTION_DENIED", reason=reason, after=instant)
            return found if len({e.worker for e in found}) >= workers else []

        return check

    async def running(self, n: int = 3) -> None:
        """Wait until the daemon is ready and its workers have started actions."""
        await self.wait_until(self.started_after(datetime.min.replace(tzinfo=UTC), n),
                              what=f"{n} started actions")  # fmt: skip

    async def nothing_started_after(self, instant: datetime) -> None:
        """The kill-switch promise, from three witnesses: events, action rows, effects."""
        started = await self.events("ACTION_STARTED", after=instant)
        assert started == [], f"{len(started)} ACTION_STARTED after {instant}: {started[:3]}"
        rows = [r for r in await self.actions() if r["started_at"] > instant]
        assert rows == [], f"{len(rows)} actions rows started after {instant}"
        effects = self.effects(after=instant)
        assert effects == [], f"{len(effects)} effects after {instant}: {effects[:3]}"


class DaemonFactory(Protocol):
    def __call__(
        self, *, workers: str = ..., extra: str = ..., start: bool = ..., db: str | None = ...
    ) -> Daemon: ...


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonFactory]:
    started: list[Daemon] = []

    def make(*, workers: str = SUPPORT_WORKERS, extra: str = "", start: bool = True,
             db: str | None = None) -> Daemon:  # fmt: skip
        d = Daemon(tmp_path / f"daemon-{len(started)}", BASE_CONFIG + extra + workers, db)
        started.append(d)
        if start:
            d.start()
        return d

    yield make
    for d in started:
        d.kill()
