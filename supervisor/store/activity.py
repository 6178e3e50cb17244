"""What a fleet did since an instant, read back from its events and actions: what a drill
watching a running daemon from beside it checks (supervisor/drills.py). Reads only.

The events read are those of the fleet's windows and of its system stream; each read stays on
the events (session_id, kind, reason) index."""

from __future__ import annotations

from datetime import datetime

from .base import Event, StoreCore, system_stream


class ActivityRepo(StoreCore):
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
