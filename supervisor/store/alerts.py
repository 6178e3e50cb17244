"""The alerts' reads: an alert's episodes on its stream, and the event counts the rate-change
conditions compare. Alerts are written as events (StoreCore.once); nothing here writes."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from .. import events as ev
from .base import Row, StoreCore


@dataclass(frozen=True, slots=True)
class RateCounts:
    """Events per kind of a window just closed, and of each trailing window (by session id)."""

    current: dict[str, int]
    trailing: dict[str, dict[str, int]]


def _rate_counts(rows: list[list[Row]]) -> RateCounts:
    now_rows, trailing_rows = rows
    trailing: dict[str, dict[str, int]] = {}
    for row in trailing_rows:
        trailing.setdefault(row["session_id"], {})[row["kind"]] = int(row["n"])
    return RateCounts({row["kind"]: int(row["n"]) for row in now_rows}, trailing)


class AlertsRepo(StoreCore):
    async def alert_episodes(self, *, stream: str, condition: str) -> tuple[int, int]:
        """(ALERT events, ALERT_RESOLVED events) of this condition on this stream."""
        rows = await self._fetchall("alert_state", stream, condition, ev.ALERT, ev.ALERT_RESOLVED)
        counts = {row["kind"]: int(row["n"]) for row in rows}
        return counts.get(ev.ALERT, 0), counts.get(ev.ALERT_RESOLVED, 0)

    async def rate_counts(
        self,
        *,
        fleet: str,
        session_id: str,
        starts_at: datetime,
        trailing_windows: int,
        kinds: tuple[str, str, str, str],
    ) -> RateCounts:
        """Counts of `kinds` in the window `session_id` and in the (at most) `trailing_windows`
        closed windows of `fleet` that started before `starts_at`. Read off the event loop:
        they grow with the event log."""
        return await self.read_off_loop(
            [
                ("alert_window_counts", (session_id, *kinds)),
                ("alert_trailing_counts", (fleet, starts_at, trailing_windows, *kinds)),
            ],
            _rate_counts,
        )
