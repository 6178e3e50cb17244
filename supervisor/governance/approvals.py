"""Approvals: one per idempotency key, a deadline, an escalation chain, deny by default."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import anyio

from ..actions import Action, canonical_json, derive_id, params_hash, proposal_fields
from ..errors import ApprovalError, IdempotencyConflict, UsageError
from ..store import Store
from ..store.approvals import ApprovalPastDeadline, ApprovalRecord, ApprovalScope
from .escalation import EscalationChain
from .policy import Decision


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


def grant_covers(grant: ApprovalRecord, action: Action) -> bool:
    """Whether a window-scoped grant covers `action`: the same params as the request it
    answered, or the same values for the keys the operator named with --match."""
    if grant.match_keys is None:
        return grant.params_hash == params_hash(action.name, action.params)
    stored = grant.params
    for k in grant.match_keys:
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
        self.next_due = await self.store.next_approval_check(fleet=self.fleet)

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
    ) -> ApprovalRecord:
        """The approval for `key`, created pending if new. Same key, other params: conflict."""
        digest = params_hash(action.name, action.params)
        stored_key = self.scoped(key)
        existing = await self.store.approval_by_key(fleet=self.fleet, key=stored_key)
        if existing is None:
            # Deadlines run on the store's clock (the database's on Postgres), so a step of this
            # host's wall clock cannot stretch them.
            now = await self.store.deadline_now()
            step = self.chain.evaluate(now, now)
            tier = self.chain.steps[0].tier if escalate_now and self.chain.steps else step.tier
            existing = await self.store.insert_approval_request(
                fleet=self.fleet, key=key, stored_key=stored_key,
                approval_id=approval_id_for(key, self.fleet), session_id=session_id,
                worker=worker, action=action, tier=tier, created_at=now,
                deadline=self.chain.deadline(now), next_check_at=step.next_at,
                correlation_id=correlation_id, origin=_decided(action, decision, command_id),
            )  # fmt: skip
            self._hint(existing.next_check_at)
            self._created()
        if existing.params_hash != digest or existing.action != action.name:
            raise IdempotencyConflict(
                f"approval:{key}",
                stored_operation=existing.action,
                stored_hash=existing.params_hash,
                operation=action.name,
                params_hash=digest,
            )
        if existing.pending and await self.store.deadline_now() >= existing.deadline:
            await self.expire(existing)  # the scan has not run yet: deny by default right here
            expired = await self.store.approval(existing.id)
            assert expired is not None
            existing = expired
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
    ) -> ApprovalRecord:
        """Approve or deny a pending approval of this fleet. Past its deadline the decision is
        refused and the approval expired (denied by default) right here."""
        # NaN compares false with everything: stored as a bound it would never stop anything
        if max_cost is not None and (not math.isfinite(max_cost) or max_cost < 0):
            raise UsageError(f"max cost must be a finite number >= 0, got {max_cost!r}")
        if scope not in tuple(ApprovalScope):
            raise ApprovalError(f"unknown approval scope {scope!r} (once, window)")
        grant_scope = ApprovalScope(scope)
        if grant_scope == ApprovalScope.WINDOW and max_uses is None:
            max_uses = DEFAULT_WINDOW_USES  # a window grant is never unbounded by default
        if match is not None and grant_scope != ApprovalScope.WINDOW:
            raise ApprovalError("--match applies to --scope window only")
        row = await self.store.approval(approval_id)
        if row is None or row.fleet != self.fleet:
            raise ApprovalError(f"unknown approval {approval_id!r} in fleet {self.fleet!r}")
        if not row.pending:
            raise ApprovalError(f"approval {approval_id} is already {row.status.value}")
        if match is not None:
            # A key the request lacks compares nothing: the grant would cover any params.
            unknown = sorted(set(match) - set(row.params))
            if unknown:
                raise ApprovalError(
                    f"--match {','.join(unknown)}: not a param of approval {approval_id} "
                    f"(its params: {', '.join(sorted(row.params)) or 'none'})"
                )
        try:
            return await self.store.decide_approval(
                fleet=self.fleet, approval=row, approve=approve, by=by, reason=reason,
                scope=grant_scope, max_uses=max_uses, max_cost=max_cost, match=match,
            )  # fmt: skip
        except ApprovalPastDeadline:
            await self.expire(row)  # deny by default, recorded, instead of waiting for the scan
            raise

    async def expire(self, approval: ApprovalRecord) -> bool:
        """Deny by default at the deadline. True if this call expired it."""
        return await self.store.expire_approval(approval=approval)

    async def escalate_due(self, limit: int = 1000) -> dict[str, int]:
        """Move due approvals along the chain; deny those past their deadline. Returns counts."""
        now = await self.store.deadline_now()
        counts = {"escalated": 0, "expired": 0}
        for row in await self.store.due_approvals(fleet=self.fleet, now=now, limit=limit):
            step = self.chain.evaluate(row.created_at, now)
            # The deadline saved with the approval is the promise; a reloaded chain (or another
            # host's config) may say otherwise, and must never push it later.
            if step.expired or now >= row.deadline:
                counts["expired"] += int(await self.expire(row))
                continue
            if step.next_at is None or step.next_at > row.deadline:
                step = dataclasses.replace(step, next_at=row.deadline)
            if step.tier == row.tier:
                await self.store.touch_approval_check(
                    approval_id=row.id, next_check_at=step.next_at
                )
                continue
            if await self.store.escalate_approval(
                approval=row, tier=step.tier, next_check_at=step.next_at
            ):
                counts["escalated"] += 1
        await self.refresh_hint()
        return counts
