"""The explanation of a decision: every branch of the policy, from the one pass that decides.

Each case gives the action, the expected decision and the expected path: which stages were
considered, whether each matched, and the reason it did not.
"""

from __future__ import annotations

from typing import Any

import pytest

from supervisor.actions import Action, Risk
from supervisor.governance.policy import Policy

POLICY = Policy.from_config(
    {
        "rules": [
            {"name": "no-prod-deletes", "action": "db.delete*",
             "when": [{"param": "target.env", "op": "==", "value": "prod"}], "outcome": "deny"},
            {"name": "critical-escalates", "risk": ["critical"], "outcome": "escalate"},
            {"name": "support-approval", "worker": "support-*", "outcome": "require_approval"},
            {"name": "big-refunds", "action": "pay.refund",
             "when": [{"param": "amount", "op": ">", "value": 100}], "outcome": "require_approval"},
        ],
        "risk": {"medium": "require_approval"},
    }
)  # fmt: skip
# The same rules over a partial risk table, so the `unmatched` fallback is reachable.
PARTIAL = Policy(rules=POLICY.rules, risk={"low": "allow"}, unmatched="deny")

RULES = ("no-prod-deletes", "critical-escalates", "support-approval", "big-refunds")


def misses(*reasons: str) -> list[tuple[str, bool, str]]:
    """The path through the rules that did not match, one reason each, in config order."""
    return [(name, False, why) for name, why in zip(RULES, reasons, strict=False)]


NOT_DELETE = "action 'pay.refund' does not match 'db.delete*'"
CASES: list[tuple[str, Policy, dict[str, Any], str, str, list[tuple[str, bool, str]]]] = [
    (
        "glob and params match",
        POLICY,
        {"name": "db.delete_user", "params": {"target": {"env": "prod"}}},
        "deny",
        "no-prod-deletes",
        [("no-prod-deletes", True, "matches action 'db.delete*', target.env == 'prod'")],
    ),
    (
        "glob matches, param differs, then risk matches",
        POLICY,
        {"name": "db.delete_user", "params": {"target": {"env": "dev"}}, "risk": "critical"},
        "escalate",
        "critical-escalates",
        [
            ("no-prod-deletes", False, "target.env == 'prod' is false (target.env is 'dev')"),
            ("critical-escalates", True, "matches risk critical"),
        ],
    ),
    (
        "worker glob matches",
        POLICY,
        {"name": "pay.refund", "params": {"amount": 5}, "worker": "support-2"},
        "require_approval",
        "support-approval",
        [
            *misses(NOT_DELETE, "risk low is not critical"),
            ("support-approval", True, "matches worker 'support-*'"),
        ],
    ),
    (
        "params condition matches",
        POLICY,
        {"name": "pay.refund", "params": {"amount": 250}},
        "require_approval",
        "big-refunds",
        [
            *misses(
                NOT_DELETE, "risk low is not critical", "worker 'w1' does not match 'support-*'"
            ),
            ("big-refunds", True, "matches action 'pay.refund', amount > 100"),
        ],
    ),
    (
        "missing param: no rule, the risk default",
        POLICY,
        {"name": "pay.refund", "params": {}, "risk": "medium"},
        "require_approval",
        "risk:medium",
        [
            *misses(
                NOT_DELETE,
                "risk medium is not critical",
                "worker 'w1' does not match 'support-*'",
                "amount > 100 is false (amount is missing)",
            ),
            ("risk:medium", True, "risk medium: require_approval"),
        ],
    ),
    (
        "action glob misses everywhere: the risk default",
        POLICY,
        {"name": "mail.send", "params": {"amount": 500}},
        "allow",
        "risk:low",
        [
            *misses(
                "action 'mail.send' does not match 'db.delete*'",
                "risk low is not critical",
                "worker 'w1' does not match 'support-*'",
                "action 'mail.send' does not match 'pay.refund'",
            ),
            ("risk:low", True, "risk low: allow"),
        ],
    ),
    (
        "no rule and no risk entry: unmatched",
        PARTIAL,
        {"name": "mail.send", "risk": "high"},
        "deny",
        "unmatched",
        [
            *misses(
                "action 'mail.send' does not match 'db.delete*'",
                "risk high is not critical",
                "worker 'w1' does not match 'support-*'",
                "action 'mail.send' does not match 'pay.refund'",
            ),
            ("risk:high", False, "risk high has no entry"),
            ("unmatched", True, "the fallback"),
        ],
    ),
]


@pytest.mark.parametrize(
    ("policy", "fields", "outcome", "rule", "path"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_explanation_follows_every_branch(
    policy: Policy,
    fields: dict[str, Any],
    outcome: str,
    rule: str,
    path: list[tuple[str, bool, str]],
) -> None:
    fields = dict(fields)
    worker = fields.pop("worker", "w1")
    risk: Risk = fields.pop("risk", "low")
    action = Action(name=fields["name"], params=fields.get("params", {}), risk=risk)
    decision = policy.decide(action, worker)
    assert (decision.outcome, decision.rule) == (outcome, rule)
    assert [(s.name, s.matched, s.why) for s in decision.path] == path
    # The stage that decided is the last one, and it carries the decision's outcome.
    assert decision.path[-1].matched and decision.path[-1].outcome == outcome
    assert all(s.outcome is None for s in decision.path[:-1])
    rendered = decision.render()
    assert rendered.splitlines()[0] == f"decision: {outcome} (rule {rule})"
    assert all(s.why in rendered for s in decision.path)
    assert decision.as_dict()["path"][-1]["name"] == rule
