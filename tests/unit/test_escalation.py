"""Escalation chain: duration parsing, config errors, and where an approval stands over time."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.configparse import check_keys, format_duration, parse_duration
from supervisor.errors import ConfigError
from supervisor.governance.escalation import EscalationChain, EscalationStep, Step

T0 = datetime(2026, 11, 21, 9, 0, tzinfo=UTC)
MIN = timedelta(minutes=1)


def chain() -> EscalationChain:
    return EscalationChain.from_config(
        {
            "timeout": "60m",
            "initial_tier": "operators",
            "escalation": [
                {"after": "15m", "tier": "oncall-2"},
                {"after": "30m", "tier": "manager"},
            ],
        }
    )


def config_error(config: Any) -> str:
    with pytest.raises(ConfigError) as info:
        EscalationChain.from_config(config)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- parse_duration --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (90, 90.0),
        (1.5, 1.5),
        ("90s", 90.0),
        ("15m", 900.0),
        ("1h", 3600.0),
        ("2d", 172800.0),
        ("500ms", 0.5),
        ("1.5h", 5400.0),
        (" 2m ", 120.0),
        ("0.5s", 0.5),
    ],
)
def test_parse_duration_accepts_numbers_and_unit_strings(value: object, seconds: float) -> None:
    assert parse_duration(value, "x") == pytest.approx(seconds)
    assert isinstance(parse_duration(value, "x"), float)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (0, "must be positive"),
        (-5, "must be positive"),
        ("0s", "must be positive"),
        ("0ms", "must be positive"),
        ("-5m", "invalid duration '-5m'"),
        ("abc", "invalid duration 'abc'"),
        ("90", "invalid duration '90'"),
        ("5w", "invalid duration '5w'"),
        ("", "invalid duration ''"),
        ("1h30m", "invalid duration '1h30m'"),
        (True, "got boolean"),
        (None, "got NoneType"),
        ([1], "got array"),
        (float("nan"), "must be finite"),
        (float("inf"), "must be finite"),
    ],
)
def test_parse_duration_rejects_with_the_location(value: object, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_duration(value, "approvals.timeout")
    message = str(info.value)
    assert message.startswith("approvals.timeout: ")
    assert fragment in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("seconds", "text"), [(900, "15m"), (3600, "1h"), (86400, "1d"), (90, "90s"), (0.5, "500ms")]
)
def test_format_duration_is_the_shortest_exact_spelling(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text, "x") == pytest.approx(seconds)


def test_check_keys_names_every_unknown_key() -> None:
    with pytest.raises(ConfigError, match=r"^t: unknown keys 'b', 'c' \(a\)$"):
        check_keys({"a": 1, "b": 2, "c": 3}, ("a",), "t")
    check_keys({"a": 1}, ("a",), "t")  # known keys pass


# --- config ----------------------------------------------------------------------------------


@pytest.mark.parametrize("section", [None, {}])
def test_defaults(section: dict[str, Any] | None) -> None:
    c = EscalationChain.from_config(section)
    assert c.timeout == 3600.0
    assert c.initial_tier == "operators"
    assert c.steps == ()


def test_full_config() -> None:
    c = chain()
    assert c.timeout == 3600.0
    assert c.steps == (EscalationStep(900.0, "oncall-2"), EscalationStep(1800.0, "manager"))


def test_numeric_durations_and_custom_initial_tier() -> None:
    c = EscalationChain.from_config(
        {"timeout": 120, "initial_tier": "l1", "escalation": [{"after": 60, "tier": "l2"}]}
    )
    assert (c.timeout, c.initial_tier, c.steps) == (120.0, "l1", (EscalationStep(60.0, "l2"),))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"timout": "1h"}, "approvals: unknown key 'timout' (did you mean 'timeout'?)"),
        ({"timeout": "0s"}, "approvals.timeout: duration must be positive, got '0s'"),
        ({"initial_tier": ""}, "approvals.initial_tier: must not be empty"),
        ({"initial_tier": 3}, "approvals.initial_tier: expected a string, got number"),
        ({"escalation": {"after": "1m"}}, "approvals.escalation: expected an array, got table"),
        ({"escalation": ["1m"]}, "approvals.escalation[0]: expected a table, got string"),
        ({"escalation": [{"tier": "x"}]}, "approvals.escalation[0]: missing 'after'"),
        ({"escalation": [{"after": "1m"}]}, "approvals.escalation[0]: missing 'tier'"),
        (
            {"escalation": [{"after": "1m", "tier": "x", "notify": True}]},
            "approvals.escalation[0]: unknown key 'notify' (after, tier)",
        ),
        (
            {"escalation": [{"after": "soon", "tier": "x"}]},
            "approvals.escalation[0] (\"x\").after: invalid duration 'soon'",
        ),
        (
            {
                "escalation": [
                    {"after": "15m", "tier": "oncall-2"},
                    {"after": "15m", "tier": "manager"},
                ]
            },
            'approvals.escalation[1] ("manager"): after 15m must be later than the previous '
            "step's 15m",
        ),
        (
            {
                "escalation": [
                    {"after": "30m", "tier": "oncall-2"},
                    {"after": "15m", "tier": "manager"},
                ]
            },
            'approvals.escalation[1] ("manager"): after 15m must be later than the previous '
            "step's 30m",
        ),
        (
            {"timeout": "30m", "escalation": [{"after": "30m", "tier": "manager"}]},
            'approvals.escalation[0] ("manager"): after 30m must be before the timeout 30m',
        ),
        (
            # No timeout given: checked against the default of one hour.
            {"escalation": [{"after": "2h", "tier": "manager"}]},
            'approvals.escalation[0] ("manager"): after 2h must be before the timeout 1h',
        ),
        ("60m", "approvals: expected a table, got string"),
    ],
)
def test_config_errors_name_the_item(config: Any, message: str) -> None:
    got = config_error(config)
    assert got.startswith(message), got


def test_chain_built_in_code_keeps_the_invariants() -> None:
    with pytest.raises(ValueError, match="strictly increasing"):
        EscalationChain(timeout=60, steps=(EscalationStep(30, "a"), EscalationStep(30, "b")))
    with pytest.raises(ValueError, match="below the timeout"):
        EscalationChain(timeout=60, steps=(EscalationStep(60, "a"),))
    with pytest.raises(ValueError, match="positive"):
        EscalationChain(timeout=0)


# --- deadline and evaluate -------------------------------------------------------------------


def test_deadline_is_creation_plus_timeout() -> None:
    assert chain().deadline(T0) == T0 + 60 * MIN


def test_deadline_is_absolute_across_a_dst_change() -> None:
    # 01:30 CET on the night clocks jump to CEST: one real hour later is 03:30 CEST.
    berlin = ZoneInfo("Europe/Berlin")
    created = datetime(2026, 3, 29, 1, 30, tzinfo=berlin)
    deadline = EscalationChain(timeout=3600).deadline(created)
    assert deadline == datetime(2026, 3, 29, 0, 30, tzinfo=UTC) + timedelta(hours=1)
    assert deadline.astimezone(berlin).hour == 3
    assert (deadline - created) == timedelta(hours=1)


@pytest.mark.parametrize(
    ("offset", "tier", "level", "expired", "next_offset"),
    [
        (timedelta(0), "operators", 0, False, 15 * MIN),
        (15 * MIN - timedelta(microseconds=1), "operators", 0, False, 15 * MIN),
        (15 * MIN, "oncall-2", 1, False, 30 * MIN),
        (29 * MIN, "oncall-2", 1, False, 30 * MIN),
        (30 * MIN, "manager", 2, False, 60 * MIN),
        (59 * MIN, "manager", 2, False, 60 * MIN),
        (60 * MIN, "manager", 2, True, None),
        (timedelta(days=9), "manager", 2, True, None),
    ],
)
def test_evaluate_walks_the_chain(
    offset: timedelta, tier: str, level: int, expired: bool, next_offset: timedelta | None
) -> None:
    step = chain().evaluate(T0, T0 + offset)
    expected_next = None if next_offset is None else T0 + next_offset
    assert step == Step(tier=tier, level=level, expired=expired, next_at=expected_next)


def test_downtime_across_several_steps_jumps_straight_to_the_right_tier() -> None:
    # Last seen at creation; the daemon comes back 40 minutes later: both steps have passed.
    step = chain().evaluate(T0, T0 + 40 * MIN)
    assert (step.tier, step.level, step.expired) == ("manager", 2, False)
    assert step.next_at == chain().deadline(T0)


def test_downtime_past_the_deadline_expires() -> None:
    step = chain().evaluate(T0, T0 + timedelta(hours=5))
    assert step.expired
    assert step.next_at is None


def test_no_steps_means_initial_tier_until_deadline() -> None:
    c = EscalationChain(timeout=600)
    assert c.evaluate(T0, T0 + MIN) == Step("operators", 0, False, T0 + 10 * MIN)
    assert c.evaluate(T0, T0 + 10 * MIN) == Step("operators", 0, True, None)


def test_now_before_creation_clock_skew_stays_at_the_start() -> None:
    step = chain().evaluate(T0, T0 - MIN)
    assert step == Step("operators", 0, False, T0 + 15 * MIN)


def test_zones_do_not_matter_only_instants() -> None:
    tokyo = ZoneInfo("Asia/Tokyo")
    assert chain().evaluate(T0.astimezone(tokyo), T0 + 20 * MIN) == chain().evaluate(
        T0, (T0 + 20 * MIN).astimezone(ZoneInfo("America/New_York"))
    )


def test_naive_datetimes_are_rejected() -> None:
    naive = datetime(2026, 11, 21, 9, 0)
    with pytest.raises(ValueError, match="created_at must be an aware datetime"):
        chain().evaluate(naive, T0)
    with pytest.raises(ValueError, match="now must be an aware datetime"):
        chain().evaluate(T0, naive)
    with pytest.raises(ValueError, match="created_at"):
        chain().deadline(naive)


@st.composite
def chains(draw: st.DrawFn) -> EscalationChain:
    timeout = draw(st.integers(min_value=2, max_value=10**6))
    afters = draw(st.sets(st.integers(min_value=1, max_value=timeout - 1), max_size=5))
    steps = tuple(EscalationStep(float(a), f"t{i}") for i, a in enumerate(sorted(afters)))
    return EscalationChain(timeout=float(timeout), steps=steps)


@settings(database=None, derandomize=True, max_examples=300)
@given(
    c=chains(),
    a=st.integers(min_value=-10, max_value=2 * 10**6),
    b=st.integers(min_value=-10, max_value=2 * 10**6),
)
def test_evaluate_properties(c: EscalationChain, a: int, b: int) -> None:
    first, second = sorted((a, b))
    early = c.evaluate(T0, T0 + timedelta(seconds=first))
    late = c.evaluate(T0, T0 + timedelta(seconds=second))
    # Monotonic: time never takes an approval back down the chain or un-expires it.
    assert late.level >= early.level
    assert late.expired >= early.expired
    # The tier is the one of the level reached.
    assert early.tier == (c.initial_tier if early.level == 0 else c.steps[early.level - 1].tier)
    # Sleeping until next_at always observes the announced change; nothing changes before it.
    if early.next_at is None:
        assert early.expired
    else:
        assert early.next_at > T0 + timedelta(seconds=first)
        at = c.evaluate(T0, early.next_at)
        assert at.level > early.level or at.expired
        just_before = c.evaluate(T0, early.next_at - timedelta(microseconds=1))
        assert (just_before.level, just_before.expired) == (early.level, early.expired)


def test_error_messages_are_single_lines() -> None:
    message = config_error({"escalation": [{"after": "15m", "tier": "x", "bogus": 1}]})
    assert re.fullmatch(r"[^\n]+", message)
