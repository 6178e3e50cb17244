"""Policy: what the gate does with an action, decided from config alone.

Order of evaluation: explicit rules in config order (first match wins), then the risk table,
then `unmatched`. `from_config` merges the risk defaults, so every risk has an entry and
`unmatched` is only reached by a `Policy` built in code with a partial risk table; it still
defaults to `require_approval` so that such a gap fails closed.

Config (section `[policy]`, every key optional)::

    unmatched = "require_approval"
    [policy.risk]    # defaults: low, medium allow; high require_approval; critical deny
    high = "escalate"
    [[policy.rules]]
    name = "no-prod-deletes"       # required, unique
    action = "db.delete*"          # fnmatch glob on the action name (case-sensitive)
    risk = ["high", "critical"]    # one risk or a list
    worker = "support-*"           # fnmatch glob on the worker name
    when = [ { param = "target.env", op = "==", value = "prod" } ]
    outcome = "deny"               # required

    critical = ["deploy.rollback", "incident.*"]   # action names that run under halt_noncritical
    safe_to_retry = ["report.*"]                   # action names re-run after an in-doubt crash

`critical` and `safe_to_retry` are decisions of policy, by action name (fnmatch globs). An
in-process worker (trusted code) may also mark its own actions; what an external worker says
about them is a claim, recorded and ignored (docs/security.md).

A rule matches when every matcher it has matches; a rule with none matches every action.
Conditions read `action.params`; a dotted `param` walks nested tables. A missing param makes
the condition false (except `exists`), and so does a comparison between different kinds of
value ("abc" > 5, "5" == 5, true == 1): a type mismatch never raises and never matches.
Error messages index rules and conditions from 0, as in `policy.rules[0]`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast, get_args

from ..actions import RISKS, Action, Risk
from ..configparse import array, check_keys, nonempty_str, table, type_name
from ..errors import ConfigError
from ..schema import keys

Outcome = Literal["allow", "deny", "require_approval", "escalate"]
OUTCOMES: tuple[Outcome, ...] = get_args(Outcome)

Op = Literal["==", "!=", ">", ">=", "<", "<=", "in", "not_in", "exists"]
OPS: tuple[Op, ...] = get_args(Op)

DEFAULT_RISK: Mapping[Risk, Outcome] = {
    "low": "allow",
    "medium": "allow",
    "high": "require_approval",
    "critical": "deny",
}
DEFAULT_UNMATCHED: Outcome = "require_approval"

_ORDERING: frozenset[str] = frozenset({">", ">=", "<", "<="})
_MISSING = object()


def _kind(value: object) -> str:
    """Which values may be compared with each other: bool is not a number, str is not either."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return type_name(value)


def _same(a: object, b: object) -> bool:
    return _kind(a) == _kind(b) and a == b


def _lookup(params: Mapping[str, Any], path: tuple[str, ...]) -> object:
    node: object = params
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


@dataclass(frozen=True, slots=True)
class Condition:
    param: str
    op: Op
    value: Any = None

    @property
    def path(self) -> tuple[str, ...]:
        return tuple(self.param.split("."))

    def test(self, params: Mapping[str, Any]) -> bool:
        found = _lookup(params, self.path)
        if self.op == "exists":
            return found is not _MISSING
        if found is _MISSING:
            return False
        if self.op in ("in", "not_in"):
            # Only members of the param's kind count; with none, the comparison is a mismatch.
            comparable = [v for v in self.value if _kind(v) == _kind(found)]
            if not comparable:
                return False
            hit = any(v == found for v in comparable)
            return hit if self.op == "in" else not hit
        if _kind(found) != _kind(self.value):
            return False
        if self.op == "==":
            return bool(found == self.value)
        if self.op == "!=":
            return bool(found != self.value)
        if _kind(found) not in ("number", "string"):
            return False
        a, b = cast(Any, found), cast(Any, self.value)
        if self.op == ">":
            return bool(a > b)
        if self.op == ">=":
            return bool(a >= b)
        if self.op == "<":
            return bool(a < b)
        return bool(a <= b)

    def miss(self, params: Mapping[str, Any]) -> str | None:
        """None when the condition holds, else why not (for the explanation)."""
        if self.test(params):
            return None
        found = _lookup(params, self.path)
        shown = "missing" if found is _MISSING else repr(found)
        return f"{self.describe()} is false ({self.param} is {shown})"

    def describe(self) -> str:
        if self.op == "exists":
            return f"{self.param} exists"
        return f"{self.param} {self.op} {self.value!r}"


