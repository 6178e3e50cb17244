"""Token budgets and the model governor: who may spend how many tokens, on which models.

Pure: the store charges budgets; this module says which budgets apply to an action's identity
and which period bucket an instant falls in, and whether a model is allowed.

An identity is a mapping like {"user": "alice", "team": "support", "org": "acme"}; config names
one of its parts as "scope:name" ("team:support"). Where several scopes speak, the narrowest
wins: user beats team beats org.

Config::

    [[tokens.budgets]]
    scope = "team"          # user | team | org
    identity = "support"
    period = "daily"        # daily | weekly | monthly (in the zone the caller passes)
    max_tokens = 200000     # >= 0; 0 blocks all use
    max_cost = 50.0         # optional, >= 0

    [models]                # absent entirely: model governance is off, every model is allowed
    unknown = "deny"        # the only accepted value: an unknown model is never waved through
    [models.tiers]          # tier -> globs of model names
    basic = ["small-*", "mini-*"]
    [models.access]         # identity -> allowed tiers; the narrowest entry wins
    "team:support" = ["basic"]
    [models.overrides]      # identity -> exact models; beats tiers; deny beats allow
    "user:alice" = { allow = ["large-1"], deny = [] }
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from fnmatch import fnmatchcase
from typing import Any, Literal, cast, get_args
from zoneinfo import ZoneInfo

from ..configparse import array, check_keys, key_path, nonempty_str, require_aware, table, type_name
from ..errors import ConfigError
from ..schema import keys

Scope = Literal["user", "team", "org"]
SCOPES: tuple[Scope, ...] = get_args(Scope)  # narrowest first: the order of precedence
Period = Literal["daily", "weekly", "monthly"]
PERIODS: tuple[Period, ...] = get_args(Period)


def period_key(period: Period, instant: datetime, tz: ZoneInfo) -> str:
    """The budget bucket `instant` falls in, counted in zone `tz`.

    daily "2026-11-21", weekly ISO week "2026-W47" (ISO year: 2027-01-01 may be "2026-W53"),
    monthly "2026-11".
    """
    local = require_aware(instant, "instant").astimezone(tz)
    if period == "daily":
        return local.date().isoformat()
    if period == "weekly":
        year, week, _ = local.isocalendar()
        return f"{year:04d}-W{week:02d}"
    if period == "monthly":
        return f"{local.year:04d}-{local.month:02d}"
    raise ValueError(f"unknown period {period!r} ({', '.join(PERIODS)})")


def parse_identity_key(key: str, where: str) -> tuple[Scope, str]:
    """ "team:support" -> ("team", "support")."""
    scope, sep, name = key.partition(":")
    if not sep or not name.strip():
        raise ConfigError(f"{where}: identity must look like 'scope:name' (e.g. 'team:support')")
    if scope not in SCOPES:
        raise ConfigError(f"{where}: unknown scope {scope!r} ({', '.join(SCOPES)})")
    return scope, name


def _identity_keys(identity: Mapping[str, str]) -> list[str]:
    """The identity's "scope:name" keys, narrowest first; absent or empty parts are skipped."""
    return [f"{s}:{identity[s]}" for s in SCOPES if identity.get(s)]


# --- token budgets ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenBudget:
    scope: Scope
    identity: str
    period: Period
    max_tokens: int
    max_cost: float | None = None

    @property
    def label(self) -> str:
        """Stable name of the budget, e.g. "team:support/daily"; unique within a config."""
        return f"{self.scope}:{self.identity}/{self.period}"

    def period_key(self, instant: datetime, tz: ZoneInfo) -> str:
        return period_key(self.period, instant, tz)


@dataclass(frozen=True, slots=True)
class TokenBudgets:
    budgets: tuple[TokenBudget, ...] = ()

    def applicable(self, identity: Mapping[str, str]) -> list[TokenBudget]:
        """Every budget naming a part of `identity`, in config order. Each one must have room."""
        return [b for b in self.budgets if identity.get(b.scope) == b.identity]

    @classmethod
    def from_config(cls, entries: Sequence[Mapping[str, Any]] | None) -> TokenBudgets:
        if entries is None:
            return cls()
        seen: dict[tuple[str, str, str], int] = {}
        budgets: list[TokenBudget] = []
        for i, raw in enumerate(array(entries, "tokens.budgets")):
            budget = _parse_budget(raw, i)
            key = (budget.scope, budget.identity, budget.period)
            if key in seen:
                raise ConfigError(
                    f"tokens.budgets[{i}] ({budget.scope}:{budget.identity} {budget.period}): "
                    f"duplicate of tokens.budgets[{seen[key]}]"
                )
            seen[key] = i
            budgets.append(budget)
        return cls(tuple(budgets))


