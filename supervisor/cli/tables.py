"""Text output of the list commands: aligned columns under a header row, times in the configured
zone to the second, relative ages, and short id prefixes that the other commands accept.

Id prefixes resolve in one place (`resolve_prefix` over candidate ids, `resolve_id` over the
store), like git: a unique prefix of at least MIN_PREFIX characters names its id; an ambiguous
one is a usage error naming the candidates.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta, tzinfo
from typing import TYPE_CHECKING, Any

from ..errors import UsageError

if TYPE_CHECKING:
    from ..store import Store
    from ..store.base import IdKind

MIN_PREFIX = 6
SHORT = 8  # characters of an id shown in a table: enough to be unique, and accepted back


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], empty: str) -> str:
    """Left-aligned columns, two spaces apart; the last column is not padded."""
    cells = [[("" if v is None else str(v)) for v in row] for row in rows]
    if not cells:
        return empty
    widths = [max(len(r[i]) for r in [list(headers), *cells]) for i in range(len(headers))]
    lines = []
    for row in [list(headers), *cells]:
        line = "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True))
        lines.append(line.rstrip())
    return "\n".join(lines)


def when(value: datetime | str | None, tz: tzinfo) -> str:
    """An instant in the configured zone, to the second, with the zone's abbreviation."""
    if value is None or value == "":
        return "-"
    instant = datetime.fromisoformat(value) if isinstance(value, str) else value
    return instant.astimezone(tz).strftime("%Y-%m-%d %H:%M:%S %Z")


def span(delta: timedelta) -> str:
    """A duration, coarse: 45s, 12m, 3h05m, 2d04h."""
    seconds = int(abs(delta).total_seconds())
    if seconds < 60:
        return f"{seconds}s"
    minutes, hours, days = seconds // 60, seconds // 3600, seconds // 86400
    if seconds < 3600:
        return f"{minutes}m"
    if seconds < 86400:
        return f"{hours}h{minutes % 60:02d}m"
    return f"{days}d{hours % 24:02d}h"


def relative(then: datetime | str | None, now: datetime) -> str:
    """`12m ago` or `in 48m`."""
    if then is None or then == "":
        return "-"
    instant = datetime.fromisoformat(then) if isinstance(then, str) else then
    delta = instant - now
    return f"in {span(delta)}" if delta > timedelta(0) else f"{span(delta)} ago"


def elapsed(then: datetime | str, now: datetime) -> str:
    """How long ago `then` was, without a suffix: `12m`."""
    instant = datetime.fromisoformat(then) if isinstance(then, str) else then
    return span(now - instant)


def short(value: str | None) -> str:
    return "-" if not value else value[:SHORT]


def payload_json(value: Any) -> str:
    """A payload as compact JSON (never Python's repr)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def resolve_prefix(candidates: Iterable[str], text: str, what: str) -> str | None:
    """The one candidate `text` names: itself, or the only one it is a prefix (>= 6 chars) of.

    None when nothing matches (the caller says what is unknown); ambiguous is a UsageError.
    """
    found = sorted({c for c in candidates if c.startswith(text)})
    if text in found:
        return text
    if not found:
        return None
    if len(text) < MIN_PREFIX:
        raise UsageError(
            f"{what} prefix {text!r} is too short: give at least {MIN_PREFIX} characters"
        )
    if len(found) > 1:
        shown = ", ".join(found[:10]) + (f" and {len(found) - 10} more" if len(found) > 10 else "")
        raise UsageError(f"ambiguous {what} prefix {text!r}: it matches {shown}")
    return found[0]


async def resolve_id(store: Store, kind: IdKind, text: str, fleet: str) -> str:
    """The full id a prefix names in the store; `text` unchanged when nothing matches."""
    ids = await store.ids_with_prefix(kind, fleet=fleet, prefix=text)
    resolved = resolve_prefix(ids, text, kind)
    return text if resolved is None else resolved


def emit(args: argparse.Namespace, data: Any, text: str) -> None:
    """A command's result on stdout: `data` as JSON with --json, else `text`."""
    if getattr(args, "json", False):
        print(json.dumps(data, default=_default, sort_keys=True))
    else:
        print(text)


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
