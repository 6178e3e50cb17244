"""Policy: the decision table, rule order, conditions, and config errors naming the item."""

from __future__ import annotations

from typing import Any

import pytest

from supervisor.actions import Action, Risk
from supervisor.errors import ConfigError
from supervisor.governance.policy import OUTCOMES, Condition, Decision, Op, Policy, Rule


def act(name: str = "db.read", risk: Risk = "low", **params: Any) -> Action:
    return Action(name=name, params=params, risk=risk)


def rule(**fields: Any) -> dict[str, Any]:
    return {"name": "r", "outcome": "deny", **fields}


def policy(*rules: dict[str, Any], **section: Any) -> Policy:
    return Policy.from_config({**section, "rules": list(rules)})


def config_error(section: Any) -> str:
    with pytest.raises(ConfigError) as info:
        Policy.from_config(section)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- the decision table ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("risk", "outcome"),
    [("low", "allow"), ("medium", "allow"), ("high", "require_approval"), ("critical", "deny")],
)
@pytest.mark.parametrize("section", [None, {}])
def test_risk_defaults(section: dict[str, Any] | None, risk: Risk, outcome: str) -> None:
    decision = Policy.from_config(section).decide(act(risk=risk), "w")
    assert decision.outcome == outcome
    assert decision.rule == f"risk:{risk}"
    assert risk in decision.detail


def test_risk_table_entries_merge_over_defaults() -> None:
    p = Policy.from_config({"risk": {"high": "escalate", "low": "require_approval"}})
    outcomes = {
        r: p.decide(act(risk=r), "w").outcome for r in ("low", "medium", "high", "critical")
    }
    assert outcomes == {
        "low": "require_approval",
        "medium": "allow",
        "high": "escalate",
        "critical": "deny",
    }


def test_unmatched_is_used_when_the_risk_table_has_no_entry() -> None:
    p = Policy(risk={"low": "allow"})
    decision = p.decide(act(risk="high"), "w")
    assert (decision.outcome, decision.rule) == ("require_approval", "unmatched")  # fail-closed
    assert "no entry" in decision.detail
    assert p.decide(act(risk="low"), "w").outcome == "allow"
    assert Policy(risk={}, unmatched="deny").decide(act(), "w").outcome == "deny"


def test_configured_unmatched_is_kept() -> None:
    assert Policy.from_config({"unmatched": "deny"}).unmatched == "deny"
    assert Policy.from_config(None).unmatched == "require_approval"


def test_rules_come_before_the_risk_table() -> None:
    p = policy(rule(name="reads-ok", action="db.read", outcome="allow"))
    assert p.decide(act("db.read", risk="critical"), "w") == Decision(
        "allow", "reads-ok", "rule 'reads-ok' (action 'db.read'): allow"
    )
    assert p.decide(act("db.write", risk="critical"), "w").rule == "risk:critical"


def test_first_matching_rule_wins_in_config_order() -> None:
    deny = rule(name="deny-deletes", action="db.delete*", outcome="deny")
    allow = rule(name="allow-db", action="db.*", outcome="allow")
    assert policy(deny, allow).decide(act("db.delete_user"), "w").rule == "deny-deletes"
    assert policy(allow, deny).decide(act("db.delete_user"), "w").rule == "allow-db"
    # A rule that does not match is skipped, not a stop.
    assert policy(deny, allow).decide(act("db.insert"), "w").outcome == "allow"


def test_rule_without_matchers_matches_everything() -> None:
    p = policy(rule(name="lockdown", outcome="escalate"))
    decision = p.decide(act("anything", risk="low"), "w")
    assert (decision.outcome, decision.rule) == ("escalate", "lockdown")
    assert "every action" in decision.detail


@pytest.mark.parametrize("outcome", OUTCOMES)
def test_every_outcome_can_come_from_a_rule(outcome: str) -> None:
    assert policy(rule(outcome=outcome)).decide(act(), "w").outcome == outcome


# --- matchers ---------------------------------------------------------------------------------


def test_action_glob_is_case_sensitive_fnmatch() -> None:
    p = policy(rule(action="db.delete*"))
    assert p.decide(act("db.delete_user"), "w").rule == "r"
    assert p.decide(act("db.deleteall"), "w").rule == "r"
    assert p.decide(act("DB.DELETE_USER"), "w").rule == "risk:low"
    assert p.decide(act("x.db.delete"), "w").rule == "risk:low"