_MATCH = -1  # Rule.first_miss: every matcher matched


def _glob(pattern: str | None) -> re.Pattern[str] | None:
    """The compiled form of an fnmatch glob: what `fnmatchcase` matches, without its cache."""
    return re.compile(fnmatch.translate(pattern)) if pattern is not None else None


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    outcome: Outcome
    action: str | None = None
    risks: frozenset[Risk] | None = None
    worker: str | None = None
    when: tuple[Condition, ...] = ()
    _action_re: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)
    _worker_re: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)
    _described: str = field(default="", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_action_re", _glob(self.action))
        object.__setattr__(self, "_worker_re", _glob(self.worker))
        object.__setattr__(self, "_described", self._describe())

    def matches(self, action: Action, worker: str) -> bool:
        return self.first_miss(action, worker) == _MATCH

    def first_miss(self, action: Action, worker: str) -> int:
        """Which matcher fails first: 0 action, 1 risk, 2 worker, 3 + j condition j; or _MATCH.
        A number, not words, so the gate's pass allocates nothing; `why_not` says it in words."""
        if self._action_re is not None and self._action_re.match(action.name) is None:
            return 0
        if self.risks is not None and action.risk not in self.risks:
            return 1
        if self._worker_re is not None and self._worker_re.match(worker) is None:
            return 2
        for j, condition in enumerate(self.when):
            if not condition.test(action.params):
                return 3 + j
        return _MATCH

    def why_not(self, code: int, action: Action, worker: str) -> str:
        if code == 0:
            return f"action {action.name!r} does not match {self.action!r}"
        if code == 1:
            assert self.risks is not None
            return f"risk {action.risk} is not " + "|".join(r for r in RISKS if r in self.risks)
        if code == 2:
            return f"worker {worker!r} does not match {self.worker!r}"
        return self.when[code - 3].miss(action.params) or "condition false"

    def miss(self, action: Action, worker: str) -> str | None:
        """None when the rule matches, else the first matcher that does not, and why."""
        code = self.first_miss(action, worker)
        return None if code == _MATCH else self.why_not(code, action, worker)

    def describe(self) -> str:
        return self._described

    def _describe(self) -> str:
        parts: list[str] = []
        if self.action is not None:
            parts.append(f"action {self.action!r}")
        if self.risks is not None:
            parts.append("risk " + "|".join(r for r in RISKS if r in self.risks))
        if self.worker is not None:
            parts.append(f"worker {self.worker!r}")
        parts.extend(c.describe() for c in self.when)
        return ", ".join(parts) or "every action"


@dataclass(frozen=True, slots=True)
class Step:
    """One stage the decision went through: a rule, the risk table, or the fallback."""

    kind: Literal["rule", "risk", "unmatched"]
    name: str  # the rule's name, "risk:<risk>", or "unmatched"
    matched: bool
    why: str
    outcome: Outcome | None = None  # what this stage decides, when it matched

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "matched": self.matched,
                "why": self.why, "outcome": self.outcome}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Decision:
    """What the policy decided and the path that led there. The gate acts on `outcome`; `path`
    is the explanation, built by the same pass, so the two cannot disagree."""

    outcome: Outcome
    rule: str  # the rule's name, "risk:<risk>", or "unmatched"
    detail: str  # the short reason stored with denials and approval requests
    trail: _Trail | None = field(default=None, compare=False, repr=False)

    @property
    def path(self) -> tuple[Step, ...]:
        """Every stage considered, in order; the last one decided."""
        return self.trail.steps(self.outcome) if self.trail is not None else ()

    def as_dict(self) -> dict[str, Any]:
        return {"outcome": self.outcome, "rule": self.rule, "reason": self.detail,
                "path": [step.as_dict() for step in self.path]}  # fmt: skip

    def render(self) -> str:
        lines = [f"decision: {self.outcome} (rule {self.rule})", f"reason:   {self.detail}"]
        for i, step in enumerate(self.path, 1):
            verdict = f"match -> {step.outcome}" if step.matched else "no match"
            label = {"rule": f"rule {step.name!r}", "risk": "risk default",
                     "unmatched": "unmatched fallback"}[step.kind]  # fmt: skip
            lines.append(f"  {i}. {label}: {verdict}: {step.why}")
        if self.path and self.path[-1].kind == "rule":
            lines.append(
                "  (later rules, the risk defaults and the unmatched fallback not reached)"
            )
        return "\n".join(lines)


