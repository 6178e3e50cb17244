"""Wall-clock session-window boundaries and cron schedules, time-zone and DST correct.

Everything here is a pure function of its arguments: the current time is always passed in, never
read from the system clock (promise 8: time is injected). Every datetime returned is aware and in
UTC; every datetime accepted must be aware (a naive one is a programming error: `ValueError`).

The wall-clock arithmetic is done by APScheduler 3's `CronTrigger`, which knows the zone's rules:

Hourly windows
    begin at every fire time of `CronTrigger(minute=0, timezone=tz)`, i.e. at the top of every
    local hour. On a spring-forward day the skipped hour has no window (Europe/Berlin 2026-03-29:
    23 windows). On a fall-back day the trigger fires at *both* occurrences of the repeated local
    hour (Europe/Berlin 2026-10-25: 02:00+02:00 and 02:00+01:00), so that day has 25 one-hour
    windows and the two repeated-hour windows have different keys. In zones that shift by half an
    hour (Australia/Lord_Howe) one window of the day is 30 minutes longer or shorter.

Daily windows
    begin at the first hourly boundary of each local date, which is local midnight on every
    ordinary day (and a 23 h or 25 h window on DST days). `CronTrigger(hour=0, minute=0)` alone is
    *not* used for this, because it is wrong where a DST transition touches midnight: where
    midnight is skipped (America/Santiago, America/Havana in spring) it does not fire that day at
    all, giving a 47 h "day"; where midnight repeats (America/Havana in autumn) it fires twice,
    giving a 1 h "day". Here such a day starts at its first existing hour (01:00) or at its first
    midnight respectively, and a date that does not exist at all (Pacific/Apia 2011-12-30) has no
    window.

Windows tile time exactly: each window's `end` is the next window's `start`.

A window's `key` is its start rendered in the configured zone as ISO 8601 with offset, e.g.
``2026-10-25T02:00:00+01:00``. The offset makes it unique even for a repeated local hour.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.triggers.cron import CronTrigger

from ..errors import ConfigError

__all__ = [
    "DUE_COUNT_CAP",
    "CronSchedule",
    "Window",
    "WindowLength",
    "date_start",
    "next_boundary",
    "parse_timezone",
    "window_at",
    "windows_between",
]

WindowLength = Literal["hourly", "daily"]

#: `CronSchedule.due` stops counting missed fire times here (the latest one is still exact).
DUE_COUNT_CAP = 10_000

_TICK = timedelta(microseconds=1)
# How far back a search for "the latest fire time <= t" may look before giving up. A valid 5-field
# crontab fires at least once every 8 years (29 February, skipping 2100), so this is generous.
_MAX_LOOKBACK = timedelta(days=366 * 30)
# A fixed reference instant for checking, at construction, that a crontab ever fires.
_REFERENCE = datetime(2000, 1, 1, tzinfo=UTC)
_WEEKDAY_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")

_NextFn = Callable[[datetime], datetime | None]


@dataclass(frozen=True, slots=True)
class Window:
    """One session window: ``start <= t < end`` (both UTC); `key` names it (see module doc)."""

    start: datetime
    end: datetime
    key: str


def parse_timezone(name: str) -> ZoneInfo:
    """The IANA zone called `name`; an unknown or malformed name is a `ConfigError`."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ConfigError(f"unknown time zone {name!r}") from None


def window_at(instant: datetime, length: WindowLength, tz: ZoneInfo) -> Window:
    """The window containing `instant` (``start <= instant < end``).

    An instant exactly on a boundary belongs to the window that starts there.
    """
    t = _utc(instant, "instant")
    if length == "hourly":
        start, end = _latest_at_or_before(_hourly_next(tz), t, timedelta(hours=1))
        return _window(start, end, tz)
    if length == "daily":
        start, end = _day_bounds(t, tz)
        return _window(start, end, tz)
    raise ValueError(f"unknown window length {length!r}")


def windows_between(
    start: datetime, end: datetime, length: WindowLength, tz: ZoneInfo
) -> list[Window]:
    """Every window that intersects ``[start, end)``, in order (empty if ``end <= start``)."""
    lo = _utc(start, "start")
    hi = _utc(end, "end")
    if hi <= lo:
        return []
    window = window_at(lo, length, tz)
    result = [window]
    while window.end < hi:
        window = window_at(window.end, length, tz)
        result.append(window)
    return result


def next_boundary(instant: datetime, length: WindowLength, tz: ZoneInfo) -> datetime:
    """The end of the window containing `instant`: the next rotation time, strictly after it."""
    return window_at(instant, length, tz).end


def date_start(d: date, tz: ZoneInfo) -> datetime:
    """The first instant of local date `d` (UTC): local midnight, or the first hour after it
    where midnight is skipped (the start of that date's daily window)."""
    return _day_start(d, tz)