def _parse_budget(raw: object, index: int) -> TokenBudget:
    where = f"tokens.budgets[{index}]"
    entry = table(raw, where)
    for key in ("scope", "identity"):
        if key not in entry:
            raise ConfigError(f"{where}: missing {key!r}")
    scope = entry["scope"]
    if scope not in SCOPES:
        raise ConfigError(f"{where}: unknown scope {scope!r} ({', '.join(SCOPES)})")
    name = nonempty_str(entry["identity"], f"{where}.identity")
    where = f"{where} ({scope}:{name})"
    check_keys(entry, keys("tokens.budgets[]"), where)
    for key in ("period", "max_tokens"):
        if key not in entry:
            raise ConfigError(f"{where}: missing {key!r}")
    period = entry["period"]
    if period not in PERIODS:
        raise ConfigError(f"{where}: unknown period {period!r} ({', '.join(PERIODS)})")
    max_tokens = entry["max_tokens"]
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise ConfigError(f"{where}: max_tokens must be an integer, got {type_name(max_tokens)}")
    if max_tokens < 0:
        raise ConfigError(f"{where}: max_tokens must be >= 0, got {max_tokens}")
    max_cost: float | None = None
    if "max_cost" in entry:
        raw_cost = entry["max_cost"]
        if isinstance(raw_cost, bool) or not isinstance(raw_cost, int | float):
            raise ConfigError(f"{where}: max_cost must be a number, got {type_name(raw_cost)}")
        if not math.isfinite(raw_cost) or raw_cost < 0:
            raise ConfigError(f"{where}: max_cost must be a finite number >= 0, got {raw_cost}")
        max_cost = float(raw_cost)
    return TokenBudget(scope, name, period, max_tokens, max_cost)


# --- the model governor ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Override:
    allow: frozenset[str] = frozenset()
    deny: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class ModelGovernor:
    """Decides whether an identity may use a model.

    `enabled=False` (no `[models]` section at all) allows every model: governance is opt-in,
    but once the section exists it fails closed (unknown models and identities are denied).
    """

    enabled: bool = False
    tiers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # tier -> model globs
    access: Mapping[str, frozenset[str]] = field(default_factory=dict)  # "scope:name" -> tiers
    overrides: Mapping[str, Override] = field(default_factory=dict)  # "scope:name" -> override

    def tiers_of(self, model: str) -> list[str]:
        return [t for t, globs in self.tiers.items() if any(fnmatchcase(model, g) for g in globs)]

    def check(self, model: str | None, identity: Mapping[str, str]) -> tuple[bool, str]:
        """(allowed, detail). Order: no model, governance off, unknown model, overrides, access."""
        if model is None:
            return True, "no model"
        if not self.enabled:
            return True, "model governance off"
        model_tiers = self.tiers_of(model)
        if not model_tiers:
            return False, f"unknown model {model!r}"
        keys = _identity_keys(identity)
        # The narrowest identity whose override names the model decides; deny beats allow there.
        for key in keys:
            override = self.overrides.get(key)
            if override is None:
                continue
            if model in override.deny:
                return False, f"model {model!r} denied for {key} by override"
            if model in override.allow:
                return True, f"model {model!r} allowed for {key} by override"
        # The narrowest access entry decides alone, so a team's list can narrow its org's.
        for key in keys:
            allowed = self.access.get(key)
            if allowed is None:
                continue
            granted = [t for t in model_tiers if t in allowed]
            if granted:
                return True, f"model {model!r} allowed for {key} by tier {granted[0]}"
            listed = ", ".join(sorted(allowed)) or "none"
            return False, (
                f"model {model!r} ({', '.join(model_tiers)}) not allowed for {key} "
                f"(tiers: {listed})"
            )
        who = ", ".join(keys) or "an empty identity"
        return False, f"no model access entry for {who}"

    @classmethod
    def from_config(cls, section: Mapping[str, Any] | None) -> ModelGovernor:
        if section is None:
            return cls(enabled=False)
        section = table(section, "models")
        check_keys(section, keys("models"), "models")
        if "unknown" in section and section["unknown"] != "deny":
            raise ConfigError(
                f"models.unknown: {section['unknown']!r} is not allowed; only 'deny' "
                "(an unknown model is never waved through)"
            )
        tiers: dict[str, tuple[str, ...]] = {}
        for tier, raw in table(section.get("tiers", {}), "models.tiers").items():
            where = key_path("models.tiers", tier)
            globs = _str_list(raw, where)
            if not globs:
                raise ConfigError(f"{where}: needs at least one model glob")
            tiers[tier] = tuple(globs)
        governor = cls(enabled=True, tiers=tiers)
        access: dict[str, frozenset[str]] = {}
        for key, raw in table(section.get("access", {}), "models.access").items():
            where = key_path("models.access", key)
            parse_identity_key(key, where)
            names = _str_list(raw, where)
            for name in names:
                if name not in tiers:
                    known = ", ".join(tiers) or "none defined"
                    raise ConfigError(f"{where}: unknown tier {name!r} ({known})")
            access[key] = frozenset(names)
        overrides: dict[str, Override] = {}
        for key, raw in table(section.get("overrides", {}), "models.overrides").items():
            where = key_path("models.overrides", key)
            parse_identity_key(key, where)
            entry = table(raw, where)
            check_keys(entry, keys("models.overrides.IDENTITY"), where)
            allow = _str_list(entry.get("allow", []), f"{where}.allow")
            for model in allow:
                # Allowing a model no tier knows would contradict "unknown is never allowed".
                if not governor.tiers_of(model):
                    raise ConfigError(
                        f"{where}.allow: model {model!r} matches no tier in models.tiers "
                        "(an unknown model is never allowed)"
                    )
            deny = _str_list(entry.get("deny", []), f"{where}.deny")
            overrides[key] = Override(frozenset(allow), frozenset(deny))
        return cls(enabled=True, tiers=tiers, access=access, overrides=overrides)


def _str_list(value: object, where: str) -> list[str]:
    items = array(value, where)
    for item in items:
        nonempty_str(item, where)
    return cast(list[str], items)