class _Trail:
    """What one pass of `Policy.decide` went through: for each rule it passed, the code of the
    matcher that failed; and where it stopped. Put into words only when someone asks."""

    __slots__ = ("action", "misses", "policy", "stop", "worker")

    def __init__(self, policy: Policy, action: Action, worker: str, misses: list[int],
                 stop: Literal["rule", "risk", "unmatched"]) -> None:  # fmt: skip
        self.policy, self.action, self.worker = policy, action, worker
        self.misses, self.stop = misses, stop

    def steps(self, outcome: Outcome) -> tuple[Step, ...]:
        rules, action, risk = self.policy.rules, self.action, self.action.risk
        path = [Step("rule", rules[i].name, False, rules[i].why_not(code, action, self.worker))
                for i, code in enumerate(self.misses)]  # fmt: skip
        if self.stop == "rule":
            rule = rules[len(self.misses)]
            path.append(Step("rule", rule.name, True, f"matches {rule.describe()}", outcome))
        elif self.stop == "risk":
            path.append(Step("risk", f"risk:{risk}", True, f"risk {risk}: {outcome}", outcome))
        else:
            path.append(Step("risk", f"risk:{risk}", False, f"risk {risk} has no entry"))
            path.append(Step("unmatched", "unmatched", True, "the fallback", outcome))
        return tuple(path)


@dataclass(frozen=True, slots=True)
class Policy:
    rules: tuple[Rule, ...] = ()
    risk: Mapping[Risk, Outcome] = field(default_factory=lambda: dict(DEFAULT_RISK))
    unmatched: Outcome = DEFAULT_UNMATCHED
    critical: tuple[str, ...] = ()  # action-name globs policy marks critical
    safe_to_retry: tuple[str, ...] = ()  # action-name globs policy marks safe to retry

    def marks(self, name: str) -> tuple[bool, bool]:
        """(critical, safe_to_retry) as policy decides them for an action name."""
        return (any(fnmatch.fnmatchcase(name, g) for g in self.critical),
                any(fnmatch.fnmatchcase(name, g) for g in self.safe_to_retry))  # fmt: skip

    def mark(self, action: Action) -> Action:
        """The action with policy's marks added (a trusted worker's own marks are kept)."""
        critical, safe = self.marks(action.name)
        if (critical and not action.critical) or (safe and not action.safe_to_retry):
            return dataclasses.replace(action, critical=action.critical or critical,
                                       safe_to_retry=action.safe_to_retry or safe)  # fmt: skip
        return action

    def decide(self, action: Action, worker: str) -> Decision:
        """The one decision procedure: the gate, `policy explain`, shadow mode and replay all
        call this, and every stage it passes is in the returned path."""
        misses: list[int] = []
        for rule in self.rules:
            code = rule.first_miss(action, worker)
            if code == _MATCH:
                detail = f"rule {rule.name!r} ({rule.describe()}): {rule.outcome}"
                trail = _Trail(self, action, worker, misses, "rule")
                return Decision(rule.outcome, rule.name, detail, trail)
            misses.append(code)
        outcome = self.risk.get(action.risk)
        if outcome is not None:
            detail = f"no rule matched; risk {action.risk}: {outcome}"
            trail = _Trail(self, action, worker, misses, "risk")
            return Decision(outcome, f"risk:{action.risk}", detail, trail)
        return Decision(
            self.unmatched,
            "unmatched",
            f"no rule matched and risk {action.risk} has no entry: {self.unmatched}",
            _Trail(self, action, worker, misses, "unmatched"),
        )

    @classmethod
    def from_config(cls, section: Mapping[str, Any] | None) -> Policy:
        if section is None:
            return cls()
        section = table(section, "policy")
        # `shadow` names a file; config.py takes it out before the policy is parsed.
        check_keys(section, tuple(k for k in keys("policy") if k != "shadow"), "policy")
        marks: dict[str, tuple[str, ...]] = {}
        for key in ("critical", "safe_to_retry"):
            globs = array(section.get(key, []), f"policy.{key}")
            marks[key] = tuple(nonempty_str(g, f"policy.{key}[{i}]") for i, g in enumerate(globs))
        unmatched = DEFAULT_UNMATCHED
        if "unmatched" in section:
            unmatched = _outcome(section["unmatched"], "policy.unmatched")
        risk = dict(DEFAULT_RISK)
        raw_risk = table(section.get("risk", {}), "policy.risk")
        check_keys(raw_risk, keys("policy.risk"), "policy.risk")
        for name, value in raw_risk.items():
            risk[cast(Risk, name)] = _outcome(value, f"policy.risk.{name}")
        rules: list[Rule] = []
        seen: dict[str, int] = {}
        for i, raw in enumerate(array(section.get("rules", []), "policy.rules")):
            rule = _parse_rule(raw, i)
            if rule.name in seen:
                raise ConfigError(
                    f"policy.rules[{i}] ({json.dumps(rule.name)}): duplicate rule name "
                    f"(also policy.rules[{seen[rule.name]}])"
                )
            seen[rule.name] = i
            rules.append(rule)
        return cls(rules=tuple(rules), risk=risk, unmatched=unmatched,
                   critical=marks["critical"], safe_to_retry=marks["safe_to_retry"])  # fmt: skip


