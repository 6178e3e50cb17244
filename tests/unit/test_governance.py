"""Token budgets (config, applicability, period keys) and the model governor's precedence."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from supervisor.errors import ConfigError
from supervisor.governance.budgets import (
    ModelGovernor,
    Override,
    Period,
    TokenBudget,
    TokenBudgets,
    parse_identity_key,
    period_key,
)

UTCZ = ZoneInfo("UTC")
NEW_YORK = ZoneInfo("America/New_York")
TOKYO = ZoneInfo("Asia/Tokyo")
ALICE = {"user": "alice", "team": "support", "org": "acme"}


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def one_line_error(fn: Any, arg: Any) -> str:
    with pytest.raises(ConfigError) as info:
        fn(arg)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- period keys -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("period", "key"), [("daily", "2026-11-21"), ("weekly", "2026-W47"), ("monthly", "2026-11")]
)
def test_period_key_formats(period: Period, key: str) -> None:
    assert period_key(period, utc("2026-11-21T12:00"), UTCZ) == key


def test_period_key_is_computed_in_the_given_zone() -> None:
    instant = utc("2026-11-21T23:30")
    assert period_key("daily", instant, UTCZ) == "2026-11-21"
    assert period_key("daily", instant, TOKYO) == "2026-11-22"
    assert period_key("daily", utc("2026-11-22T02:00"), ZoneInfo("America/Los_Angeles")) == (
        "2026-11-21"
    )
    # Month boundary moves with the zone too.
    assert period_key("monthly", utc("2026-11-30T20:00"), TOKYO) == "2026-12"
    assert period_key("monthly", utc("2026-11-30T20:00"), UTCZ) == "2026-11"


def test_period_key_ignores_the_instants_own_zone() -> None:
    instant = utc("2026-11-21T23:30")
    assert period_key("daily", instant.astimezone(TOKYO), UTCZ) == "2026-11-21"


@pytest.mark.parametrize(
    ("instant", "day"),
    [
        ("2026-11-01T04:30", "2026-11-01"),  # 00:30 EDT
        ("2026-11-01T05:30", "2026-11-01"),  # 01:30 EDT, first time
        ("2026-11-01T06:30", "2026-11-01"),  # 01:30 EST, the repeated hour
        ("2026-11-02T04:59", "2026-11-01"),  # 23:59 EST: the 25-hour day is not over yet
        (
            "2026-11-02T05:00",
            "2026-11-02",
        ),  # midnight EST, an hour later in UTC than the day before
        ("2026-03-08T04:59", "2026-03-07"),  # 23:59 EST before spring forward
        ("2026-03-09T03:59", "2026-03-08"),  # 23:59 EDT: the 23-hour day
        ("2026-03-09T04:00", "2026-03-09"),
    ],
)
def test_daily_key_across_dst(instant: str, day: str) -> None:
    assert period_key("daily", utc(instant), NEW_YORK) == day


@pytest.mark.parametrize(
    ("instant", "zone", "week"),
    [
        ("2027-01-01T12:00", UTCZ, "2026-W53"),  # a Friday in ISO week 53 of 2026
        ("2026-01-01T12:00", UTCZ, "2026-W01"),
        ("2024-12-30T12:00", UTCZ, "2025-W01"),  # a Monday that belongs to ISO year 2025
        ("2026-12-27T23:30", UTCZ, "2026-W52"),  # Sunday in UTC ...
        ("2026-12-27T23:30", TOKYO, "2026-W53"),  # ... already Monday in Tokyo
        ("2027-01-03T20:00", UTCZ, "2026-W53"),  # last day of ISO year 2026 in UTC ...
        ("2027-01-03T20:00", TOKYO, "2027-W01"),  # ... first day of ISO year 2027 in Tokyo
    ],
)
def test_weekly_key_uses_iso_year_and_zone(instant: str, zone: ZoneInfo, week: str) -> None:
    assert period_key("weekly", utc(instant), zone) == week


def test_weekly_and_monthly_years_differ_at_the_boundary() -> None:
    instant = utc("2027-01-01T12:00")
    assert period_key("monthly", instant, UTCZ) == "2027-01"
    assert period_key("weekly", instant, UTCZ) == "2026-W53"


def test_period_key_rejects_naive_and_unknown() -> None:
    with pytest.raises(ValueError, match="aware"):
        period_key("daily", datetime(2026, 11, 21), UTCZ)
    with pytest.raises(ValueError, match="unknown period 'hourly'"):
        period_key("hourly", utc("2026-11-21T00:00"), UTCZ)  # type: ignore[arg-type]


def test_budget_period_key_delegates() -> None:
    b = TokenBudget("team", "support", "weekly", 10)
    assert b.period_key(utc("2027-01-01T00:00"), UTCZ) == "2026-W53"
    assert b.label == "team:support/weekly"


# --- token budgets ---------------------------------------------------------------------------

BUDGETS = [
    {"scope": "team", "identity": "support", "period": "daily", "max_tokens": 200000},
    {"scope": "user", "identity": "alice", "period": "monthly", "max_tokens": 0, "max_cost": 5},
    {"scope": "org", "identity": "acme", "period": "weekly", "max_tokens": 10**9, "max_cost": 50.0},
    {"scope": "team", "identity": "support", "period": "weekly", "max_tokens": 900000},
    {"scope": "team", "identity": "billing", "period": "daily", "max_tokens": 1},
]


def test_budgets_parse() -> None:
    budgets = TokenBudgets.from_config(BUDGETS)
    assert budgets.budgets[0] == TokenBudget("team", "support", "daily", 200000, None)
    assert budgets.budgets[1] == TokenBudget("user", "alice", "monthly", 0, 5.0)
    assert isinstance(budgets.budgets[1].max_cost, float)
    assert len(budgets.budgets) == 5


@pytest.mark.parametrize("entries", [None, []])
def test_no_budgets(entries: list[dict[str, Any]] | None) -> None:
    assert TokenBudgets.from_config(entries).applicable(ALICE) == []


def test_applicable_matches_each_scope_in_config_order() -> None:
    budgets = TokenBudgets.from_config(BUDGETS)
    labels = [b.label for b in budgets.applicable(ALICE)]
    assert labels == [
        "team:support/daily",
        "user:alice/monthly",
        "org:acme/weekly",
        "team:support/weekly",
    ]
    assert [b.label for b in budgets.applicable({"user": "bob", "team": "billing"})] == [
        "team:billing/daily"
    ]
    assert budgets.applicable({"user": "support"}) == []  # a scope must match, not just a name
    assert budgets.applicable({}) == []


def budget(**fields: Any) -> dict[str, Any]:
    return {"scope": "team", "identity": "support", "period": "daily", "max_tokens": 1, **fields}


B = "tokens.budgets[0] (team:support)"


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ({"scope": "team"}, "tokens.budgets: expected an array, got table"),
        (["x"], "tokens.budgets[0]: expected a table, got string"),
        ([{"identity": "support"}], "tokens.budgets[0]: missing 'scope'"),
        ([{"scope": "team"}], "tokens.budgets[0]: missing 'identity'"),
        ([budget(scope="dept")], "tokens.budgets[0]: unknown scope 'dept' (user, team, org)"),
        ([budget(identity="")], "tokens.budgets[0].identity: must not be empty"),
        (
            [budget(period="hourly")],
            f"{B}: unknown period 'hourly' (daily, weekly, monthly)",
        ),
        (
            [budget(), budget(scope="org", identity="acme", period="yearly")],
            "tokens.budgets[1] (org:acme): unknown period 'yearly'",
        ),
        ([{k: v for k, v in budget().items() if k != "period"}], f"{B}: missing 'period'"),
        ([{k: v for k, v in budget().items() if k != "max_tokens"}], f"{B}: missing 'max_tokens'"),
        ([budget(max_tokens=-1)], f"{B}: max_tokens must be >= 0, got -1"),
        ([budget(max_tokens=1.5)], f"{B}: max_tokens must be an integer, got number"),
        ([budget(max_tokens=True)], f"{B}: max_tokens must be an integer, got boolean"),
        ([budget(max_cost=-0.01)], f"{B}: max_cost must be a finite number >= 0, got -0.01"),
        ([budget(max_cost=float("nan"))], f"{B}: max_cost must be a finite number >= 0"),
        ([budget(max_cost="5")], f"{B}: max_cost must be a number, got string"),
        (
            [budget(max_token=5)],
            f"{B}: unknown key 'max_token' (did you mean 'max_tokens'?)",
        ),
        (
            [budget(), budget(period="weekly"), budget(max_tokens=9)],
            "tokens.budgets[2] (team:support daily): duplicate of tokens.budgets[0]",
        ),
    ],
)
def test_budget_config_errors_name_the_entry(entries: Any, message: str) -> None:
    got = one_line_error(TokenBudgets.from_config, entries)
    assert got.startswith(message), got


def test_zero_limits_are_valid() -> None:
    b = TokenBudgets.from_config([budget(max_tokens=0, max_cost=0)]).budgets[0]
    assert (b.max_tokens, b.max_cost) == (0, 0.0)


# --- the model governor ----------------------------------------------------------------------

MODELS: dict[str, Any] = {
    "unknown": "deny",
    "tiers": {"basic": ["small-*", "mini-*"], "premium": ["large-*"]},
    "access": {"team:support": ["basic"], "org:acme": ["basic", "premium"]},
    "overrides": {"user:alice": {"allow": ["large-1"], "deny": []}},
}


def governor(**changes: Any) -> ModelGovernor:
    return ModelGovernor.from_config({**MODELS, **changes})


def test_no_models_section_turns_governance_off() -> None:
    g = ModelGovernor.from_config(None)
    assert g.enabled is False
    assert g.check("anything-at-all", {}) == (True, "model governance off")


def test_no_model_is_allowed() -> None:
    assert governor().check(None, {}) == (True, "no model")


def test_unknown_model_is_denied_even_with_an_override_elsewhere() -> None:
    allowed, detail = governor().check("gpt-x", ALICE)
    assert allowed is False
    assert detail == "unknown model 'gpt-x'"


def test_empty_section_denies_everything_with_a_model() -> None:
    g = ModelGovernor.from_config({})
    assert g.enabled is True
    assert g.check("small-1", ALICE) == (False, "unknown model 'small-1'")


def test_tier_access() -> None:
    g = governor()
    bob = {"user": "bob", "team": "support", "org": "acme"}
    assert g.check("small-2", bob) == (
        True,
        "model 'small-2' allowed for team:support by tier basic",
    )
    allowed, detail = g.check("large-2", bob)
    assert allowed is False
    # The team's entry is narrower than the org's, so it decides alone.
    assert detail == "model 'large-2' (premium) not allowed for team:support (tiers: basic)"


def test_org_access_applies_without_a_team_entry() -> None:
    carol = {"user": "carol", "team": "research", "org": "acme"}
    assert governor().check("large-2", carol) == (
        True,
        "model 'large-2' allowed for org:acme by tier premium",
    )


def test_user_access_beats_team_access() -> None:
    g = governor(access={**MODELS["access"], "user:dave": ["premium"]})
    dave = {"user": "dave", "team": "support", "org": "acme"}
    assert g.check("large-3", dave)[0] is True
    assert g.check("small-1", dave)[0] is False  # dave's own entry names only premium


def test_identity_without_access_entry_is_denied() -> None:
    allowed, detail = governor().check("small-1", {"user": "eve", "team": "ops", "org": "other"})
    assert allowed is False
    assert detail == "no model access entry for user:eve, team:ops, org:other"
    assert governor().check("small-1", {})[0] is False


def test_empty_access_list_denies() -> None:
    g = governor(access={"team:support": []})
    assert g.check("small-1", ALICE) == (
        False,
        "model 'small-1' (basic) not allowed for team:support (tiers: none)",
    )


def test_override_allow_beats_tiers() -> None:
    assert governor().check("large-1", ALICE) == (
        True,
        "model 'large-1' allowed for user:alice by override",
    )
    # Exact names, not globs: large-2 still goes through alice's team access.
    assert governor().check("large-2", ALICE)[0] is False


def test_override_deny_beats_tier_access() -> None:
    g = governor(overrides={"org:acme": {"deny": ["small-1"]}})
    assert g.check("small-1", ALICE) == (False, "model 'small-1' denied for org:acme by override")
    assert g.check("small-2", ALICE)[0] is True


def test_deny_beats_allow_in_the_same_entry() -> None:
    g = governor(overrides={"user:alice": {"allow": ["large-1"], "deny": ["large-1"]}})
    assert g.check("large-1", ALICE) == (False, "model 'large-1' denied for user:alice by override")


def ov(key: str, kind: str, model: str) -> dict[str, dict[str, list[str]]]:
    return {key: {kind: [model]}}


@pytest.mark.parametrize(
    ("overrides", "model", "allowed", "by"),
    [
        (
            ov("user:alice", "allow", "small-1") | ov("team:support", "deny", "small-1"),
            "small-1",
            True,
            "user:alice",
        ),
        (
            ov("user:alice", "deny", "small-1") | ov("team:support", "allow", "small-1"),
            "small-1",
            False,
            "user:alice",
        ),
        (
            ov("team:support", "allow", "large-1") | ov("org:acme", "deny", "large-1"),
            "large-1",
            True,
            "team:support",
        ),
        (
            ov("team:support", "deny", "small-1") | ov("org:acme", "allow", "small-1"),
            "small-1",
            False,
            "team:support",
        ),
        # An override that does not name the model does not stop a broader one.
        (
            ov("user:alice", "allow", "mini-1") | ov("org:acme", "deny", "small-1"),
            "small-1",
            False,
            "org:acme",
        ),
    ],
)
def test_narrowest_override_wins(overrides: Any, model: str, allowed: bool, by: str) -> None:
    ok, detail = governor(overrides=overrides).check(model, ALICE)
    assert ok is allowed
    assert detail == f"model {model!r} {'allowed' if allowed else 'denied'} for {by} by override"


def test_overrides_of_other_identities_do_not_apply() -> None:
    bob = {"user": "bob", "team": "support", "org": "acme"}
    assert governor().check("large-1", bob)[0] is False


def test_model_in_several_tiers_needs_one_granted() -> None:
    g = governor(tiers={"basic": ["small-*"], "premium": ["small-x*", "large-*"]})
    ok, detail = g.check("small-x1", ALICE)
    assert ok is True
    assert "tier basic" in detail


def test_parsed_governor_shape() -> None:
    g = governor()
    assert g.tiers == {"basic": ("small-*", "mini-*"), "premium": ("large-*",)}
    assert g.access == {
        "team:support": frozenset({"basic"}),
        "org:acme": frozenset({"basic", "premium"}),
    }
    assert g.overrides == {"user:alice": Override(frozenset({"large-1"}), frozenset())}


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("deny", "models: expected a table, got string"),
        (
            {"unknown": "allow"},
            "models.unknown: 'allow' is not allowed; only 'deny' "
            "(an unknown model is never waved through)",
        ),
        ({"default": "deny"}, "models: unknown key 'default' (unknown, tiers, access, overrides)"),
        ({"tiers": ["basic"]}, "models.tiers: expected a table, got array"),
        ({"tiers": {"basic": "small-*"}}, "models.tiers.basic: expected an array, got string"),
        ({"tiers": {"basic": []}}, "models.tiers.basic: needs at least one model glob"),
        ({"tiers": {"basic": [""]}}, "models.tiers.basic: must not be empty"),
        (
            {"tiers": {"basic": ["small-*"]}, "access": {"team:support": ["premium"]}},
            "models.access.\"team:support\": unknown tier 'premium' (basic)",
        ),
        (
            {"access": {"team:support": ["basic"]}},
            "models.access.\"team:support\": unknown tier 'basic' (none defined)",
        ),
        (
            {"access": {"support": []}},
            "models.access.support: identity must look like 'scope:name'",
        ),
        (
            {"access": {"team:": []}},
            "models.access.\"team:\": identity must look like 'scope:name'",
        ),
        (
            {"access": {"dept:x": []}},
            "models.access.\"dept:x\": unknown scope 'dept' (user, team, org)",
        ),
        (
            {"overrides": {"user:alice": ["large-1"]}},
            'models.overrides."user:alice": expected a table, got array',
        ),
        (
            {"overrides": {"user:alice": {"allow": [], "block": []}}},
            "models.overrides.\"user:alice\": unknown key 'block' (allow, deny)",
        ),
        (
            {"overrides": {"user:alice": {"allow": "large-1"}}},
            'models.overrides."user:alice".allow: expected an array, got string',
        ),
        (
            {"tiers": {"premium": ["large-*"]}, "overrides": {"user:alice": {"allow": ["gpt-x"]}}},
            "models.overrides.\"user:alice\".allow: model 'gpt-x' matches no tier in models.tiers",
        ),
        (
            {"overrides": {"org:": {"deny": []}}},
            'models.overrides."org:": identity must look like',
        ),
    ],
)
def test_governor_config_errors_name_the_item(section: Any, message: str) -> None:
    got = one_line_error(ModelGovernor.from_config, section)
    assert got.startswith(message), got


def test_overrides_may_deny_unknown_models() -> None:
    g = governor(overrides={"user:alice": {"deny": ["gpt-x"]}})
    assert g.check("gpt-x", ALICE) == (False, "unknown model 'gpt-x'")


def test_parse_identity_key() -> None:
    assert parse_identity_key("team:support", "x") == ("team", "support")
    assert parse_identity_key("user:a:b", "x") == ("user", "a:b")
    with pytest.raises(ConfigError, match=r"^x: unknown scope 'group'"):
        parse_identity_key("group:a", "x")
