"""Readers for config values, shared by every section's parser (policy, approvals, budgets,
alerts, metrics, the console): each raises `ConfigError` with one line naming the item."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from .errors import ConfigError
from .schema import suggestion

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|m|h|d)\s*")
_DURATION_HINT = 'a number of seconds or a string like "90s", "15m", "1h", "2d", "500ms"'
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def type_name(value: object) -> str:
    """The TOML word for a value's type, for error messages."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "table"
    if isinstance(value, list | tuple):
        return "array"
    return type(value).__name__


def key_path(base: str, key: str) -> str:
    """`base.key`, quoting the key the way TOML would ("team:support" is not a bare key)."""
    return f"{base}.{key}" if _BARE_KEY.fullmatch(key) else f"{base}.{json.dumps(key)}"


def table(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a table, got {type_name(value)}")
    return value


def array(value: object, where: str) -> list[Any]:
    if not isinstance(value, list | tuple):
        raise ConfigError(f"{where}: expected an array, got {type_name(value)}")
    return list(value)


def check_keys(section: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    """Unknown keys are errors: a typo must not silently disable a rule or a limit."""
    known = tuple(allowed)
    unknown = [k for k in section if k not in known]
    if unknown:
        names = ", ".join(repr(k) for k in unknown)
        noun = "key" if len(unknown) == 1 else "keys"
        hint = suggestion(unknown[0], known) if len(unknown) == 1 else None
        listed = f"did you mean {hint!r}?" if hint else ", ".join(known)
        raise ConfigError(f"{where}: unknown {noun} {names} ({listed})")


def nonempty_str(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {type_name(value)}")
    if not value.strip():
        raise ConfigError(f"{where}: must not be empty")
    return value


def parse_duration(value: object, where: str) -> float:
    """Seconds from a config duration: a number of seconds, or "90s", "15m", "1h", "2d", "500ms".

    Zero, negative, NaN and infinite durations are errors: none of them is a usable delay.
    """
    if isinstance(value, bool):  # bool is an int subclass; `true` is not a duration
        raise ConfigError(f"{where}: expected a duration ({_DURATION_HINT}), got boolean")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION.fullmatch(value)
        if match is None:
            raise ConfigError(f"{where}: invalid duration {value!r} ({_DURATION_HINT})")
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    else:
        raise ConfigError(
            f"{where}: expected a duration ({_DURATION_HINT}), got {type_name(value)}"
        )
    if not math.isfinite(seconds):
        raise ConfigError(f"{where}: duration must be finite, got {value!r}")
    if seconds <= 0:
        raise ConfigError(f"{where}: duration must be positive, got {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest exact spelling, for messages: 900 -> "15m", 0.5 -> "500ms"."""
    for unit in ("d", "h", "m", "s"):
        size = _UNITS[unit]
        if seconds >= size and (seconds / size).is_integer():
            return f"{int(seconds / size)}{unit}"
    return f"{seconds * 1000:g}ms" if seconds < 1 else f"{seconds:g}s"


def require_aware(instant: datetime, name: str) -> datetime:
    """Naive datetimes are a programming error: their meaning depends on the host's zone."""
    if instant.tzinfo is None or instant.utcoffset() is None:
        raise ValueError(f"{name} must be an aware datetime, got naive {instant.isoformat()}")
    return instant
