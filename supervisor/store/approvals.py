"""The approvals aggregate: requests, decisions, expiry, escalation and window grants.

Each state change here is one command (or one transaction) with its event. What a request's
tier and deadline are, when an approval escalates and when it expires, is decided by the caller
(supervisor/governance/approvals.py): this module writes what it is told, fenced where a rule must hold in
the statement itself (no decision past the deadline)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from .. import events as ev
from ..actions import Action, canonical_json, derive_id, params_hash
from ..errors import ApprovalError
from .base import NewEvent, Row, StoreCore, Tx, json_object, plain_row, unreadable
from .records import ApprovalStatus


class ApprovalScope(StrEnum):
    """What a grant covers: the one request it answered, or later ones of its window too."""

    ONCE = "once"
    WINDOW = "window"


class ApprovalPastDeadline(ApprovalError):
    """A decision the statement refused because the deadline had passed: the approval is still
    pending until it is expired (denied by default), which the caller does next."""


@dataclass(frozen=True, slots=True)
class ApprovalRecord:
    """An approvals row. `params` and `match_keys` are decoded from their JSON text."""

    id: str
    idempotency_key: str  # as stored: scoped to the fleet ("<fleet>/<key>")
    fleet: str
    session_id: str
    worker: str
    agent_id: str | None
    action: str
    params: dict[str, Any]
    params_hash: str
    risk: str
    cost: float
    status: ApprovalStatus
    tier: str
    created_at: datetime
    deadline: datetime
    next_check_at: datetime | None
    decided_by: str | None
    decided_at: datetime | None
    reason: str | None
    scope: ApprovalScope
    max_uses: int | None
    max_cost: float | None
    used_count: int
    used_cost: float
    # The params a window grant compares (sorted); None: all of them, by their hash.
    match_keys: tuple[str, ...] | None

    @classmethod
    def from_row(cls, row: Row) -> ApprovalRecord:
        try:
            return cls._decoded(row)
        except (TypeError, ValueError) as exc:
            raise unreadable(f"approval {row['id']}", exc) from exc

    @classmethod
    def _decoded(cls, row: Row) -> ApprovalRecord:
        keys = row.get("match_keys")
        return cls(
            id=row["id"], idempotency_key=row["idempotency_key"], fleet=row["fleet"],
            session_id=row["session_id"], worker=row["worker"], agent_id=row["agent_id"],
            action=row["action"], params=json_object(row["params"]),
            params_hash=row["params_hash"], risk=row["risk"], cost=float(row["cost"]),
            status=ApprovalStatus(row["status"]), tier=row["tier"],
            created_at=row["created_at"], deadline=row["deadline"],
            next_check_at=row["next_check_at"], decided_by=row["decided_by"],
            decided_at=row["decided_at"], reason=row["reason"],
            scope=ApprovalScope(row["scope"]),
            max_uses=None if row["max_uses"] is None else int(row["max_uses"]),
            max_cost=None if row["max_cost"] is None else float(row["max_cost"]),
            used_count=int(row["used_count"]), used_cost=float(row["used_cost"]),
            match_keys=None if keys is None else tuple(json.loads(keys)),
        )  # fmt: skip

    @property
    def pending(self) -> bool:
        return self.status == ApprovalStatus.PENDING

    def as_row(self) -> Row:
        """The record as its row reads (JSON text columns, datetimes, plain strings): for the
        callers that still index a row while they move to the record."""
        row: Row = {k: getattr(self, k) for k in self.__slots__}
        row["params"] = canonical_json(self.params)
        row["status"] = self.status.value
        row["scope"] = self.scope.value
        row["match_keys"] = (
            None if self.match_keys is None else canonical_json(list(self.match_keys))
        )
        return row

    def as_dict(self) -> dict[str, Any]:
        """The row with ISO 8601 timestamps, for JSON output (the console's and the CLI's)."""
        return plain_row(self.as_row())


@dataclass(frozen=True, slots=True)
class ApprovalBacklog:
    """A fleet's pending approvals: how many, and when the oldest was requested."""

    pending: int
    oldest_at: datetime | None


