"""The approval escalation chain: which tier a pending approval belongs to at a given instant.

Pure and synchronous: instants are passed in, nothing here reads the clock. `evaluate` depends
only on (created_at, now), so after downtime spanning several steps it lands straight on the
right tier, and past the deadline it reports `expired` (the caller denies: deny by default).

Config (section `[approvals]`, every key optional)::

    timeout = "60m"                 # deadline after creation (default 3600 s)
    initial_tier = "operators"      # tier a new approval starts at (default "operators")
    escalation = [ { after = "15m", tier = "oncall-2" }, { after = "30m", tier = "manager" } ]
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from ..configparse import (
    array,
    check_keys,
    format_duration,
    nonempty_str,
    parse_duration,
    require_aware,
    table,
)
from ..errors import ConfigError
from ..schema import keys

DEFAULT_TIMEOUT = 3600.0
DEFAULT_INITIAL_TIER = "operators"


# --- the chain -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EscalationStep:
    """Once `after` seconds have passed since creation, the approval belongs to `tier`."""

    after: float
    tier: str


@dataclass(frozen=True, slots=True)
class Step:
    """Where a pending approval stands at an instant.

    `level` is 0 for the initial tier and i+1 once steps[i] applies, so a caller can tell a
    change of level even when two steps name the same tier.
    """

    tier: str
    level: int
    expired: bool
    next_at: datetime | None


@dataclass(frozen=True, slots=True)
class EscalationChain:
    timeout: float = DEFAULT_TIMEOUT
    initial_tier: str = DEFAULT_INITIAL_TIER
    steps: tuple[EscalationStep, ...] = ()

    def __post_init__(self) -> None:
        # The same invariants as the parser, so a chain built in code cannot be inconsistent.
        if not (math.isfinite(self.timeout) and self.timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds, got {self.timeout}")
        previous = 0.0
        for step in self.steps:
            if not previous < step.after < self.timeout:
                raise ValueError(
                    f"escalation steps must be strictly increasing, positive and below the "
                    f"timeout: got after={step.after} (previous {previous}, "
                    f"timeout {self.timeout})"
                )
            previous = step.after

    @classmethod
    def from_config(cls, section: Mapping[str, Any] | None) -> EscalationChain:
        if section is None:
            return cls()
        section = table(section, "approvals")
        check_keys(section, keys("approvals"), "approvals")
        timeout = DEFAULT_TIMEOUT
        if "timeout" in section:
            timeout = parse_duration(section["timeout"], "approvals.timeout")
        initial = DEFAULT_INITIAL_TIER
        if "initial_tier" in section:
            initial = nonempty_str(section["initial_tier"], "approvals.initial_tier")
        steps: list[EscalationStep] = []
        for i, raw in enumerate(array(section.get("escalation", []), "approvals.escalation")):
            where = f"approvals.escalation[{i}]"
            entry = table(raw, where)
            check_keys(entry, keys("approvals.escalation[]"), where)
            for key in ("after", "tier"):
                if key not in entry:
                    raise ConfigError(f"{where}: missing {key!r}")
            tier = nonempty_str(entry["tier"], f"{where}.tier")
            where = f"{where} ({json.dumps(tier)})"
            after = parse_duration(entry["after"], f"{where}.after")
            if steps and after <= steps[-1].after:
                raise ConfigError(
                    f"{where}: after {format_duration(after)} must be later than the previous "
                    f"step's {format_duration(steps[-1].after)}"
                )
            if after >= timeout:
                raise ConfigError(
                    f"{where}: after {format_duration(after)} must be before the timeout "
                    f"{format_duration(timeout)}"
                )
            steps.append(EscalationStep(after=after, tier=tier))
        return cls(timeout=timeout, initial_tier=initial, steps=tuple(steps))

    def _at(self, created_at: datetime, seconds: float) -> datetime:
        # Absolute arithmetic: adding to a zoned datetime is wall-clock arithmetic in Python,
        # which would be off by an hour across a DST change.
        return created_at.astimezone(UTC) + timedelta(seconds=seconds)

    def deadline(self, created_at: datetime) -> datetime:
        """When a still-pending approval is denied. In UTC."""
        require_aware(created_at, "created_at")
        return self._at(created_at, self.timeout)

    def evaluate(self, created_at: datetime, now: datetime) -> Step:
        """The tier the approval should be at by `now`, whether it expired, and when that changes.

        Instants are compared (not floating elapsed seconds), so evaluating at the returned
        `next_at` always observes the change it announced.
        """
        require_aware(created_at, "created_at")
        require_aware(now, "now")
        deadline = self._at(created_at, self.timeout)
        level = 0
        tier = self.initial_tier
        next_at: datetime | None = deadline
        for i, step in enumerate(self.steps):
            at = self._at(created_at, step.after)
            if now < at:
                next_at = at
                break
            level, tier = i + 1, step.tier
        expired = now >= deadline
        return Step(tier=tier, level=level, expired=expired, next_at=None if expired else next_at)