class CronSchedule:
    """A standard 5-field crontab (``minute hour day-of-month month day-of-week``) in a zone.

    Standard crontab semantics are kept where APScheduler 3's `CronTrigger.from_crontab` differs:

    * day of week: 0 and 7 are Sunday, 1 is Monday (APScheduler 3 numbers 0 as Monday);
    * when both day-of-month and day-of-week are restricted (neither starts with ``*``), the job
      fires when *either* matches, as in Vixie cron (APScheduler requires both).

    DST follows `CronTrigger`: a fire time inside a skipped local hour happens once, at the same
    UTC instant the wall time would have had before the shift (``30 2 * * *`` in Europe/Berlin on
    2026-03-29 fires at 01:30 UTC, i.e. 03:30 CEST); a fire time inside a repeated local hour fires
    at both occurrences (twice on 2026-10-25). `due` coalesces such runs anyway.
    """

    __slots__ = ("_triggers", "expr", "tz")

    def __init__(self, expr: str, tz: ZoneInfo) -> None:
        self.expr = expr
        self.tz = tz
        self._triggers = _build_triggers(expr, tz)
        if self._next_at_or_after(_REFERENCE) is None:
            raise ConfigError(f"cron expression {expr!r} never fires")

    def __repr__(self) -> str:
        return f"CronSchedule({self.expr!r}, {self.tz.key!r})"

    def next_after(self, instant: datetime) -> datetime:
        """The first fire time strictly after `instant`."""
        nxt = self._next_at_or_after(_utc(instant, "instant") + _TICK)
        if nxt is None:  # only past the year 9999
            raise ConfigError(f"cron expression {self.expr!r} has no fire time after {instant}")
        return nxt

    def due(self, last_run: datetime | None, now: datetime) -> tuple[int, datetime | None]:
        """How many fire times fell in ``(last_run, now]``, and the latest of them.

        The caller makes ONE run when the count is at least 1: fire times missed while the daemon
        was down are coalesced, never replayed. Counting stops at `DUE_COUNT_CAP` (the latest fire
        time returned is still the true latest), so a year of downtime on a per-minute schedule
        stays cheap. ``(0, None)`` means nothing is due.

        ``last_run=None`` means "never ran": one run is owed, for the latest fire time at or before
        `now` (``(1, t)``), or ``(0, None)`` if the schedule never fired before `now`. A caller that
        does not want a first run at startup passes its start time as `last_run` instead.
        """
        now_utc = _utc(now, "now")
        if last_run is None:
            latest = self._latest_at_or_before(now_utc)
            return (0, None) if latest is None else (1, latest)
        last = _utc(last_run, "last_run")
        if last >= now_utc:
            return 0, None
        count = 0
        latest_seen: datetime | None = None
        fire = self._next_at_or_after(last + _TICK)
        while fire is not None and fire <= now_utc:
            count += 1
            latest_seen = fire
            if count >= DUE_COUNT_CAP:
                latest_seen = self._latest_at_or_before(now_utc)
                break
            fire = self._next_at_or_after(fire + _TICK)
        return count, latest_seen

    def _next_at_or_after(self, t: datetime) -> datetime | None:
        best: datetime | None = None
        for trigger in self._triggers:
            fire = _fire_at_or_after(trigger, t)
            if fire is not None and (best is None or fire < best):
                best = fire
        return best

    def _latest_at_or_before(self, t: datetime) -> datetime | None:
        try:
            latest, _ = _latest_at_or_before(self._next_at_or_after, t, timedelta(minutes=1))
        except _NoFireTime:
            return None
        return latest


# --- internals ----------------------------------------------------------------------------------


class _NoFireTime(ValueError):
    """No fire time within the search range (only before 1970 - 30 y or after the year 9999)."""


def _utc(dt: datetime, name: str) -> datetime:
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime, got {dt!r}")
    return dt.astimezone(UTC)


def _window(start: datetime, end: datetime, tz: ZoneInfo) -> Window:
    return Window(start=start, end=end, key=start.astimezone(tz).isoformat())


def _fire_at_or_after(trigger: Any, t: datetime) -> datetime | None:
    """The trigger's first fire time >= `t` (UTC in, UTC out).

    Always called with ``previous_fire_time=None`` and a UTC `now`: stepping from a fire time in
    the trigger's zone with local arithmetic would lose the `fold` of a repeated hour.
    """
    fire: datetime | None = trigger.get_next_fire_time(None, t)
    return None if fire is None else fire.astimezone(UTC)


