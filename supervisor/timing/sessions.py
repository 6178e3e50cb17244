"""Governance sessions: the open window for "now", rotation at boundaries, missed windows.

`ensure(now)` is called by whoever needs the window (the rotation duty at a boundary, or the gate
before an action), so an action never waits for a timer to rotate: it rotates itself. Open and
close are deterministic commands, so racing callers (tasks or hosts) do each exactly once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import anyio
import structlog

from ..store import Session, Store
from .windows import WindowLength, window_at, windows_between

log = structlog.get_logger(__name__)

# After a long outage we record at most this many missed windows one by one, then a summary.
MAX_MISSED_RECORDED = 2000


class WindowManager:
    def __init__(
        self,
        store: Store,
        *,
        fleet: str,
        length: WindowLength,
        tz: ZoneInfo,
        max_cost: float | None,
        max_actions: int | None,
        by: str,
        run_end: datetime | None = None,
        on_closed: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self.store = store
        self.fleet = fleet
        self.length = length
        self.tz = tz
        self.max_cost = max_cost
        self.max_actions = max_actions
        self.by = by
        self.run_end = run_end
        self.current: Session | None = None
        # Called after this manager closes a window (alerts compare its rates with the trailing ones).
        self.on_closed = on_closed
        self.opened = 0
        self.closed = 0
        self._lock = anyio.Lock()

    async def ensure(self, now: datetime) -> Session | None:
        """The session for `now`, rotating if needed; None after the run's end."""
        current = self.current
        if current is not None and current.starts_at <= now < current.ends_at:
            return current
        async with self._lock:
            current = self.current
            if current is not None and current.starts_at <= now < current.ends_at:
                return current
            if current is not None and now >= current.ends_at:
                await self.close(current)
            if self.run_end is not None and now >= self.run_end:
                return None
            window = window_at(now, self.length, self.tz)
            session, fresh = await self.store.open_window(
                fleet=self.fleet, key=window.key, starts_at=window.start, ends_at=window.end,
                max_cost=self.max_cost, max_actions=self.max_actions, by=self.by,
            )  # fmt: skip
            if session.status != "open":
                # Already closed (a resumed run walking past windows it governed before the
                # crash): cycles there may only replay recorded outcomes; the gate refuses new
                # actions with reason no_window.
                return session
            if fresh:
                self.opened += 1
                log.info("window.opened", window=window.key, session=session.id)
            self.current = session
            return session

    async def close(self, session: Session) -> None:
        if await self.store.close_window(session.id, by=self.by):
            self.closed += 1
            log.info("window.closed", window=session.window_key, session=session.id)
            if self.on_closed is not None:
                await self.on_closed(session.id)
        if self.current is not None and self.current.id == session.id:
            self.current = None

    async def close_current(self) -> None:
        async with self._lock:
            if self.current is not None:
                await self.close(self.current)

    async def record_missed(self, now: datetime) -> int:
        """Windows between the fleet's last window and now that nobody governed: recorded as
        missed, never opened after the fact."""
        latest = await self.store.latest_session(self.fleet)
        if latest is None:
            return 0
        gap_start = latest.ends_at
        current_start = window_at(now, self.length, self.tz).start
        if gap_start >= current_start:
            return 0
        limit_start = max(gap_start, current_start - timedelta(days=366))
        missed = 0
        for window in windows_between(limit_start, current_start, self.length, self.tz):
            if window.start < gap_start or window.end > current_start:
                continue
            if missed >= MAX_MISSED_RECORDED:
                log.warning("window.missed_truncated", recorded=missed)
                break
            if await self.store.record_missed_window(
                fleet=self.fleet, key=window.key, starts_at=window.start, ends_at=window.end
            ):
                missed += 1
        if missed:
            log.warning("window.missed", count=missed)
        return missed
