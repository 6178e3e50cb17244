"""A candidate policy against history (`policy replay`) and beside the live one (shadow mode).

Both decide with the same code the gate uses: `Policy.decide`, then `ModelGovernor.check`
(`govern` below), then, for replay only, the candidate's token budgets over the replayed
proposals in time order.

Replay is off the live path and read-only: it reads each window's recorded proposals through
`Store.proposal_rows` (action rows, ACTION_DENIED and APPROVAL_REQUESTED events) in one snapshot
per window and writes nothing. A proposal is counted once per command_id, at its first record;
refusals made before the policy spoke (kill switch, closed window, in-doubt) are not proposals
the policy decided and are left out.

Spend is what the decisions imply, not what was charged: the cost and tokens of every proposal a
policy does not deny (approvals assumed granted). Token budgets start empty at the first replayed
window, so a budget period that began before it is counted from there.
"""

from __future__ import annotations

import json
import os
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import structlog

from ..actions import Action
from ..cli import tables
from ..config import Candidate, Config, load_candidate
from ..errors import ConfigError, NotFound, SupervisorError
from ..store import Session, Store
from .policy import Outcome

log = structlog.get_logger(__name__)

APPROVALS: frozenset[str] = frozenset({"require_approval", "escalate"})
REPORTED_MAX = 10_000  # command ids a shadow remembers having reported
FAIL_ON = ("deny-increase", "approval-increase", "allow-increase", "spend-increase", "any-change")


@dataclass(frozen=True, slots=True)
class Verdict:
    outcome: Outcome
    rule: str
    detail: str


def govern(candidate: Candidate, action: Action, worker: str) -> Verdict:
    """The candidate's decision on one proposal: its policy, then its model rules (as the gate)."""
    decision = candidate.policy.decide(action, worker)
    if decision.outcome == "deny":
        return Verdict("deny", decision.rule, decision.detail)
    allowed, detail = candidate.models.check(action.model, action.identity)
    if not allowed:
        return Verdict("deny", "model_access", detail)
    return Verdict(decision.outcome, decision.rule, decision.detail)


# --- shadow mode -------------------------------------------------------------------------------


class ShadowUnavailable(SupervisorError):
    reason = "shadow"


class ShadowPolicy:
    """The `[policy] shadow` candidate, re-read when its file changes (one stat per proposal).

    `decide` raises when the file is missing or invalid; the gate counts and logs that and goes
    on with the live decision alone. Nothing here awaits, so it cannot delay an action.
    """

    def __init__(self, path: Path, base: Config) -> None:
        self.path = path
        self.base = base
        self.errors = 0
        self.disagreements = 0
        self._stamp: tuple[int, int, int] | None = None
        self._candidate: Candidate | None = None
        self._problem = "not loaded"
        self._logged: str | None = None
        # Commands already reported: a retried proposal (a pending approval asked again every
        # cycle) is one disagreement, not one per retry. Bounded: the oldest are forgotten.
        self._reported: OrderedDict[str, None] = OrderedDict()
        self._refresh()

    def first_report(self, command_id: str) -> bool:
        """True the first time a disagreement on `command_id` is reported (recently)."""
        if command_id in self._reported:
            return False
        self._reported[command_id] = None
        if len(self._reported) > REPORTED_MAX:
            self._reported.popitem(last=False)
        return True

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            self._stamp, self._candidate = None, None
            self._problem = f"cannot read {self.path}: {exc.strerror or exc}"
            return
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            self._candidate = load_candidate(self.path, self.base)
        except ConfigError as exc:
            self._candidate, self._problem = None, str(exc)
            return
        log.info("policy.shadow_loaded", path=str(self.path))

    def decide(self, action: Action, worker: str) -> Verdict:
        self._refresh()
        if self._candidate is None:
            raise ShadowUnavailable(f"shadow policy unavailable: {self._problem}")
        return govern(self._candidate, action, worker)

    def failed(self, exc: Exception) -> None:
        """Count a failure; log it when it is new, then every 100th, so a broken file that
        fails every proposal does not flood the log."""
        self.errors += 1
        message = f"{type(exc).__name__}: {exc}"
        if message != self._logged or self.errors % 100 == 0:
            self._logged = message
            log.error("policy.shadow_failed", error=message, errors=self.errors)


def shadow_for(config: Config) -> ShadowPolicy | None:
    return ShadowPolicy(config.policy_shadow, config) if config.policy_shadow else None


# --- replay ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Proposal:
    """One recorded proposal, as governance saw it."""

    command_id: str
    at: datetime
    worker: str
    action: Action
    decision: str  # the recorded governance decision (an Outcome), or "unknown" before it was kept


