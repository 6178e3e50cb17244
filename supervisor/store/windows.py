"""The windows aggregate: governance sessions opened, closed and missed exactly once."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from .base import NewEvent, Session, StoreCore, Tx


class WindowsRepo(StoreCore):
    async def get_session(self, session_id: str) -> Session | None:
        row = await self._fetchrow("get_session", session_id)
        return Session.from_row(row) if row else None

    async def list_sessions(self, fleet: str, limit: int = 1000) -> list[Session]:
        return [Session.from_row(r) for r in await self._fetchall("list_sessions", fleet, limit)]

    async def open_sessions(self, fleet: str) -> list[Session]:
        return [Session.from_row(r) for r in await self._fetchall("open_sessions", fleet)]

    async def latest_session(self, fleet: str) -> Session | None:
        """The fleet's newest window, whatever its status."""
        row = await self._fetchrow("latest_session", fleet)
        return Session.from_row(row) if row else None

    async def overdue_windows(self, *, fleet: str, now: datetime) -> list[Session]:
        """Windows still open whose end has passed (a daemon that was down did not close them)."""
        return [Session.from_row(r) for r in await self._fetchall("overdue_sessions", fleet, now)]

    # -- windows ------------------------------------------------------------------------------

    async def open_window(
        self,
        *,
        fleet: str,
        key: str,
        starts_at: datetime,
        ends_at: datetime,
        max_cost: float | None,
        max_actions: int | None,
        by: str,
    ) -> tuple[Session, bool]:
        """Open a window exactly once per fleet, whoever gets there first. (session, opened_now)"""
        from ..actions import derive_id
        from ..events import WINDOW_OPENED

        session_id = derive_id("session", fleet, key)
        params = {
            "fleet": fleet,
            "key": key,
            "start": starts_at.isoformat(),
            "end": ends_at.isoformat(),
        }

        async def body(tx: Tx) -> dict[str, Any]:
            now = self.clock.now()
            created = await tx.execute(
                "insert_session", session_id, fleet, key, starts_at, ends_at, "open",
                max_cost, max_actions, by, now,
            )  # fmt: skip
            if created == 0:
                # Recorded as missed (or a racing twin just opened it): never opened after the fact.
                return {"session_id": session_id, "opened": False}
            await self.append_in(
                tx,
                NewEvent(
                    kind=WINDOW_OPENED,
                    session_id=session_id,
                    payload={**params, "by": by, "max_cost": max_cost, "max_actions": max_actions},
                    command_id=derive_id("window.open", fleet, key),
                ),
            )
            return {"session_id": session_id}

        result, fresh = await self.run_command(
            derive_id("window.open", fleet, key), "window.open", params, body
        )
        session = await self.get_session(session_id)
        assert session is not None
        return session, fresh and bool(result.get("opened", True))

    async def close_window(self, session_id: str, *, by: str, status: str = "closed") -> bool:
        """Close once; True if this call closed it. `status` is closed or recovered."""
        from ..actions import derive_id
        from ..events import WINDOW_CLOSED

        command_id = derive_id("window.close", session_id)

        async def body(tx: Tx) -> dict[str, Any]:
            row = await tx.fetchrow("close_session", status, by, self.clock.now(), session_id)
            if row is None:
                return {"closed": False}
            await self.append_in(
                tx,
                NewEvent(
                    kind=WINDOW_CLOSED,
                    session_id=session_id,
                    payload={"by": by, "status": status},
                    command_id=command_id,
                ),
            )
            return {"closed": True}

        result, fresh = await self.run_command(
            command_id, "window.close", {"session": session_id}, body
        )
        return fresh and bool(result["closed"])

    async def record_missed_window(
        self, *, fleet: str, key: str, starts_at: datetime, ends_at: datetime
    ) -> bool:
        """A window the fleet slept through: recorded as missed, never opened after the fact."""
        from ..actions import derive_id
        from ..events import WINDOW_MISSED

        session_id = derive_id("session", fleet, key)
        command_id = derive_id("window.missed", fleet, key)

        async def body(tx: Tx) -> dict[str, Any]:
            changed = await tx.execute(
                "insert_session", session_id, fleet, key, starts_at, ends_at, "missed",
                None, None, None, None,
            )  # fmt: skip
            if changed == 0:
                return {"missed": False}
            await self.append_in(
                tx,
                NewEvent(
                    kind=WINDOW_MISSED,
                    session_id=session_id,
                    payload={
                        "key": key,
                        "start": starts_at.isoformat(),
                        "end": ends_at.isoformat(),
                    },
                    command_id=command_id,
                ),
            )
            return {"missed": True}

        result, fresh = await self.run_command(command_id, "window.missed", {"key": key}, body)
        return fresh and bool(result["missed"])