def _outcome(value: object, where: str) -> Outcome:
    if value not in OUTCOMES:
        raise ConfigError(f"{where}: unknown outcome {value!r} ({', '.join(OUTCOMES)})")
    return value


def _parse_rule(raw: object, index: int) -> Rule:
    where = f"policy.rules[{index}]"
    entry = table(raw, where)
    if "name" not in entry:
        raise ConfigError(f"{where}: missing 'name'")
    name = nonempty_str(entry["name"], f"{where}.name")
    where = f"{where} ({json.dumps(name)})"
    check_keys(entry, keys("policy.rules[]"), where)
    if "outcome" not in entry:
        raise ConfigError(f"{where}: missing 'outcome' ({', '.join(OUTCOMES)})")
    outcome = _outcome(entry["outcome"], where)
    action = nonempty_str(entry["action"], f"{where}.action") if "action" in entry else None
    worker = nonempty_str(entry["worker"], f"{where}.worker") if "worker" in entry else None
    risks: frozenset[Risk] | None = None
    if "risk" in entry:
        raw_risks = entry["risk"]
        names = [raw_risks] if isinstance(raw_risks, str) else array(raw_risks, f"{where}.risk")
        if not names:
            raise ConfigError(f"{where}: risk must name at least one risk ({', '.join(RISKS)})")
        for r in names:
            if r not in RISKS:
                raise ConfigError(f"{where}: unknown risk {r!r} ({', '.join(RISKS)})")
        risks = frozenset(cast(list[Risk], names))
    conditions = tuple(
        _parse_condition(c, f"{where}.when[{j}]")
        for j, c in enumerate(array(entry.get("when", []), f"{where}.when"))
    )
    return Rule(name, outcome, action=action, risks=risks, worker=worker, when=conditions)


def _scalar(value: object) -> bool:
    if isinstance(value, float) and not math.isfinite(value):
        return False  # params are JSON without NaN/inf: such a value could never match
    return _kind(value) in ("string", "number", "boolean")


def _parse_condition(raw: object, where: str) -> Condition:
    entry = table(raw, where)
    check_keys(entry, keys("policy.rules[].when[]"), where)
    if "param" not in entry:
        raise ConfigError(f"{where}: missing 'param'")
    param = nonempty_str(entry["param"], f"{where}.param")
    if any(not part for part in param.split(".")):
        raise ConfigError(f"{where}: param {param!r} has an empty segment")
    if "op" not in entry:
        raise ConfigError(f"{where}: missing 'op' ({', '.join(OPS)})")
    op = entry["op"]
    if op not in OPS:
        raise ConfigError(f"{where}: unknown op {op!r} ({', '.join(OPS)})")
    if op == "exists":
        if "value" in entry:
            raise ConfigError(f"{where}: op 'exists' takes no value")
        return Condition(param, "exists")
    if "value" not in entry:
        raise ConfigError(f"{where}: op {op!r} needs a value")
    value = entry["value"]
    if op in ("in", "not_in"):
        items = array(value, f"{where}.value")
        if not items:
            raise ConfigError(f"{where}: op {op!r} needs a non-empty array")
        bad = [v for v in items if not _scalar(v)]
        if bad:
            raise ConfigError(
                f"{where}: op {op!r} needs strings, numbers or booleans, got {bad[0]!r}"
            )
        return Condition(param, cast(Op, op), tuple(items))
    if op in _ORDERING:
        if _kind(value) not in ("number", "string") or not _scalar(value):
            raise ConfigError(
                f"{where}: op {op!r} needs a number or a string value, got {type_name(value)}"
            )
    elif not _scalar(value):
        hint = " (use 'in' for a list)" if isinstance(value, list | tuple) else ""
        raise ConfigError(
            f"{where}: op {op!r} needs a string, number or boolean value, "
            f"got {type_name(value)}{hint}"
        )
    return Condition(param, cast(Op, op), value)