class ApprovalsRepo(StoreCore):
    # -- reads --------------------------------------------------------------------------------

    async def approval(self, approval_id: str) -> ApprovalRecord | None:
        row = await self._fetchrow("get_approval", approval_id)
        return ApprovalRecord.from_row(row) if row is not None else None

    async def approval_by_key(self, *, fleet: str, key: str) -> ApprovalRecord | None:
        """The approval stored under `key` (scoped: "<fleet>/<worker's key>") in `fleet`."""
        row = await self._fetchrow("get_approval_by_key", fleet, key)
        return ApprovalRecord.from_row(row) if row is not None else None

    async def due_approvals(self, *, fleet: str, now: datetime, limit: int) -> list[ApprovalRecord]:
        """Pending approvals whose next check is at or before `now`, the most overdue first."""
        rows = await self._fetchall("due_approvals", fleet, now, limit)
        return [ApprovalRecord.from_row(r) for r in rows]

    async def next_approval_check(self, *, fleet: str) -> datetime | None:
        """The earliest next check of the fleet's pending approvals; None when none is pending."""
        row = await self._fetchrow("next_approval_check", fleet)
        return row["next_at"] if row is not None else None

    async def pending_approvals(self, *, fleet: str, limit: int) -> list[ApprovalRecord]:
        """Pending approvals, oldest first."""
        rows = await self._fetchall("fleet_pending_approvals", fleet, limit)
        return [ApprovalRecord.from_row(r) for r in rows]

    async def list_approvals(self, *, fleet: str, limit: int) -> list[ApprovalRecord]:
        """Every approval of the fleet, newest first."""
        rows = await self._fetchall("list_approvals", fleet, limit)
        return [ApprovalRecord.from_row(r) for r in rows]

    async def decided_approvals(self, *, fleet: str, limit: int) -> list[ApprovalRecord]:
        """Approved, denied and expired approvals, the latest decision first."""
        rows = await self._fetchall("console_decided_approvals", fleet, limit)
        return [ApprovalRecord.from_row(r) for r in rows]

    async def approval_backlog(self, *, fleet: str) -> ApprovalBacklog:
        row = await self._fetchrow("count_pending_approvals", fleet)
        if row is None or row["n"] is None:
            return ApprovalBacklog(0, None)
        return ApprovalBacklog(int(row["n"]), row["oldest_at"])

    async def pending_of_worker(self, *, fleet: str, worker: str, other_than: str) -> int:
        """How many approvals `worker` has pending, not counting the one stored under the key
        `other_than` (a request asked again is not one more)."""
        row = await self._fetchrow("count_pending_of_worker", fleet, worker, other_than)
        return int(row["n"]) if row is not None else 0

    async def window_grants(
        self, *, session_id: str, worker: str, action: str
    ) -> list[ApprovalRecord]:
        """Window-scoped grants (`approve --scope window`) of this window for this worker's
        action, the earliest granted first; whether each covers a given action and has room
        left is the caller's to tell (see supervisor.approvals.grant_covers)."""
        rows = await self._fetchall("scoped_approvals", session_id, worker, action)
        return [ApprovalRecord.from_row(r) for r in rows]

    # -- state changes ------------------------------------------------------------------------

    async def insert_approval_request(
        self,
        *,
        fleet: str,
        key: str,
        stored_key: str,
        approval_id: str,
        session_id: str,
        worker: str,
        action: Action,
        tier: str,
        created_at: datetime,
        deadline: datetime,
        next_check_at: datetime | None,
        correlation_id: str | None,
        origin: Mapping[str, Any],
    ) -> ApprovalRecord:
        """A pending approval and its APPROVAL_REQUESTED event, exactly once per (fleet, key).
        `key` is the worker's key (it names the command), `stored_key` the approval's; `origin`
        is what asked for it (rule, reason, the proposal), recorded in the event for replay.
        Returns the approval as stored afterwards (a racing twin's, if it was first)."""
        digest = params_hash(action.name, action.params)

        async def body(tx: Tx) -> dict[str, Any]:
            await tx.execute(
                "insert_approval", approval_id, stored_key, fleet, session_id, worker,
                action.agent_id, action.name, canonical_json(action.params), digest,
                action.risk, action.cost, tier, created_at, deadline, next_check_at,
            )  # fmt: skip
            await self.append_in(
                tx,
                NewEvent(
                    kind=ev.APPROVAL_REQUESTED,
                    session_id=session_id,
                    payload={"approval": approval_id, "action": action.name, "tier": tier,
                             "deadline": deadline.isoformat(), **origin},
                    worker=worker,
                    agent_id=action.agent_id,
                    correlation_id=correlation_id,
                ),
            )  # fmt: skip
            return {"approval": approval_id}

        await self.run_command(
            derive_id("approval.request", fleet, key), "approval.request",
            {"key": key, "params": digest}, body,
        )  # fmt: skip
        stored = await self.approval_by_key(fleet=fleet, key=stored_key)
        assert stored is not None
        return stored

    async def decide_approval(
        self,
        *,
        fleet: str,
        approval: ApprovalRecord,
        approve: bool,
        by: str,
        reason: str | None,
        scope: ApprovalScope,
        max_uses: int | None,
        max_cost: float | None,
        match: Sequence[str] | None,
    ) -> ApprovalRecord:
        """An operator's decision on a pending approval of `fleet` (the deciding one), with its
        event and (for a window grant) the params it matches, in one command. The statement
        refuses a decision past the deadline itself (Postgres: by now()), so no caller's clock
        can approve an expired request: ApprovalPastDeadline then, ApprovalError when it was
        decided meanwhile. Returns the approval as decided (read after the command)."""
        approval_id = approval.id
        status = ApprovalStatus.APPROVED if approve else ApprovalStatus.DENIED
        now = await self.deadline_now()
        window = scope == ApprovalScope.WINDOW

        async def body(tx: Tx) -> dict[str, Any]:
            changed = await tx.fetchrow(
                "decide_pending_approval", status.value, by, now, reason, scope.value, max_uses,
                max_cost, approval_id, fleet, self.deadline_fence(),
            )  # fmt: skip
            if changed is None:
                fresh = await tx.fetchrow("get_approval", approval_id)
                if fresh is not None and fresh["status"] == ApprovalStatus.PENDING:
                    raise ApprovalPastDeadline(
                        f"approval {approval_id} expired at {fresh['deadline'].isoformat()} "
                        "(denied by default)"
                    )
                raise ApprovalError(f"approval {approval_id} was decided meanwhile")
            if approve and window:
                keys = canonical_json(sorted(match)) if match is not None else None
                await tx.execute("set_approval_match", keys, approval_id)
            await self.append_in(
                tx,
                NewEvent(
                    kind=ev.APPROVAL_GRANTED if approve else ev.APPROVAL_DENIED,
                    session_id=approval.session_id,
                    reason=None if approve else "approval_denied",
                    payload={
                        "approval": approval_id,
                        "by": by,
                        "reason": reason,
                        "scope": scope.value,
                        **(
                            {"max_uses": max_uses, "match": list(match) if match else None}
                            if window
                            else {}
                        ),
                    },
                    worker=approval.worker,
                ),
            )
            return {"status": status.value}

        await self.run_command(
            derive_id("approval.decide", approval_id), "approval.decide",
            {"approval": approval_id, "status": status.value}, body,
        )  # fmt: skip
        decided = await self.approval(approval_id)
        assert decided is not None
        return decided

    async def expire_approval(self, *, approval: ApprovalRecord) -> bool:
        """Deny a pending approval by default (its deadline passed), with APPROVAL_EXPIRED,
        exactly once. True if this call expired it."""
        approval_id = approval.id
        now = await self.deadline_now()

        async def body(tx: Tx) -> dict[str, Any]:
            changed = await tx.fetchrow(
                "decide_approval", ApprovalStatus.EXPIRED.value, "deadline", now,
                "deadline passed: denied by default", approval.scope.value, None, None,
                approval_id,
            )  # fmt: skip
            if changed is None:
                return {"expired": False}
            await self.append_in(
                tx,
                NewEvent(
                    kind=ev.APPROVAL_EXPIRED,
                    session_id=approval.session_id,
                    reason="approval_expired",
                    payload={"approval": approval_id, "deadline": approval.deadline.isoformat(),
                             "tier": approval.tier},
                    worker=approval.worker,
                ),
            )  # fmt: skip
            return {"expired": True}

        result, fresh = await self.run_command(
            derive_id("approval.expire", approval_id), "approval.expire",
            {"approval": approval_id}, body,
        )  # fmt: skip
        return fresh and bool(result["expired"])

    async def escalate_approval(
        self, *, approval: ApprovalRecord, tier: str, next_check_at: datetime | None
    ) -> bool:
        """Move a pending approval to `tier` with APPROVAL_ESCALATED, in one transaction. False
        (nothing written) when it is no longer pending."""
        async with self._transaction() as tx:
            if await tx.fetchrow("escalate_approval", tier, next_check_at, approval.id) is None:
                return False
            await self.append_in(
                tx,
                NewEvent(
                    kind=ev.APPROVAL_ESCALATED,
                    session_id=approval.session_id,
                    payload={"approval": approval.id, "from": approval.tier, "to": tier},
                    worker=approval.worker,
                ),
            )
        return True

    async def touch_approval_check(
        self, *, approval_id: str, next_check_at: datetime | None
    ) -> None:
        """Only when a pending approval is next looked at (its tier stays): no event."""
        async with self._transaction() as tx:
            await tx.execute("set_approval_next_check", next_check_at, approval_id)
