"""The gate every action passes, in this order:

kill switch, idempotency, policy (with model access), approval, budget (with token budgets),
a durable started record, the kill switch once more, the side effect, the outcome record.

Every refusal is a state-bearing ACTION_DENIED event with a reason code; when that write fails the
action does not run either (fail-closed) and the StateWriteError goes to the caller.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol
from zoneinfo import ZoneInfo

import anyio
import structlog

from .. import events as ev
from ..actions import Action, derive_id, proposal_fields
from ..errors import ActionDenied, ActionExpired, ApprovalPending, StateWriteError
from ..killswitch import HostSwitchFile, Mode, host_verdict
from ..store import NewEvent, Session, Store
from ..store.approvals import ApprovalRecord
from ..store.records import ApprovalStatus
from ..store.switches import (
    SwitchRecord,
    SwitchTarget,
    fleet_unknown_verdict,
    stops_in_flight,
    switch_verdict,
)
from ..store.tokens import TokenCharge, TokenKey
from .approvals import Approvals, Permit, grant_covers
from .budgets import ModelGovernor, TokenBudgets
from .policy import Decision, Policy

if TYPE_CHECKING:
    from .escalation import EscalationChain
    from .replay import ShadowPolicy

log = structlog.get_logger(__name__)

Effect = Callable[[], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class Outcome:
    command_id: str
    status: str  # succeeded | failed
    result: Any
    error: str | None
    replayed: bool  # True when a stored outcome came back and nothing ran


class GateObserver(Protocol):
    def observe_action(self, outcome: str, reason: str = "") -> None: ...

    def observe_latency(self, seconds: float) -> None: ...


@dataclass(slots=True)
class Attempt:
    """One action going through `Gate.attempt`: what its block sees and sets."""

    command_id: str
    permit: Permit | None  # None when `replay` answers the command
    replay: Outcome | None
    result: Any = None  # what the effect returned, recorded with the outcome
    outcome: Outcome | None = None  # the recorded outcome, once there is one


@dataclass(slots=True)
class GateStats:
    """Counters for metrics and benchmarks; latency is monotonic seconds per admitted action."""

    admitted: int = 0
    refused: int = 0
    latencies: list[float] | None = None


@dataclass(slots=True)
class InFlight:
    """An effect that is running: what an emergency must reach."""

    worker: str
    session_id: str
    scope: anyio.CancelScope
    terminate: Callable[[], None] | None = None  # an external worker's: signal its child's group
    stopped_by: str | None = None


class Gate:
    def __init__(
        self,
        *,
        store: Store,
        fleet: str,
        policy: Policy,
        approvals: Approvals,
        host_switch: HostSwitchFile,
        token_budgets: TokenBudgets,
        models: ModelGovernor,
        timezone: ZoneInfo,
        on_alert: Callable[[str, Mapping[str, Any]], Awaitable[None]] | None = None,
        observer: GateObserver | None = None,
        host: str | None = None,
        owner: str | None = None,
        halt_in_flight: str = "finish",
        shadow: ShadowPolicy | None = None,
    ) -> None:
        self.store = store
        self.fleet = fleet
        self.policy = policy
        self.approvals = approvals
        self.host_switch = host_switch
        self.token_budgets = token_budgets
        self.models = models
        self.timezone = timezone
        self.on_alert = on_alert
        self.stats = GateStats()
        # Set while this host cannot read the fleet switch (store unreachable past the grace):
        # the fleet switch then counts as halt_all.
        self.fleet_unknown: str | None = None
        self.observer = observer  # metrics, when enabled
        # Rung on every observed switch change, so waiting workers react at once.
        self.switch_changed = anyio.Event()
        self.host = host
        # This process incarnation, recorded as the owner of every action it starts, and the
        # command_ids it has between "about to write the started record" and "outcome written
        # or abandoned": the recovery scan never touches those, whatever the wall clock says.
        self.owner = owner or uuid.uuid4().hex[:12]
        self.owned: set[str] = set()
        # Instance name -> configured name of a replicated worker (for worker-scope switches).
        self.worker_groups: dict[str, str] = {}
        # Effects in flight by command_id (from the last look on), for an emergency to stop;
        # "terminate" makes halt_all stop them too.
        self.in_flight: dict[str, InFlight] = {}
        self.halt_in_flight = halt_in_flight
        # [policy] shadow: a candidate decided beside the live policy; it never stops an action.
        self.shadow = shadow

    def reconfigure(
        self, *, policy: Policy, chain: EscalationChain, token_budgets: TokenBudgets,
        models: ModelGovernor, halt_in_flight: str, shadow: ShadowPolicy | None,
    ) -> None:  # fmt: skip
        """SIGHUP: the rules change between two actions; nothing in flight is touched."""
        self.policy = policy
        self.approvals.chain = chain
        self.token_budgets = token_budgets
        self.models = models
        self.halt_in_flight = halt_in_flight
        self.shadow = shadow

    def fleet_switch_unreadable(self, reason: str | None) -> None:
        """The store has been out of reach past the grace (reason), or is back (None): while
        unreadable, the fleet switch counts as halt_all."""
        self.fleet_unknown = reason

    # -- the checks -----------------------------------------------------------------------------

    def _host_verdict(self, critical: bool) -> str | None:
        if self.fleet_unknown is not None:
            return fleet_unknown_verdict(self.fleet_unknown)
        return host_verdict(self.host_switch.read(), critical=critical)

    async def _usable_grants(
        self, action: Action, *, worker: str, session: Session
    ) -> list[ApprovalRecord]:
        """Approvals granted for the rest of this window (`approve --scope window`) that cover
        `action`: later actions of the same name by the same worker with the same params (or the
        same values of the keys the operator named), with room left in their count and cost
        limits as last read. The use itself is counted in the started record's transaction (one
        conditional statement, so concurrent uses cannot exceed the limits, and an attempt
        refused at a later check spends nothing)."""
        grants = await self.store.window_grants(session_id=session.id, worker=worker,
                                                action=action.name)  # fmt: skip
        return [
            g for g in grants
            if grant_covers(g, action)
            and (g.max_uses is None or g.used_count + 1 <= g.max_uses)
            and (g.max_cost is None or g.used_cost + action.cost <= g.max_cost)
        ]  # fmt: skip

    async def _token_budget_spent(
        self, action: Action, charge: TokenCharge, used: int, args: dict[str, Any]
    ) -> ActionDenied:
        """A token budget has no room for this action: the exhaustion event and alert once per
        budget and period, and the refusal (returned for the caller to raise)."""
        period = charge.key.period_key
        fresh = await self.store.once(
            derive_id("token_exhausted", charge.label, period),
            NewEvent(kind=ev.TOKEN_BUDGET_EXHAUSTED, session_id=args["session"].id,
                     reason="token_budget",
                     payload={"budget": charge.label, "period": period, "used": used}),
        )  # fmt: skip
        if fresh and self.on_alert:
            await self.on_alert("token_budget_exhausted", {"budget": charge.label})
        return await self.refuse(action, reason="token_budget",
                                 detail=f"token budget {charge.label} ({period}) spent", **args)  # fmt: skip

    async def cap_hit(self, cap: str, *, worker: str, session: Session, **detail: Any) -> None:
        """A worker reached one of its caps: an event and an alert, once per window."""
        fresh = await self.store.once(
            derive_id("worker_cap", session.id, worker, cap),
            NewEvent(kind=ev.WORKER_CAP_HIT, session_id=session.id, worker=worker, reason=cap,
                     payload={"cap": cap, **detail}),
        )  # fmt: skip
        log.warning("worker.cap_hit", worker=worker, cap=cap, **detail)
        if fresh and self.on_alert is not None:
            await self.on_alert("worker_cap", {"session": session.id, "worker": worker,
                                               "cap": cap, **detail})  # fmt: skip

    def _stops(self, mode: Mode) -> bool:
        """Whether `mode` stops effects already running (not only new ones)."""
        return stops_in_flight(mode, halt_all_stops=self.halt_in_flight == "terminate")

    def _target(self, action: Action, worker: str, session: Session) -> SwitchTarget:
        """Which switches reach this action: the host file (read where the verdict is taken, so
        inside the store's transaction, on each attempt of it), the fleet switch's state, and
        what the store's switch rows are matched against."""
        return SwitchTarget(worker=worker, session_id=session.id,
                            group=self.worker_groups.get(worker), critical=action.critical,
                            host=self.host_switch, fleet_unknown=self.fleet_unknown)  # fmt: skip

    def stop_in_flight(self, scope: str, target: str, mode: Mode) -> int:
        """An engage was observed: stop the effects it reaches (emergency; halt_all when
        halt_in_flight = "terminate"). External children get SIGTERM on their process group at
        once; in-process effects are cancelled at their next await. Returns how many."""
        if not self._stops(mode):
            return 0
        stopped = 0
        for entry in list(self.in_flight.values()):
            if scope == "session" and entry.session_id != target:
                continue
            group = self.worker_groups.get(entry.worker)  # a replicated worker's name: all
            if scope == "worker" and target not in (entry.worker, group):
                continue
            if entry.stopped_by is None:
                entry.stopped_by = f"{scope} {mode.value}"
                if entry.terminate is not None:
                    entry.terminate()
                entry.scope.cancel()
                stopped += 1
        if stopped:
            log.error("killswitch.stopped_in_flight", scope=scope, target=target, mode=mode.value,
                      effects=stopped)  # fmt: skip
        return stopped

    def track(self, command_id: str, worker: str, session_id: str) -> InFlight:
        entry = InFlight(worker, session_id, anyio.CancelScope())
        self.in_flight[command_id] = entry
        return entry

    def on_terminate(self, command_id: str, terminate: Callable[[], None]) -> None:
        """An external worker's effect names how to stop its child (called from the effect)."""
        entry = self.in_flight.get(command_id)
        if entry is not None:
            entry.terminate = terminate

    async def stopped(self, action: Action, entry: InFlight, *, worker: str, session: Session,
                      command_id: str) -> ActionDenied:  # fmt: skip
        """The effect was stopped by a switch: recorded in-doubt (it may have half happened)."""
        with anyio.CancelScope(shield=True):
            await self.store.mark_in_doubt(
                command_id=command_id, session_id=session.id, cost=action.cost, worker=worker,
                reason="killswitch", payload={"action": action.name, "stopped_by": entry.stopped_by,
                                              "safe_to_retry": action.safe_to_retry},
            )  # fmt: skip
        return ActionDenied(f"{action.name}: stopped in flight by the kill switch ({entry.stopped_by})",
                            reason="killswitch", command_id=command_id)  # fmt: skip

    def _verdict(
        self, action: Action, records: list[SwitchRecord], worker: str, session: Session
    ) -> str | None:
        """Every switch at once (host file, then the store's records); None when all permit."""
        return switch_verdict(records, self._target(action, worker, session))

    async def refuse(
        self,
        action: Action,
        *,
        worker: str,
        session: Session,
        command_id: str,
        reason: str,
        detail: str,
        rule: str | None = None,
        correlation_id: str | None = None,
        decision: Decision | None = None,
    ) -> ActionDenied:
        self.stats.refused += 1
        if self.observer is not None:
            self.observer.observe_action("denied", reason)
        payload: dict[str, Any] = {"action": action.name, "detail": detail, "risk": action.risk}
        if decision is None:
            # Refused before the policy spoke: the gate's own check is the rule.
            payload.update(rule=rule or reason, why=detail)
        else:
            # Refused after it: the rule that decided, its reason, and the whole proposal, so
            # `policy replay` can decide it again; `decision` is what governance said of it.
            verdict = "deny" if reason in _GOVERNANCE_DENIALS else decision.outcome
            payload.update(proposal_fields(action), rule=rule or decision.rule,
                           why=decision.detail, decision=verdict)  # fmt: skip
        await self.store.once(
            derive_id("refusal", command_id, reason),
            NewEvent(
                kind=ev.ACTION_DENIED,
                session_id=session.id,
                reason=reason,
                payload=payload,
                command_id=command_id,
                correlation_id=correlation_id,
                worker=worker,
                agent_id=action.agent_id,
            ),
        )
        log.info(
            "action.denied", action=action.name, reason=reason, detail=detail, command_id=command_id
        )
        if reason == "killswitch":
            return ActionDenied(
                f"{action.name}: kill switch: {detail}", reason=reason, command_id=command_id
            )
        return ActionDenied(f"{action.name}: {detail}", reason=reason, command_id=command_id)

    async def admit(
        self,
        action: Action,
        *,
        worker: str,
        session: Session,
        command_id: str,
        approval_key: str | None = None,
        correlation_id: str | None = None,
        pending_cap: int | None = None,
        grants: bool = True,
        read_first: bool = False,
    ) -> tuple[Permit | None, Outcome | None]:
        """Run every check up to and including the started record.

        Returns (permit, None) when the effect may run now, or (None, outcome) when a stored
        outcome answers the command (a retry). Raises ActionDenied, ApprovalPending, ActionExpired.
        `grants=False`: ask for an approval even where a window grant covered the action (one
        that a concurrent action spent before this one's started record). `read_first`: read
        the command's stored record before anything else, even on the common path.
        """
        refuse = self.refuse
        action = self.policy.mark(action)  # critical / safe_to_retry: policy decides
        args: dict[str, Any] = {"worker": worker, "session": session, "command_id": command_id,
                "correlation_id": correlation_id}  # fmt: skip

        # 1. kill switch (host file: one stat when unchanged)
        problem = self._host_verdict(action.critical)
        if problem is not None:
            raise await refuse(action, reason="killswitch", detail=problem, **args)

        # The common case (an open window, the policy allows, the model may be used) reads
        # nothing first: the started record's ledger claim finds a stored command itself, and
        # the action is then admitted again, reading first (`_Known`). Every other path reads
        # first, so that a stored outcome answers before any refusal, approval or event.
        now = self.store.clock.now()
        window_open = session.status == "open" and session.starts_at <= now < session.ends_at
        decision = self.policy.decide(action, worker)
        allowed, detail = True, ""
        if decision.outcome != "deny":
            allowed, detail = self.models.check(action.model, action.identity)
        common = window_open and decision.outcome == "allow" and allowed and not read_first

        # 2. idempotency: a stored outcome answers; the same id with other params is a conflict
        operation = f"action:{action.name}"
        stored = None
        if not common:
            stored = await self.store.lookup_action(command_id, operation, action.params)
        rerun = False
        if stored is not None:
            if stored.status in ("succeeded", "failed"):
                return None, Outcome(command_id, stored.status, stored.result, stored.error,
                                     replayed=True)  # fmt: skip
            if stored.status == "halted" or (stored.status == "in_doubt" and stored.safe_to_retry):
                rerun = True  # halted at the last look: nothing ran, so it may run
            else:
                raise await refuse(
                    action, reason="in_doubt",
                    detail=f"started before without an outcome (status {stored.status or 'unknown'}); "
                    "not re-run",
                    **args,
                )  # fmt: skip

        # promise 4: nothing runs outside an open window (the started record re-checks it)
        if not window_open:
            raise await refuse(action, reason="no_window",
                               detail=f"window {session.window_key} is not open", **args)  # fmt: skip

        # 3. policy, then model access (decided above)
        args["decision"] = decision  # every later refusal records the decision and the proposal
        if self.shadow is not None:
            self._shadow(action, worker, session, command_id, decision, allowed)
        if decision.outcome == "deny":
            raise await refuse(
                action, reason="policy", detail=decision.detail, rule=decision.rule, **args
            )
        if not allowed:
            await self.store.once(
                derive_id("model_denied", session.id, worker, action.model or ""),
                NewEvent(kind=ev.MODEL_ACCESS_DENIED, session_id=session.id, reason="model_access",
                         payload={"model": action.model, "detail": detail}, worker=worker),
            )  # fmt: skip
            raise await refuse(action, reason="model_access", detail=detail, **args)

        # 4. approval
        permit = Permit(None, None, None, command_id, decision.rule)
        # A window grant that covers the action is used by the started record's transaction
        # (see _start); without one, the action asks for an approval of its own.
        needs_approval = decision.outcome in ("require_approval", "escalate")
        usable: list[ApprovalRecord] = []
        if grants and needs_approval:
            usable = await self._usable_grants(action, worker=worker, session=session)
        if needs_approval and not usable:
            key = approval_key or command_id
            if pending_cap is not None:
                pending = await self.store.pending_of_worker(
                    fleet=self.fleet, worker=worker, other_than=self.approvals.scoped(key))  # fmt: skip
                if pending >= pending_cap:
                    await self.cap_hit(
                        "approval_cap", worker=worker, session=session, limit=pending_cap
                    )
                    raise await refuse(action, reason="approval_cap",
                                       detail=f"{pending_cap} approvals of this worker already pending",
                                       rule=decision.rule, **args)  # fmt: skip
            row = await self.approvals.request(
                key=key, action=action, worker=worker, session_id=session.id,
                escalate_now=decision.outcome == "escalate", correlation_id=correlation_id,
                decision=decision, command_id=command_id,
            )  # fmt: skip
            if row.status is ApprovalStatus.PENDING:
                raise ApprovalPending(row.id, command_id=command_id)
            if row.status is ApprovalStatus.DENIED:
                raise await refuse(action, reason="approval_denied",
                                   detail=f"denied by {row.decided_by}: {row.reason}",
                                   rule=decision.rule, **args)  # fmt: skip
            if row.status is ApprovalStatus.EXPIRED:
                await self.refuse(action, reason="approval_expired",
                                  detail="approval deadline passed", rule=decision.rule, **args)  # fmt: skip
                raise ActionExpired(
                    f"{action.name}: approval {row.id} expired", command_id=command_id
                )
            permit = Permit(row.id, row.decided_by, row.decided_at, command_id, decision.rule)

        # 5. token budgets: the estimate must fit every applicable budget. Read here to refuse
        # early; reserved again with the started record, where concurrent actions cannot both
        # take the last room.
        charges: list[TokenCharge] = []
        if action.tokens or action.cost:
            for budget in self.token_budgets.applicable(action.identity):
                key_ = TokenKey(
                    budget.scope, budget.identity, budget.period_key(now, self.timezone)
                )
                charge = TokenCharge(key_, budget.label, action.tokens, action.cost,
                                     budget.max_tokens, budget.max_cost)  # fmt: skip
                charges.append(charge)
                if rerun:
                    continue  # it may hold this charge already: the started record's check knows
                used = await self.store.token_usage(key_)
                over_tokens = used.tokens + charge.tokens > charge.max_tokens
                over_cost = (
                    charge.max_cost is not None and used.cost + charge.cost > charge.max_cost
                )
                if (over_tokens or over_cost) and common:
                    # A refusal: first what the ledger knows (a re-run may hold these tokens).
                    return await self.admit(
                        action, worker=worker, session=session, command_id=command_id,
                        approval_key=approval_key, correlation_id=correlation_id,
                        pending_cap=pending_cap, grants=grants, read_first=True,
                    )  # fmt: skip
                if over_tokens or over_cost:
                    raise await self._token_budget_spent(action, charge, used.tokens, args)

        # 6. budget reservation, store kill switches and the started record: one transaction.
        # In flight from before the record is written: a recovery scan that reads the committed
        # row before this task resumes must already see it as this process's own.
        claimed = command_id not in self.owned
        self.owned.add(command_id)
        try:
            return await self._start(action, permit, decision, operation, stored, rerun, args,
                                     usable, charges, read=not common)  # fmt: skip
        except (_GrantSpent, _Known) as again:
            if claimed:
                self.owned.discard(command_id)
            return await self.admit(
                action, worker=worker, session=session, command_id=command_id,
                approval_key=approval_key, correlation_id=correlation_id, pending_cap=pending_cap,
                grants=grants and not isinstance(again, _GrantSpent),
                read_first=read_first or isinstance(again, _Known),
            )  # fmt: skip
        except BaseException:
            if claimed:
                self.owned.discard(command_id)
            raise

    async def _start(
        self, action: Action, permit: Permit, decision: Decision, operation: str, stored: Any,
        rerun: bool, args: dict[str, Any], grants: list[ApprovalRecord],
        charges: list[TokenCharge], *, read: bool,
    ) -> tuple[Permit | None, Outcome | None]:  # fmt: skip
        """Step 6 of `admit`: the started record (or a re-run's), with its refusals; with the use
        of one of `grants` (window-scoped approvals that cover the action) when there are any.
        `read`: the command's record was read before (else a ledger row already there raises
        _Known, and the action is admitted again reading first)."""
        refuse = self.refuse
        worker, session, command_id = args["worker"], args["session"], args["command_id"]
        correlation_id = args["correlation_id"]

        # Inside the started record's transaction the store reads its switches and, again, the
        # host file (`switches.host`): an engage that landed while this action waited for the
        # store leaves no started record after it returned. Data, not a call into the gate.
        switches = self._target(action, worker, session)

        grant_ids = [g.id for g in grants]
        if rerun:
            status, info = await self.store.restart_action(
                command_id=command_id, fleet=self.fleet, session_id=session.id, worker=worker,
                name=action.name, risk=action.risk, cost=action.cost, rule=decision.rule,
                correlation_id=correlation_id, agent_id=action.agent_id, host=self.host,
                owner=self.owner, switches=switches, grant_ids=grant_ids, token_charges=charges,
            )  # fmt: skip
        else:
            status, info = await self.store.begin_action(
                command_id=command_id, operation=operation, params=action.params,
                fleet=self.fleet, session_id=session.id, worker=worker, name=action.name,
                risk=action.risk, cost=action.cost, critical=action.critical,
                safe_to_retry=action.safe_to_retry, rule=decision.rule,
                correlation_id=correlation_id, agent_id=action.agent_id, host=self.host,
                owner=self.owner, switches=switches, identity=action.identity,
                model=action.model, tokens=action.tokens, decision=decision.outcome,
                grant_ids=grant_ids, token_charges=charges,
            )  # fmt: skip
        if status == "grant_spent":
            raise _GrantSpent()
        if status == "killswitch":
            raise await refuse(action, reason="killswitch", detail=str(info.get("detail")), **args)
        if status == "token_budget":  # the room went to a concurrent action meanwhile
            over = next(c for c in charges if c.label == info["detail"])
            usage = await self.store.token_usage(over.key)
            raise await self._token_budget_spent(action, over, usage.tokens, args)
        if status == "no_window":
            raise await refuse(action, reason="no_window", detail="window closed meanwhile", **args)
        if status == "budget":
            fresh = await self.store.once(
                derive_id("budget_exhausted", session.id),
                NewEvent(kind=ev.BUDGET_EXHAUSTED, session_id=session.id, reason="budget",
                         payload={"max_cost": session.max_cost, "max_actions": session.max_actions}),
            )  # fmt: skip
            if fresh and self.on_alert:
                await self.on_alert("budget_exhausted", {"session": session.id})
            raise await refuse(action, reason="budget", detail="window budget spent", **args)
        if status == "replay" and not read:
            raise _Known()  # a command this ledger knows: read what became of it, then decide
        if status == "replay":
            # A racing twin wrote the started record (or the re-run's) first: it owns the effect.
            raise await refuse(
                action, reason="in_doubt", detail="started by a concurrent retry", **args
            )
        if stored is None and action.safe_to_retry is False and info.get("status") != "started":
            raise StateWriteError(f"unexpected begin result {info}")
        used = next((g for g in grants if g.id == info.get("grant")), None)
        if used is not None:
            permit = Permit(used.id, used.decided_by, used.decided_at, command_id,
                            decision.rule)  # fmt: skip
        return permit, None

    def _shadow(
        self,
        action: Action,
        worker: str,
        session: Session,
        command_id: str,
        decision: Decision,
        model_allowed: bool,
    ) -> None:
        """Decide with the shadow candidate too and queue a POLICY_SHADOW telemetry event where
        it disagrees. Synchronous and never raising: it cannot block or delay the action."""
        shadow = self.shadow
        assert shadow is not None
        try:
            live = decision.outcome if model_allowed else "deny"
            seen = shadow.decide(action, worker)
            if seen.outcome == live or not shadow.first_report(command_id):
                return
            shadow.disagreements += 1
            self.store.buffer_telemetry(NewEvent(
                kind=ev.POLICY_SHADOW, session_id=session.id, state_bearing=False,
                reason=f"{live}->{seen.outcome}", command_id=command_id, worker=worker,
                payload={"action": action.name, "risk": action.risk, "live": live,
                         "live_rule": decision.rule if model_allowed else "model_access",
                         "shadow": seen.outcome, "shadow_rule": seen.rule, "why": seen.detail},
            ))  # fmt: skip
        except Exception as exc:  # a shadow's failure is counted and logged, never raised
            shadow.failed(exc)

    @asynccontextmanager
    async def attempt(
        self,
        action: Action,
        *,
        worker: str,
        session: Session,
        command_id: str,
        approval_key: str | None = None,
        correlation_id: str | None = None,
        pending_cap: int | None = None,
    ) -> AsyncIterator[Attempt]:
        """The one path of an action's life: admit (every check, the started record), the last
        look, the block (the effect), the outcome record. `ctx.dispatch`, `ctx.guard` and the
        external worker's proposals all come through here; nothing else writes an outcome.

        The block sees `attempt.replay` set when a stored outcome answers the command (nothing
        may run), else `attempt.permit`; it may set `attempt.result`. A block that raises is
        recorded failed and the exception goes on; cancellation leaves the started record open
        (the outcome is unknown: the recovery scan marks it in-doubt, guessing would be a lie)."""
        t0 = time.perf_counter()
        action = self.policy.mark(action)
        # Tokens, not bound_contextvars (which copies the whole log context on every action).
        bound = structlog.contextvars.bind_contextvars(command_id=command_id)
        try:
            permit, replay = await self.admit(
                action, worker=worker, session=session, command_id=command_id,
                approval_key=approval_key, correlation_id=correlation_id, pending_cap=pending_cap,
            )  # fmt: skip
            if replay is not None:
                yield Attempt(command_id, None, replay)
                return
            assert permit is not None
            attempt = Attempt(command_id, permit, None)
            try:
                async with self._effect(action, attempt, worker=worker, session=session,
                                        correlation_id=correlation_id, t0=t0):  # fmt: skip
                    yield attempt
            finally:
                self.owned.discard(command_id)  # finished, refused at the last look, or abandoned
        finally:
            structlog.contextvars.reset_contextvars(**bound)

    async def run(
        self,
        action: Action,
        effect: Effect,
        *,
        worker: str,
        session: Session,
        command_id: str,
        approval_key: str | None = None,
        correlation_id: str | None = None,
        pending_cap: int | None = None,
    ) -> Outcome:
        """`attempt` around `effect`: its Outcome, a failed effect included (not raised)."""
        attempt: Attempt | None = None
        try:
            async with self.attempt(
                action, worker=worker, session=session, command_id=command_id,
                approval_key=approval_key, correlation_id=correlation_id, pending_cap=pending_cap,
            ) as attempt:  # fmt: skip
                if attempt.replay is not None:
                    return attempt.replay
                attempt.result = await effect()
        except Exception:
            if attempt is not None and attempt.outcome is not None:
                return attempt.outcome  # the effect failed, and that is recorded
            raise
        assert attempt.outcome is not None
        return attempt.outcome

    @asynccontextmanager
    async def _effect(
        self, action: Action, attempt: Attempt, *, worker: str, session: Session,
        correlation_id: str | None, t0: float,
    ) -> AsyncIterator[None]:  # fmt: skip
        command_id = attempt.command_id
        # Tracked from the last look on: an emergency observed while it reads the switches
        # stops the action before its effect.
        entry = self.track(command_id, worker, session.id)
        try:
            await self.last_look(action, worker=worker, session=session, command_id=command_id,
                                 entry=entry)  # fmt: skip
        except BaseException:
            self.in_flight.pop(command_id, None)
            raise
        if self.stats.latencies is not None:
            self.stats.latencies.append(time.perf_counter() - t0)
        self.stats.admitted += 1
        if self.observer is not None:
            self.observer.observe_latency(time.perf_counter() - t0)
        try:
            with entry.scope:  # an emergency cancels the block at its next await
                yield
        except Exception as exc:
            if entry.stopped_by is not None:
                raise await self.stopped(action, entry, worker=worker, session=session,
                                         command_id=command_id) from None  # fmt: skip
            error = f"{type(exc).__name__}: {exc}"
            await self.finish(action, worker=worker, session=session, command_id=command_id,
                              ok=False, error=error, correlation_id=correlation_id)  # fmt: skip
            attempt.outcome = Outcome(command_id, "failed", None, error, replayed=False)
            raise
        except BaseException as exc:
            # A stopped external child may be seen to die (EOF) before the cancellation lands.
            if entry.stopped_by is not None and not isinstance(
                exc, anyio.get_cancelled_exc_class()
            ):
                raise await self.stopped(action, entry, worker=worker, session=session,
                                         command_id=command_id) from None  # fmt: skip
            raise
        finally:
            self.in_flight.pop(command_id, None)
        if entry.scope.cancelled_caught or entry.stopped_by is not None:
            raise await self.stopped(action, entry, worker=worker, session=session,
                                     command_id=command_id)  # fmt: skip
        await self.finish(action, worker=worker, session=session, command_id=command_id,
                          ok=True, result=attempt.result, correlation_id=correlation_id)  # fmt: skip
        attempt.outcome = Outcome(command_id, "succeeded", attempt.result, None, replayed=False)

    def switch_moved(self, clock: Any) -> None:
        """A switch changed (the daemon's watchers call this): wake everyone waiting on it."""
        changed, self.switch_changed = self.switch_changed, anyio.Event()
        clock.ring(changed)

    def halted(self, *, worker: str, session_id: str, critical: bool = False) -> str | None:
        """The host switch's verdict now, as a waiting worker sees it (no store read)."""
        return self._host_verdict(critical)

    async def last_look(
        self, action: Action, *, worker: str, session: Session, command_id: str,
        entry: InFlight | None = None,
    ) -> None:  # fmt: skip
        """Every switch read again right before the effect: an engage that landed after the
        started record stops it here, and the record is closed as halted with nothing run."""
        records = await self.store.kill_switches(self.fleet)
        # The host file last: nothing may await between reading it and the effect, or an engage
        # could land and return while this task waits for the store.
        problem = self._verdict(action, records, worker, session)
        if problem is None and entry is not None:
            problem = entry.stopped_by  # an emergency observed while the rows were read
        if problem is None:
            return
        await self.store.finish_action(
            command_id=command_id, session_id=session.id, ok=False, cost=action.cost,
            error=f"kill switch: {problem}", worker=worker, status="halted", reason="killswitch",
            tokens_held=_may_hold_tokens(action),
        )  # fmt: skip
        raise ActionDenied(f"{action.name}: kill switch: {problem}", reason="killswitch",
                           command_id=command_id)  # fmt: skip

    async def finish(
        self,
        action: Action,
        *,
        worker: str,
        session: Session,
        command_id: str,
        ok: bool,
        result: Any = None,
        error: str | None = None,
        correlation_id: str | None = None,
    ) -> None:
        tokens_used = None
        if ok and isinstance(result, Mapping) and isinstance(result.get("tokens"), int):
            tokens_used = int(result["tokens"])  # actual usage reported by the effect
        stopped = await self.store.finish_action(
            command_id=command_id, session_id=session.id, ok=ok, cost=action.cost,
            result=result, error=error, worker=worker, correlation_id=correlation_id,
            tokens_held=_may_hold_tokens(action), tokens_used=tokens_used,
            # An emergency engaged while the effect ran: its outcome is not recorded as done.
            stop_target=self._target(action, worker, session) if ok else None,
            halt_all_stops=self.halt_in_flight == "terminate", fleet=self.fleet,
        )  # fmt: skip
        if stopped is not None:
            log.error("action.stopped_in_flight", action=action.name, command_id=command_id,
                      by=stopped)  # fmt: skip
            raise ActionDenied(f"{action.name}: outcome not recorded, the kill switch stopped "
                               f"effects in flight ({stopped})", reason="killswitch",
                               command_id=command_id)  # fmt: skip
        if self.observer is not None:
            self.observer.observe_action("succeeded" if ok else "failed")


def _may_hold_tokens(action: Action) -> bool:
    """Whether the action's started record may hold token charges (an identity a budget can
    name, and an estimate): only then does its outcome read its holds."""
    return bool(action.identity) and bool(action.tokens or action.cost)


class _GrantSpent(Exception):
    """Internal: every window grant the action counted on was spent before its started record."""


class _Known(Exception):
    """Internal: the started record's ledger claim found the command_id already there (a retry,
    a conflict or a racing twin), on the path that had not read it first."""


# Refusals where governance itself said no (the rest refuse what governance let through).
_GOVERNANCE_DENIALS = frozenset({"policy", "model_access", "token_budget"})
