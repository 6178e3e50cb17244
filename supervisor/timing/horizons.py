"""Horizon profiles: how long a run lasts and how often things happen in it (DESIGN.md table)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

from ..configparse import parse_duration
from ..errors import ConfigError
from ..schema import keys, suggestion
from .windows import WindowLength

HORIZONS = ("hour", "day", "week", "month")


@dataclass(frozen=True, slots=True)
class HorizonProfile:
    name: str
    run_length: timedelta
    cycle_every: timedelta
    window: WindowLength
    checkpoint_every: int
    max_cost: float | None
    max_actions: int | None


DEFAULTS: dict[str, HorizonProfile] = {
    "hour": HorizonProfile(
        "hour", timedelta(hours=1), timedelta(minutes=5), "hourly", 6, 50.0, 500
    ),
    "day": HorizonProfile("day", timedelta(days=1), timedelta(minutes=15), "hourly", 12, 50.0, 500),
    "week": HorizonProfile(
        "week", timedelta(days=7), timedelta(minutes=30), "daily", 24, 500.0, 5000
    ),
    "month": HorizonProfile(
        "month", timedelta(days=30), timedelta(minutes=60), "daily", 24, 500.0, 5000
    ),
}

_KEYS = set(keys("horizons.NAME"))


def profile_from_config(name: str, section: dict[str, Any], where: str) -> HorizonProfile:
    base = DEFAULTS[name]
    unknown = set(section) - _KEYS
    if unknown:
        key = sorted(unknown)[0]
        hint = suggestion(key, _KEYS)
        raise ConfigError(
            f"{where}: unknown key {key!r}" + (f" (did you mean {hint!r}?)" if hint else "")
        )
    changes: dict[str, Any] = {}
    for key in ("run_length", "cycle_every"):
        if key in section:
            changes[key] = timedelta(seconds=parse_duration(section[key], f"{where}.{key}"))
    if "window" in section:
        if section["window"] not in ("hourly", "daily"):
            raise ConfigError(f"{where}.window: must be 'hourly' or 'daily'")
        changes["window"] = section["window"]
    if "checkpoint_every" in section:
        every = section["checkpoint_every"]
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ConfigError(f"{where}.checkpoint_every: must be a whole number of cycles >= 1")
        changes["checkpoint_every"] = every
    for key in ("max_cost", "max_actions"):
        if key in section:
            value = section[key]
            # NaN compares false with everything, so `nan < 0` would pass and mean "unlimited"
            if (
                not isinstance(value, int | float)
                or isinstance(value, bool)
                or not math.isfinite(value)
                or value < 0
            ):
                raise ConfigError(f"{where}.{key}: must be a finite number >= 0, got {value!r}")
            if key == "max_actions" and value != int(value):
                raise ConfigError(f"{where}.{key}: must be a whole number >= 0, got {value!r}")
            changes[key] = int(value) if key == "max_actions" else float(value)
    return replace(base, **changes)