def _identity(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, Mapping):
        return {}
    return {str(k): str(v) for k, v in value.items() if v is not None}


def proposals_of(actions: Iterable[Mapping[str, Any]], refusals: Iterable[Mapping[str, Any]],
                 counts: Counter[str]) -> list[Proposal]:  # fmt: skip
    """One window's proposals in time order, once per command_id; unreadable rows are counted
    in `counts["unreadable"]`, refusals the policy never saw in `counts["not_decided"]`."""
    found: list[Proposal] = []
    identities: dict[str | None, dict[str, str]] = {}  # the same few identities, parsed once
    for row in actions:
        try:
            text = row["identity"]
            identity = identities.get(text)
            if identity is None:
                identity = identities[text] = _identity(text)
            action = Action.recorded(
                row["name"], json.loads(row["params"]), row["risk"], float(row["cost"]),
                row["model"], int(row["tokens"] or 0), identity,
            )  # fmt: skip
        except (SupervisorError, ValueError, TypeError, KeyError):
            counts["unreadable"] += 1
            continue
        found.append(Proposal(row["command_id"], row["seen_at"], row["worker"], action,
                              row["decision"] or "unknown"))  # fmt: skip
    for row in refusals:
        try:
            payload = json.loads(row["payload"])
            if "decision" not in payload:
                counts["not_decided"] += 1
                continue
            command_id = row["command_id"] or payload.get("command_id")
            action = Action.recorded(
                payload["action"], payload.get("params") or {}, payload.get("risk", "low"),
                float(payload.get("cost") or 0), payload.get("model"),
                int(payload.get("tokens") or 0), _identity(payload.get("identity")),
            )  # fmt: skip
        except (SupervisorError, ValueError, TypeError, KeyError, AttributeError):
            counts["unreadable"] += 1
            continue
        if not command_id:
            counts["unreadable"] += 1
            continue
        found.append(Proposal(command_id, row["seen_at"], row["worker"] or "", action,
                              str(payload["decision"])))  # fmt: skip
    found.sort(key=lambda p: p.at)
    seen: set[str] = set()
    unique: list[Proposal] = []
    for p in found:
        if p.command_id in seen:
            continue  # an approval request and the action it let start: one proposal
        seen.add(p.command_id)
        unique.append(p)
    return unique


@dataclass
class Tally:
    allow: int = 0
    approval: int = 0
    deny: int = 0
    unknown: int = 0
    cost: float = 0.0
    tokens: int = 0

    def add(self, outcome: str, action: Action) -> None:
        if outcome == "allow":
            self.allow += 1
        elif outcome in APPROVALS:
            self.approval += 1
        elif outcome == "deny":
            self.deny += 1
        else:
            self.unknown += 1
        if outcome != "deny":
            self.cost += action.cost
            self.tokens += action.tokens

    def merge(self, other: Tally) -> None:
        self.allow += other.allow
        self.approval += other.approval
        self.deny += other.deny
        self.unknown += other.unknown
        self.cost += other.cost
        self.tokens += other.tokens

    def as_dict(self) -> dict[str, Any]:
        return {"allow": self.allow, "approval": self.approval, "deny": self.deny,
                "unknown": self.unknown, "cost": round(self.cost, 6), "tokens": self.tokens}  # fmt: skip


@dataclass
class WindowReport:
    session_id: str
    window: str
    proposals: int = 0
    changed: int = 0
    recorded: Tally = field(default_factory=Tally)
    candidate: Tally = field(default_factory=Tally)

    def as_dict(self) -> dict[str, Any]:
        return {"session_id": self.session_id, "window": self.window, "proposals": self.proposals,
                "changed": self.changed, "recorded": self.recorded.as_dict(),
                "candidate": self.candidate.as_dict()}  # fmt: skip


