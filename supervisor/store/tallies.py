"""Counts over the event log, for the scorecard: how many events of each kind and reason each
window's stream (and the fleet's system stream) holds. The scan grows with the log, so it runs
off the event loop on a connection of its own (`read_off_loop`)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Row, Session, StoreCore, system_stream


@dataclass(frozen=True, slots=True)
class EventCount:
    session_id: str
    kind: str
    reason: str | None
    n: int


@dataclass(frozen=True, slots=True)
class EventTallies:
    counts: list[EventCount]  # the fleet's windows, then its system stream
    pending_approvals: int
    windows: list[Session]  # empty unless asked for


def _counts(rows: list[Row]) -> list[EventCount]:
    return [EventCount(r["session_id"], r["kind"], r["reason"], int(r["n"])) for r in rows]


class TalliesRepo(StoreCore):
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
