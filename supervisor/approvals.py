"""Approvals: one per idempotency key, a deadline, an escalation chain, deny by default."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import anyio

from . import events as ev
from .actions import Action, canonical_json, derive_id, params_hash, proposal_fields
from .errors import ApprovalError, IdempotencyConflict, UsageError
from .escalation import EscalationChain
from .policy import Decision
from .store import NewEvent, Store
from .store.base import Row, Tx


@dataclass(frozen=True, slots=True)
class Permit:
    """What an approved (or policy-allowed) action carries into its block."""

    approval_id: str | None
    approver: str | None
    approved_at: datetime | None
    command_id: str
    rule: str


#: How many later actions one `--scope window` grant covers unless the operator says otherwise.
DEFAULT_WINDOW_USES = 10


def grant_covers(grant: Row, action: Action) -> bool:
    """Whether a window-scoped grant covers `action`: the same params as the request it
    answered, or the same values for the keys the operator named with --match."""
    keys = grant.get("match_keys")
    if not keys:
        return bool(grant["params_hash"] == params_hash(action.name, action.params))
    stored = json.loads(grant["params"])
    for k in json.loads(keys):
        if (k in stored) != (k in action.params):
            return False
        if k in stored and canonical_json(stored[k]) != canonical_json(action.params[k]):
            return False
    return True


def _decided(action: Action, decision: Decision | None, command_id: str | None) -> dict[str, Any]:
    """The rule that asked for this approval, its reason, and the proposal (for replay)."""
    if decision is None:
        return {}
    return {**proposal_fields(action), "rule": decision.rule, "why": decision.detail,
            "decision": decision.outcome, "command_id": command_id}  # fmt: skip


def approval_id_for(key: str, fleet: str | None = None) -> str:
    """The approval id of `key`; in a fleet, of the fleet-scoped key (see `Approvals.scoped`)."""
    return derive_id("approval", key) if fleet is None else derive_id("approval", fleet, key)


class Approvals:
    def __init__(self, store: Store, chain: EscalationChain, fleet: str) -> None:
        self.store = store
        self.chain = chain
        self.fleet = fleet
        # The earliest instant an approval of this fleet needs the escalation duty; the duty
        # sleeps until then and `changed` wakes it when an earlier one appears.
        self.next_due: datetime | None = None
        self.changed = anyio.Event()
        self._watchers: list[anyio.Event] = []

    def rearm(self) -> None:
        """The escalation duty saw `changed` ring: a fresh event for the next change."""
        if self.changed.is_set():
            self.changed = anyio.Event()

    def watch(self) -> anyio.Event:
        """An event rung when the next approval is created (the alerts duty sleeps on it). The
        same event until it rings: a duty that wakes by its timeout, again and again while no
        approval is created, must not add an event each time (they were never released)."""
        if self._watchers:
            return self._watchers[0]
        event = anyio.Event()
        self._watchers.append(event)
        return event

    def scoped(self, key: str) -> str:
        """The key as stored: approvals of one fleet never answer requests of another, whatever
        key the worker chose (fleet names hold no "/")."""
        return f"{self.fleet}/{key}"

    def _created(self) -> None:
        watchers, self._watchers = self._watchers, []
        for event in watchers:
            self.store.clock.ring(event)

    def _hint(self, when: datetime | None) -> None:
        if when is not None and (self.next_due is None or when < self.next_due):
            self.next_due = when
            self.store.clock.ring(self.changed)

    async def refresh_hint(self) -> None:
        row = await self.store.fetchrow("next_approval_check", self.fleet)
        self.next_due = row["next_at"] if row else None

    async def request(
        self,
        *,
        key: str,
        action: Action,
        worker: str,
        session_id: str,
        escalate_now: bool,
        correlation_id: str | None,
        decision: Decision | None = None,
        command_id: str | None = None,
    ) -> Row:
        """The approval for `key`, created pending if new. Same key, other params: conflict."""
        digest = params_hash(action.name, action.params)
        stored_key = self.scoped(key)
        existing = await self.store.fetchrow("get_approval_by_key", self.fleet, stored_key)
        if existing is None:
            approval_id = approval_id_for(key, self.fleet)
            # Deadlines run on the store's clock (the database's on Postgres), so a step of this
            # host's wall clock cannot stretch them.
            now = await self.store.deadline_now()
            step = self.chain.evaluate(now, now)
            tier = self.chain.steps[0].tier if escalate_now and self.chain.steps else step.tier

            async def body(tx: Tx) -> dict[str, Any]:
                await tx.execute(
                    "insert_approval", approval_id, stored_key, self.fleet, session_id, worker,
                    action.agent_id, action.name, canonical_json(action.params), digest,
                    action.risk, action.cost, tier, now, self.chain.deadline(now), step.next_at,
                )  # fmt: skip
                await self.store.append_in(
                    tx,
                    NewEvent(
                        kind=ev.APPROVAL_REQUESTED,
                        session_id=session_id,
                        payload={"approval": approval_id, "action": action.name, "tier": tier,
                                 "deadline": self.chain.deadline(now).isoformat(),
                                 **_decided(action, decision, command_id)},
                        worker=worker,
                        agent_id=action.agent_id,
                        correlation_id=correlation_id,
                    ),
                )  # fmt: skip
                return {"approval": approval_id}

            await self.store.run_command(
                derive_id("approval.request", self.fleet, key), "approval.request",
                {"key": key, "params": digest}, body,
            )  # fmt: skip
            existing = await self.store.fetchrow("get_approval_by_key", self.fleet, stored_key)
            assert existing is not None
            self._hint(existing["next_check_at"])
            self._created()
        if existing["params_hash"] != digest or existing["action"] != action.name:
            raise IdempotencyConflict(
                f"approval:{key}",
                stored_operation=existing["action"],
                stored_hash=existing["params_hash"],
                operation=action.name,
                params_hash=digest,
            )
        pending = existing["status"] == "pending"
        if pending and await self.store.deadline_now() >= existing["deadline"]:
            await self.expire(existing)  # the scan has not run yet: deny by default right here
            existing = await self.store.fetchrow("get_approval", existing["id"])
            assert existing is not None
        return existing

    async def decide(
        self,
        approval_id: str,
        *,
        approve: bool,
        by: str,
        reason: str | None,
        scope: str = "once",
        max_uses: int | None = None,
        max_cost: float | None = None,
        match: tuple[str, ...] | None = None,
    ) -> Row:
        # NaN compares false with everything: stored as a bound it would never stop anything
        if max_cost is not None and (not math.isfinite(max_cost) or max_cost < 0):
            raise UsageError(f"max cost must be a finite number >= 0, got {max_cost!r}")
        if scope == "window" and max_uses is None:
            max_uses = DEFAULT_WINDOW_USES  # a window grant is never unbounded by default
        if match is not None and scope != "window":
            raise ApprovalError("--match applies to --scope window only")
        row = await self.store.fetchrow("get_approval", approval_id)
        if row is None or row["fleet"] != self.fleet:
            raise ApprovalError(f"unknown approval {approval_id!r} in fleet {self.fleet!r}")
        if row["status"] != "pending":
            raise ApprovalError(f"approval {approval_id} is already {row['status']}")
        if match is not None:
            # A key the request lacks compares nothing: the grant would cover any params.
            asked = json.loads(row["params"])
            unknown = sorted(set(match) - set(asked))
            if unknown:
                raise ApprovalError(
                    f"--match {','.join(unknown)}: not a param of approval {approval_id} "
                    f"(its params: {', '.join(sorted(asked)) or 'none'})"
                )
        status = "approved" if approve else "denied"
        now = await self.store.deadline_now()
        expired = ApprovalError(
            f"approval {approval_id} expired at {row['deadline'].isoformat()} (denied by default)"
        )

        async def body(tx: Tx) -> dict[str, Any]:
            # The statement refuses a decision past the deadline itself (Postgres: by now()), so
            # no caller's clock can approve an expired request.
            changed = await tx.fetchrow(
                "decide_pending_approval", status, by, now, reason, scope, max_uses, max_cost,
                approval_id, self.fleet, self.store.deadline_fence(),
            )  # fmt: skip
            if changed is None:
                fresh = await tx.fetchrow("get_approval", approval_id)
                if fresh is not None and fresh["status"] == "pending":
                    raise expired
                raise ApprovalError(f"approval {approval_id} was decided meanwhile")
            if approve and scope == "window":
                keys = canonical_json(sorted(match)) if match is not None else None
                await tx.execute("set_approval_match", keys, approval_id)
            await self.store.append_in(
                tx,
                NewEvent(
                    kind=ev.APPROVAL_GRANTED if approve else ev.APPROVAL_DENIED,
                    session_id=row["session_id"],
                    reason=None if approve else "approval_denied",
                    payload={
                        "approval": approval_id,
                        "by": by,
                        "reason": reason,
                        "scope": scope,
                        **(
                            {"max_uses": max_uses, "match": list(match) if match else None}
                            if scope == "window"
                            else {}
                        ),
                    },
                    worker=row["worker"],
                ),
            )
            return {"status": status}

        try:
            await self.store.run_command(
                derive_id("approval.decide", approval_id), "approval.decide",
                {"approval": approval_id, "status": status}, body,
            )  # fmt: skip
        except ApprovalError as exc:
            if exc is expired:
                await self.expire(row)  # deny by default, recorded, instead of waiting for the scan
            raise
        decided = await self.store.fetchrow("get_approval", approval_id)
        assert decided is not None
        return decided

    async def expire(self, row: Row) -> bool:
        """Deny by default at the deadline. True if this call expired it."""
        approval_id = row["id"]
        now = await self.store.deadline_now()

        async def body(tx: Tx) -> dict[str, Any]:
            changed = await tx.fetchrow(
                "decide_approval", "expired", "deadline", now,
                "deadline passed: denied by default", row["scope"], None, None, approval_id,
            )  # fmt: skip
            if changed is None:
                return {"expired": False}
            await self.store.append_in(
                tx,
                NewEvent(
                    kind=ev.APPROVAL_EXPIRED,
                    session_id=row["session_id"],
                    reason="approval_expired",
                    payload={"approval": approval_id, "deadline": row["deadline"].isoformat(),
                             "tier": row["tier"]},
                    worker=row["worker"],
                ),
            )  # fmt: skip
            return {"expired": True}

        result, fresh = await self.store.run_command(
            derive_id("approval.expire", approval_id), "approval.expire", {"approval": approval_id},
            body,
        )  # fmt: skip
        return fresh and bool(result["expired"])

    async def escalate_due(self, limit: int = 1000) -> dict[str, int]:
        """Move due approvals along the chain; deny those past their deadline. Returns counts."""
        now = await self.store.deadline_now()
        counts = {"escalated": 0, "expired": 0}
        for row in await self.store.fetchall("due_approvals", self.fleet, now, limit):
            step = self.chain.evaluate(row["created_at"], now)
            # The deadline saved with the approval is the promise; a reloaded chain (or another
            # host's config) may say otherwise, and must never push it later.
            if step.expired or now >= row["deadline"]:
                counts["expired"] += int(await self.expire(row))
                continue
            if step.next_at is None or step.next_at > row["deadline"]:
                step = dataclasses.replace(step, next_at=row["deadline"])
            if step.tier == row["tier"]:
                async with self.store.transaction() as tx:
                    await tx.execute("escalate_approval", row["tier"], step.next_at, row["id"])
                continue
            async with self.store.transaction() as tx:
                if await tx.fetchrow("escalate_approval", step.tier, step.next_at, row["id"]):
                    counts["escalated"] += 1
                    await self.store.append_in(
                        tx,
                        NewEvent(
                            kind=ev.APPROVAL_ESCALATED,
                            session_id=row["session_id"],
                            payload={"approval": row["id"], "from": row["tier"], "to": step.tier},
                            worker=row["worker"],
                        ),
                    )
        await self.refresh_hint()
        return counts