def test_bad_globs_are_fine() -> None:
    p = policy(rule(action="db.[delete"))
    assert p.decide(act("db.[delete"), "w").rule == "r"
    assert p.decide(act("db.d"), "w").rule == "risk:low"


@pytest.mark.parametrize("risk", ["high", ["high"], ["high", "critical"]])
def test_risk_matcher_single_or_list(risk: Any) -> None:
    p = policy(rule(risk=risk))
    assert p.decide(act(risk="high"), "w").rule == "r"
    assert p.decide(act(risk="medium"), "w").rule == "risk:medium"
    if isinstance(risk, list) and "critical" in risk:
        assert p.decide(act(risk="critical"), "w").rule == "r"
    else:
        assert p.decide(act(risk="critical"), "w").rule == "risk:critical"


def test_worker_glob() -> None:
    p = policy(rule(worker="support-*"))
    assert p.decide(act(), "support-eu").rule == "r"
    assert p.decide(act(), "billing").rule == "risk:low"


def test_all_matchers_must_match() -> None:
    p = policy(
        rule(
            name="no-prod-deletes",
            action="db.delete*",
            risk=["high", "critical"],
            worker="support-*",
            when=[
                {"param": "env", "op": "==", "value": "prod"},
                {"param": "amount", "op": ">", "value": 100},
            ],
        )
    )
    hit = act("db.delete_row", "high", env="prod", amount=101)
    assert p.decide(hit, "support-1").rule == "no-prod-deletes"
    assert p.decide(hit, "ops-1").rule != "no-prod-deletes"
    assert p.decide(act("db.read", "high", env="prod", amount=101), "support-1").rule != (
        "no-prod-deletes"
    )
    assert p.decide(act("db.delete_row", "low", env="prod", amount=101), "support-1").rule != (
        "no-prod-deletes"
    )
    assert p.decide(act("db.delete_row", "high", env="dev", amount=101), "support-1").rule != (
        "no-prod-deletes"
    )
    assert p.decide(act("db.delete_row", "high", env="prod", amount=100), "support-1").rule != (
        "no-prod-deletes"
    )
    detail = p.decide(hit, "support-1").detail
    assert detail == (
        "rule 'no-prod-deletes' (action 'db.delete*', risk high|critical, worker 'support-*', "
        "env == 'prod', amount > 100): deny"
    )


# --- conditions -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "value", "param", "expected"),
    [
        ("==", "prod", "prod", True),
        ("==", "prod", "dev", False),
        ("==", 1, 1.0, True),  # int and float are both numbers
        ("!=", "prod", "dev", True),
        ("!=", "prod", "prod", False),
        (">", 100, 101, True),
        (">", 100, 100, False),
        (">=", 100, 100, True),
        (">=", 100, 99.5, False),
        ("<", 100, 99, True),
        ("<", 100, 100, False),
        ("<=", 100, 100, True),
        ("<=", 100, 100.01, False),
        (">", "b", "c", True),  # strings order lexically
        ("<", "b", "c", False),
        ("in", ["prod", "staging"], "prod", True),
        ("in", ["prod", "staging"], "dev", False),
        ("not_in", ["prod", "staging"], "dev", True),
        ("not_in", ["prod", "staging"], "prod", False),
        ("in", [1, 2], 2.0, True),
        ("==", True, True, True),
        ("==", False, True, False),
    ],
)
def test_condition_ops(op: Op, value: Any, param: Any, expected: bool) -> None:
    assert Condition("p", op, value).test({"p": param}) is expected
    # And through config, end to end.
    p = policy(rule(when=[{"param": "p", "op": op, "value": value}]))
    assert (p.decide(act(p=param), "w").rule == "r") is expected


@pytest.mark.parametrize(
    ("op", "value", "param"),
    [
        (">", 5, "abc"),
        ("<", "abc", 5),
        (">=", 5, None),
        ("<=", 5, [1]),
        (">", 0, True),  # a boolean is not a number
        ("==", 5, "5"),
        ("==", 1, True),
        ("==", "prod", {"name": "prod"}),
        ("!=", "prod", 5),  # a mismatch is false for != too
        ("!=", 1, True),
        ("in", ["1", "2"], 1),
        ("not_in", ["1", "2"], 1),
        ("in", [1, 2], True),
        ("not_in", [1, 2], [1]),
    ],
)
def test_type_mismatch_is_false_never_an_exception(op: Op, value: Any, param: Any) -> None:
    assert Condition("p", op, value).test({"p": param}) is False


