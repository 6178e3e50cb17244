"""Replay's decisions are `govern`'s, proposal by proposal, however many share a shape: the memo
that makes a million proposals fast never gives one of them another proposal's verdict."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

from supervisor.actions import Action, Risk
from supervisor.config import Candidate, load_config
from supervisor.governance.policy import Policy
from supervisor.governance.replay import Proposal, govern, replay
from supervisor.store import Session

POLICY = Policy.from_config({"rules": [
    {"name": "flag-true", "when": [{"param": "flag", "op": "==", "value": True}], "outcome": "deny"},
    {"name": "n-one", "when": [{"param": "n", "op": "==", "value": 1}], "outcome": "escalate"},
    {"name": "deep", "when": [{"param": "a.b", "op": "in", "value": ["x", "y"]}],
     "outcome": "require_approval"},
    {"name": "has-note", "when": [{"param": "note", "op": "exists"}], "outcome": "allow"},
]})  # fmt: skip
RISKS: tuple[Risk, ...] = ("low", "critical")
PARAMS: list[dict[str, Any]] = [
    {"flag": True}, {"flag": 1}, {"n": 1}, {"n": 1.0}, {"n": True}, {"a": {"b": "x"}},
    {"a": {"b": "z"}}, {"a": "b"}, {"a": {"b": ["x"]}}, {"note": None}, {}, {"flag": [True]},
]  # fmt: skip


def session() -> Session:
    now = datetime(2026, 11, 2, tzinfo=UTC)
    return Session("s1", "f", "w", now, now + timedelta(days=1), "closed", None, None, 0.0, 0,
                   None, None, None, None)  # fmt: skip


def test_every_replayed_proposal_gets_its_own_verdict() -> None:
    base = load_config(None)
    candidate = Candidate("c", POLICY, base.models, base.token_budgets)
    at = datetime(2026, 11, 2, tzinfo=UTC)
    proposals = [
        Proposal(f"c{i}-{r}", at + timedelta(seconds=i), "w", Action("x", p, risk=risk), "allow")
        for r in range(3) for i, (p, risk) in enumerate(
            (p, risk) for p in PARAMS for risk in RISKS)
    ]  # fmt: skip
    report = replay(candidate, [(session(), proposals)], base.timezone)
    expected = Counter(("allow", govern(candidate, p.action, p.worker).outcome) for p in proposals)
    assert report.transitions == expected
    # The shapes above reach every rule and the risk defaults, so the check is not vacuous.
    rules = {govern(candidate, p.action, p.worker).rule for p in proposals}
    assert rules == {"flag-true", "n-one", "deep", "has-note", "risk:low", "risk:critical"}