@dataclass
class Report:
    candidate: str
    windows: list[WindowReport] = field(default_factory=list)
    transitions: Counter[tuple[str, str]] = field(default_factory=Counter)
    by_action: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    by_rule: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    counts: Counter[str] = field(default_factory=Counter)
    recorded: Tally = field(default_factory=Tally)
    proposed: Tally = field(default_factory=Tally)

    @property
    def spared(self) -> int:
        """Approvals the candidate would not have asked for."""
        return sum(
            n for (a, b), n in self.transitions.items() if a in APPROVALS and b not in APPROVALS
        )

    @property
    def added(self) -> int:
        return sum(
            n for (a, b), n in self.transitions.items() if a not in APPROVALS and b in APPROVALS
        )

    @property
    def changed(self) -> int:
        return sum(n for (a, b), n in self.transitions.items() if a != b)

    def failures(self, checks: Sequence[str]) -> list[str]:
        """The --fail-on checks this report trips, each as one line."""
        out: list[str] = []
        r, c = self.recorded, self.proposed
        for check in checks:
            if check == "deny-increase" and c.deny > r.deny:
                out.append(f"deny-increase: {c.deny - r.deny} more denials ({r.deny} -> {c.deny})")
            elif check == "approval-increase" and self.added > self.spared:
                out.append(f"approval-increase: {self.added - self.spared} more approvals "
                           f"({self.added} added, {self.spared} spared)")  # fmt: skip
            elif check == "allow-increase" and c.allow > r.allow:
                out.append(f"allow-increase: {c.allow - r.allow} more actions allowed at once "
                           f"({r.allow} -> {c.allow})")  # fmt: skip
            elif check == "spend-increase" and (c.cost > r.cost + 1e-9 or c.tokens > r.tokens):
                out.append(f"spend-increase: cost {r.cost:.2f} -> {c.cost:.2f}, "
                           f"tokens {r.tokens} -> {c.tokens}")  # fmt: skip
            elif check == "any-change" and self.changed:
                out.append(f"any-change: {self.changed} of {self.counts['proposals']} proposals "
                           "decided otherwise")  # fmt: skip
        return out

    def as_dict(self) -> dict[str, Any]:
        def rows(counter: Counter[Any], names: tuple[str, ...]) -> list[dict[str, Any]]:
            return [{**dict(zip(names, key, strict=True)), "count": n}
                    for key, n in sorted(counter.items())]  # fmt: skip

        return {
            "candidate": self.candidate,
            "proposals": self.counts["proposals"],
            "not_decided": self.counts["not_decided"],
            "unreadable": self.counts["unreadable"],
            "changed": self.changed,
            "approvals_spared": self.spared,
            "approvals_added": self.added,
            "recorded": self.recorded.as_dict(),
            "candidate_totals": self.proposed.as_dict(),
            "transitions": rows(self.transitions, ("from", "to")),
            "by_action": rows(self.by_action, ("action", "from", "to")),
            "by_rule": rows(self.by_rule, ("rule", "from", "to")),
            "windows": [w.as_dict() for w in self.windows],
        }

    def render(self) -> str:
        n = self.counts
        lines = [
            f"policy replay of {self.candidate}: {len(self.windows)} windows, {n['proposals']} "
            f"proposals, {self.changed} decided otherwise"
            + (f" ({n['unreadable']} unreadable rows skipped)" if n["unreadable"] else ""),
            "",
            tables.table(
                ["FROM", "TO", "COUNT"],
                ([a, b, c] for (a, b), c in sorted(self.transitions.items())),
                "no proposals",
            ),
        ]
        changes = [(k, c) for k, c in sorted(self.by_action.items()) if k[1] != k[2]]
        if changes:
            lines += ["", "changes by action",
                      tables.table(["ACTION", "FROM", "TO", "COUNT"],
                                   ([*k, c] for k, c in changes), "")]  # fmt: skip
            lines += ["", "changes by candidate rule",
                      tables.table(["RULE", "FROM", "TO", "COUNT"],
                                   ([*k, c] for k, c in sorted(self.by_rule.items())
                                    if k[1] != k[2]), "")]  # fmt: skip
        lines += ["", f"approvals: {self.spared} spared, {self.added} added", "",
                  "per window (recorded -> candidate; spend counts what is not denied)"]  # fmt: skip

        def pair(a: object, b: object) -> str:
            return f"{a} -> {b}"

        lines.append(tables.table(
            ["WINDOW", "PROPOSALS", "CHANGED", "ALLOW", "APPROVAL", "DENY", "COST", "TOKENS"],
            ([w.window, w.proposals, w.changed, pair(w.recorded.allow, w.candidate.allow),
              pair(w.recorded.approval, w.candidate.approval), pair(w.recorded.deny, w.candidate.deny),
              pair(f"{w.recorded.cost:.2f}", f"{w.candidate.cost:.2f}"),
              pair(w.recorded.tokens, w.candidate.tokens)] for w in self.windows),
            "no windows"))  # fmt: skip
        return "\n".join(lines)


class _TokenLedger:
    """The candidate's token budgets, charged as the replay goes (nothing is written)."""

    def __init__(self, candidate: Candidate, tz: ZoneInfo) -> None:
        self.candidate = candidate
        self.tz = tz
        self.used: dict[tuple[str, str], tuple[int, float]] = {}

    def check(self, proposal: Proposal, verdict: Verdict) -> Verdict:
        action = proposal.action
        if verdict.outcome == "deny" or not (action.tokens or action.cost):
            return verdict
        budgets = self.candidate.token_budgets.applicable(action.identity)
        keys = [(b.label, b.period_key(proposal.at, self.tz)) for b in budgets]
        for budget, key in zip(budgets, keys, strict=True):
            tokens, cost = self.used.get(key, (0, 0.0))
            if tokens + action.tokens > budget.max_tokens or (
                budget.max_cost is not None and cost + action.cost > budget.max_cost
            ):
                return Verdict("deny", "token_budget", f"token budget {key[0]} ({key[1]}) spent")
        for key in keys:
            tokens, cost = self.used.get(key, (0, 0.0))
            self.used[key] = (tokens + action.tokens, cost + action.cost)
        return verdict