def _latest_at_or_before(
    next_at_or_after: _NextFn, t: datetime, back: timedelta
) -> tuple[datetime, datetime]:
    """(latest fire time <= t, first fire time > t), looking back from `t` in doubling steps."""
    while True:
        fire = next_at_or_after(t - back)
        if fire is not None and fire <= t:
            break
        if back > _MAX_LOOKBACK:
            raise _NoFireTime
        back *= 2
    while True:
        following = next_at_or_after(fire + _TICK)
        if following is None:
            raise _NoFireTime
        if following > t:
            return fire, following
        fire = following


@lru_cache(maxsize=64)
def _hourly_trigger(tz: ZoneInfo) -> Any:
    return CronTrigger(minute=0, timezone=tz)


def _hourly_next(tz: ZoneInfo) -> _NextFn:
    trigger = _hourly_trigger(tz)

    def nxt(t: datetime) -> datetime | None:
        return _fire_at_or_after(trigger, t)

    return nxt


def _next_hour(tz: ZoneInfo, t: datetime) -> datetime:
    fire = _fire_at_or_after(_hourly_trigger(tz), t)
    if fire is None:  # only past the year 9999
        raise ValueError(f"no hourly boundary after {t}")
    return fire


@lru_cache(maxsize=1024)
def _day_start(d: date, tz: ZoneInfo) -> datetime:
    """The first hourly boundary whose local date is `d` or later (UTC).

    Monotone in `d`; equal for consecutive dates only when a date does not exist in the zone.
    """
    naive_midnight = datetime.combine(d, time(0), tzinfo=tz).astimezone(UTC)
    back = timedelta(hours=3)
    while True:
        fire = _next_hour(tz, naive_midnight - back)
        if fire.astimezone(tz).date() < d:
            break
        # The probe may already be past the start of `d` (an odd offset change): look further.
        if back > timedelta(days=8):
            raise ValueError(f"cannot find the start of {d} in {tz.key}")
        back *= 2
    while fire.astimezone(tz).date() < d:
        fire = _next_hour(tz, fire + _TICK)
    return fire


def _day_bounds(t: datetime, tz: ZoneInfo) -> tuple[datetime, datetime]:
    # The latest date whose start is <= t: t's own local date, unless the zone's offsets ever make
    # local dates run backwards or skip (a clock set back across midnight, a date-line move).
    d = t.astimezone(tz).date()
    while _day_start(d, tz) > t:
        d -= timedelta(days=1)
    while _day_start(d + timedelta(days=1), tz) <= t:
        d += timedelta(days=1)
    return _day_start(d, tz), _day_start(d + timedelta(days=1), tz)


def _build_triggers(expr: str, tz: ZoneInfo) -> Sequence[Any]:
    fields = expr.split()
    if len(fields) != 5:
        raise ConfigError(
            f"invalid cron expression {expr!r}: expected 5 fields "
            f"(minute hour day-of-month month day-of-week), got {len(fields)}"
        )
    minute, hour, dom, month, dow = fields
    try:
        weekdays = _translate_weekdays(dow)
        common: dict[str, Any] = {"minute": minute, "hour": hour, "month": month, "timezone": tz}
        if dom.startswith("*") or dow.startswith("*"):
            return (CronTrigger(day=dom, day_of_week=weekdays, **common),)
        # Both restricted: standard cron fires when either field matches.
        return (
            CronTrigger(day=dom, day_of_week="*", **common),
            CronTrigger(day="*", day_of_week=weekdays, **common),
        )
    except ValueError as exc:
        raise ConfigError(f"invalid cron expression {expr!r}: {exc}") from None


def _translate_weekdays(field: str) -> str:
    """A standard crontab day-of-week field (0/7 = Sunday) as APScheduler weekday names."""
    if field == "*":
        return "*"
    days: set[int] = set()
    for item in field.split(","):
        base, slash, step_text = item.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or int(step_text) < 1:
                raise ValueError(f"bad step in day-of-week {item!r}")
            step = int(step_text)
        if base == "*":
            first, last = 0, 6
        elif "-" in base:
            lo, _, hi = base.partition("-")
            first, last = _weekday_number(lo), _weekday_number(hi)
            if first > last:
                raise ValueError(f"day-of-week range {item!r} runs backwards")
        else:
            first = _weekday_number(base)
            last = 7 if slash else first
        days.update(n % 7 for n in range(first, last + 1, step))
    return ",".join(_WEEKDAY_NAMES[n] for n in sorted(days))


def _weekday_number(text: str) -> int:
    lowered = text.lower()
    if lowered in _WEEKDAY_NAMES:
        return _WEEKDAY_NAMES.index(lowered)
    if text.isdigit() and int(text) <= 7:
        return int(text)
    raise ValueError(f"bad day of week {text!r} (0-7 or sun-sat)")