@pytest.mark.parametrize(
    ("op", "value"),
    [
        ("==", "x"),
        ("!=", "x"),
        (">", 1),
        (">=", 1),
        ("<", 1),
        ("<=", 1),
        ("in", ("x",)),
        ("not_in", ("x",)),
    ],
)
def test_missing_param_is_false(op: Op, value: Any) -> None:
    assert Condition("p", op, value).test({}) is False
    assert Condition("a.b", op, value).test({"a": {}}) is False
    assert Condition("a.b", op, value).test({"a": "not a table"}) is False


def test_exists() -> None:
    c = Condition("target.env", "exists")
    assert c.test({"target": {"env": None}}) is True
    assert c.test({"target": {"env": "prod"}}) is True
    assert c.test({"target": {}}) is False
    assert c.test({"target": "prod"}) is False
    assert c.test({}) is False


def test_dotted_params_walk_nested_tables() -> None:
    p = policy(rule(when=[{"param": "target.db.env", "op": "==", "value": "prod"}]))
    assert p.decide(act(target={"db": {"env": "prod"}}), "w").rule == "r"
    assert p.decide(act(target={"db": {"env": "dev"}}), "w").rule == "risk:low"
    # A literal key containing a dot is not a path.
    assert p.decide(Action("db.read", params={"target.db.env": "prod"}), "w").rule == "risk:low"


def test_conditions_are_all_of() -> None:
    p = policy(
        rule(
            when=[
                {"param": "a", "op": "==", "value": 1},
                {"param": "b", "op": "exists"},
            ]
        )
    )
    assert p.decide(act(a=1, b=0), "w").rule == "r"
    assert p.decide(act(a=1), "w").rule == "risk:low"
    assert p.decide(act(a=2, b=0), "w").rule == "risk:low"


def test_parsed_rule_shape() -> None:
    p = policy(
        rule(name="x", action="a.*", risk="high", when=[{"param": "n", "op": "in", "value": [1]}])
    )
    assert p.rules == (
        Rule(
            "x",
            "deny",
            action="a.*",
            risks=frozenset({"high"}),
            when=(Condition("n", "in", (1,)),),
        ),
    )


# --- config errors ----------------------------------------------------------------------------