class _Memo:
    """`govern` is pure in what it reads: the action's name and risk, the worker, the params at
    the paths the candidate's conditions name, the model and the identity. Proposals that agree
    on all of those get the same verdict, computed once (a week repeats the same few shapes)."""

    def __init__(self, candidate: Candidate) -> None:
        self.candidate = candidate
        self.paths = sorted({c.path for rule in candidate.policy.rules for c in rule.when})
        self.verdicts: dict[tuple[Any, ...], Verdict] = {}

    def key(self, action: Action, worker: str) -> tuple[Any, ...] | None:
        values: list[Any] = []
        for path in self.paths:
            node: Any = action.params
            for part in path:
                if not isinstance(node, Mapping) or part not in node:
                    values.append(_ABSENT)
                    break
                node = node[part]
            else:
                if not isinstance(node, str | int | float | bool | None):
                    return None  # a table or a list: decided without the memo
                values.append((type(node), node))  # True and 1 differ to a condition
        identity = tuple(sorted(action.identity.items()))
        return (action.name, action.risk, worker, action.model, identity, *values)

    def decide(self, action: Action, worker: str) -> Verdict:
        key = self.key(action, worker)
        if key is None:
            return govern(self.candidate, action, worker)
        verdict = self.verdicts.get(key)
        if verdict is None:
            verdict = self.verdicts[key] = govern(self.candidate, action, worker)
        return verdict


_ABSENT = ("absent",)  # a param the action does not have (hashable, unlike a bare object())


def replay(candidate: Candidate, windows: Sequence[tuple[Session, list[Proposal]]],
           tz: ZoneInfo) -> Report:  # fmt: skip
    """Decide every proposal again with the candidate and count what changes."""
    report = Report(candidate.source)
    ledger = _TokenLedger(candidate, tz)
    memo = _Memo(candidate)
    for session, proposals in windows:
        w = WindowReport(session.id, session.window_key)
        for p in proposals:
            verdict = ledger.check(p, memo.decide(p.action, p.worker))
            before, after = p.decision, verdict.outcome
            w.proposals += 1
            w.recorded.add(before, p.action)
            w.candidate.add(after, p.action)
            report.transitions[(before, after)] += 1
            report.by_action[(p.action.name, before, after)] += 1
            report.by_rule[(verdict.rule, before, after)] += 1
            if before != after:
                w.changed += 1
        report.counts["proposals"] += w.proposals
        report.recorded.merge(w.recorded)
        report.proposed.merge(w.candidate)
        report.windows.append(w)
    return report


async def choose_windows(store: Store, fleet: str, *, ids: Sequence[str],
                         since: float | None) -> list[Session]:  # fmt: skip
    """The windows named by id (or unique prefix), else those ending within `since` seconds of
    the newest window's end (history, not the wall clock: a simulated run replays the same)."""
    sessions = sorted(await store.list_sessions(fleet, 1_000_000), key=lambda s: s.starts_at)
    if ids:
        by_id = {s.id: s for s in sessions}
        chosen: list[Session] = []
        for text in ids:
            resolved = tables.resolve_prefix(by_id, text, "window")
            if resolved is None:
                raise NotFound(f"unknown window {text!r} in fleet {fleet!r}")
            if by_id[resolved] not in chosen:
                chosen.append(by_id[resolved])
        return sorted(chosen, key=lambda s: s.starts_at)
    if not sessions:
        return []
    newest = max(s.ends_at for s in sessions)
    start = newest - timedelta(seconds=since or 7 * 86400)
    return [s for s in sessions if s.ends_at > start]


async def load_window(store: Store, session: Session, counts: Counter[str]) -> list[Proposal]:
    actions, refusals = await store.proposal_rows(session.id)
    return proposals_of(actions, refusals, counts)


async def run_replay(store: Store, config: Config, candidate: Candidate, *, ids: Sequence[str],
                     since: float | None) -> Report:  # fmt: skip
    windows = await choose_windows(store, config.fleet, ids=ids, since=since)
    counts: Counter[str] = Counter()
    loaded = [(s, await load_window(store, s, counts)) for s in windows]
    report = replay(candidate, loaded, config.timezone)
    report.counts.update(counts)
    return report
