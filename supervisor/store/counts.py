"""Counts over the event log, and reads of what a fleet did: the scorecard's tallies (off the
event loop: they grow with the log), the alert conditions' episodes and rates, and what a drill
watching a running daemon checks. Reads only; events are written by StoreCore."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from .. import events as ev
from .base import Event, Row, Session, StoreCore, system_stream

# One group of the event log: (session_id, kind, reason, n). A plain tuple, not a dataclass:
# a tuple of strings and ints leaves the collector's lists at the first collection it survives,
# where an object stays tracked, and the tens of thousands of groups at 1M events made every
# full collection (which holds the GIL, so it stops the event loop too) walk them all.
EventCount = tuple[str, str, str | None, int]


@dataclass(frozen=True, slots=True)
class EventTallies:
    counts: list[EventCount]  # the fleet's windows, then its system stream
    pending_approvals: int
    windows: list[Session]  # empty unless asked for


def _counts(rows: list[Row]) -> list[EventCount]:
    return [(r["session_id"], r["kind"], r["reason"], int(r["n"])) for r in rows]


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


class CountsRepo(StoreCore):
    async def event_tallies(self, fleet: str, *, windows: bool = True) -> EventTallies:
        """Event counts by window, kind and reason, with the pending approvals and (`windows`)
        every window of the fleet, read in one snapshot off the event loop."""
        await self.flush_telemetry()
        reads: list[tuple[str, tuple[object, ...]]] = [
            ("event_counts", (fleet,)),
            ("stream_counts", (system_stream(fleet),)),
            ("count_pending_approvals", (fleet,)),
        ]
        if windows:
            reads.append(("list_sessions", (fleet, 100_000)))

        def build(results: list[list[Row]]) -> EventTallies:
            pending = results[2][0] if results[2] else None
            return EventTallies(
                counts=_counts(results[0]) + _counts(results[1]),
                pending_approvals=int(pending["n"]) if pending else 0,
                windows=[Session.from_row(r) for r in results[3]] if windows else [],
            )

        return await self.read_off_loop(reads, build)

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

    # -- what a drill checks: the fleet's windows and its system stream, on the events index

    async def count_events_since(
        self, *, fleet: str, kind: str, after: datetime, reason: str | None = None
    ) -> int:
        """How many `kind` events (with `reason`, when given) were recorded after `after`."""
        wanted = reason or ""
        row = await self._fetchrow("fleet_event_count_since", fleet, system_stream(fleet), kind,
                                   wanted, wanted, after)  # fmt: skip
        return int(row["n"] or 0) if row is not None else 0

    async def last_event_at(self, *, fleet: str, kind: str) -> datetime | None:
        """When the latest `kind` event was recorded; None when there is none."""
        row = await self._fetchrow("fleet_last_event_at", fleet, system_stream(fleet), kind)
        return row["last_at"] if row is not None else None

    async def stream_events_of_kind(self, *, stream: str, kind: str, limit: int) -> list[Event]:
        """The newest `limit` events of `kind` on one stream, newest first."""
        rows = await self._fetchall("stream_events_of_kind", stream, kind, limit)
        return [Event.from_row(r) for r in rows]

    async def count_actions_started_since(self, *, fleet: str, after: datetime) -> int:
        """Action rows whose (latest) start is later than `after`."""
        row = await self._fetchrow("count_actions_started_since", fleet, after)
        return int(row["n"] or 0) if row is not None else 0