R = 'policy.rules[0] ("r")'


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("deny", "policy: expected a table, got string"),
        (
            {"default": "deny"},
            "policy: unknown key 'default' (unmatched, risk, rules, critical, safe_to_retry)",
        ),
        (
            {"unmatched": "maybe"},
            "policy.unmatched: unknown outcome 'maybe' (allow, deny, require_approval, escalate)",
        ),
        ({"risk": ["high"]}, "policy.risk: expected a table, got array"),
        (
            {"risk": {"extreme": "deny"}},
            "policy.risk: unknown key 'extreme' (low, medium, high, critical)",
        ),
        ({"risk": {"high": "ask"}}, "policy.risk.high: unknown outcome 'ask'"),
        ({"rules": {"name": "x"}}, "policy.rules: expected an array, got table"),
        ({"rules": ["deny"]}, "policy.rules[0]: expected a table, got string"),
        ({"rules": [{"outcome": "deny"}]}, "policy.rules[0]: missing 'name'"),
        ({"rules": [{"name": " ", "outcome": "deny"}]}, "policy.rules[0].name: must not be empty"),
        ({"rules": [{"name": 7, "outcome": "deny"}]}, "policy.rules[0].name: expected a string"),
        (
            {"rules": [{"name": "r"}]},
            f"{R}: missing 'outcome' (allow, deny, require_approval, escalate)",
        ),
        (
            {
                "rules": [
                    {"name": "a", "outcome": "deny"},
                    {"name": "no-prod-deletes", "outcome": "deny"},
                    {"name": "no-prod-deletes", "outcome": "maybe"},
                ]
            },
            "policy.rules[2] (\"no-prod-deletes\"): unknown outcome 'maybe' "
            "(allow, deny, require_approval, escalate)",
        ),
        (
            {"rules": [{"name": "a", "outcome": "deny"}, {"name": "a", "outcome": "allow"}]},
            'policy.rules[1] ("a"): duplicate rule name (also policy.rules[0])',
        ),
        (
            {"rules": [rule(actions="db.*")]},
            f"{R}: unknown key 'actions' (did you mean 'action'?)",
        ),
        ({"rules": [rule(action="")]}, f"{R}.action: must not be empty"),
        ({"rules": [rule(worker=["a"])]}, f"{R}.worker: expected a string, got array"),
        (
            {"rules": [rule(risk="extreme")]},
            f"{R}: unknown risk 'extreme' (low, medium, high, critical)",
        ),
        ({"rules": [rule(risk=["high", "huge"])]}, f"{R}: unknown risk 'huge'"),
        ({"rules": [rule(risk=[])]}, f"{R}: risk must name at least one risk"),
        ({"rules": [rule(risk=3)]}, f"{R}.risk: expected an array, got number"),
        ({"rules": [rule(when={"param": "a"})]}, f"{R}.when: expected an array, got table"),
        ({"rules": [rule(when=["a == 1"])]}, f"{R}.when[0]: expected a table, got string"),
        ({"rules": [rule(when=[{"op": "exists"}])]}, f"{R}.when[0]: missing 'param'"),
        (
            {"rules": [rule(when=[{"param": "a"}])]},
            f"{R}.when[0]: missing 'op' (==, !=, >, >=, <, <=, in, not_in, exists)",
        ),
        (
            {"rules": [rule(when=[{"param": "a", "op": "exists"}, {"param": "a", "op": "=~"}])]},
            f"{R}.when[1]: unknown op '=~' (==, !=, >, >=, <, <=, in, not_in, exists)",
        ),
        (
            {"rules": [rule(when=[{"param": "a", "op": "==", "val": 1}])]},
            f"{R}.when[0]: unknown key 'val' (did you mean 'value'?)",
        ),
        ({"rules": [rule(when=[{"param": "a", "op": "=="}])]}, f"{R}.when[0]: op '==' needs"),
        (
            {"rules": [rule(when=[{"param": "a", "op": "exists", "value": True}])]},
            f"{R}.when[0]: op 'exists' takes no value",
        ),
        (
            {"rules": [rule(when=[{"param": "a..b", "op": "exists"}])]},
            f"{R}.when[0]: param 'a..b' has an empty segment",
        ),
        (
            {"rules": [rule(when=[{"param": "", "op": "exists"}])]},
            f"{R}.when[0].param: must not be empty",
        ),
        (
            {"rules": [rule(when=[{"param": "a", "op": "in", "value": "prod"}])]},
            f"{R}.when[0].value: expected an array, got string",
        ),
        (
            {"rules": [rule(when=[{"param": "a", "op": "not_in", "value": []}])]},
            f"{R}.when[0]: op 'not_in' needs a non-empty array",
        ),
        (
            {"rules": [rule(when=[{"param": "a", "op": "in", "value": [[1]]}])]},
            f"{R}.when[0]: op 'in' needs strings, numbers or booleans, got [1]",
        ),
        (
            {"rules": [rule(when=[{"param": "a", "op": ">", "value": True}])]},
            f"{R}.when[0]: op '>' needs a number or a string value, got boolean",
        ),
        (
            {"rules": [rule(when=[{"param": "a", "op": "<", "value": float("nan")}])]},
            f"{R}.when[0]: op '<' needs a number or a string value",
        ),
        (
            {"rules": [rule(when=[{"param": "a", "op": "==", "value": ["x"]}])]},
            f"{R}.when[0]: op '==' needs a string, number or boolean value, got array "
            "(use 'in' for a list)",
        ),
    ],
)
def test_config_errors_name_the_item(section: Any, message: str) -> None:
    got = config_error(section)
    assert got.startswith(message), got


def test_rule_name_appears_even_when_the_error_is_deep() -> None:
    got = config_error(
        {"rules": [rule(name="ok"), rule(name="pay-limit", when=[{"param": "x", "op": "~"}])]}
    )
    assert got.startswith("policy.rules[1] (\"pay-limit\").when[0]: unknown op '~'")
