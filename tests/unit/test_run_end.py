"""A horizon run of whole days covers whole local dates, in every zone, across every transition.

For every zone of the tz database with an offset change in 2026 or 2027, for the dates around each
change, a `day`, `week` and `month` run anchored at the first instant of a local date (00:00, or
01:00 where midnight is skipped) must end at the first instant of the date N days later: every
window of the run starts on one of its N dates, and the window at the run's end starts on the
date after them. A run anchored mid-date ends at the same wall time N dates later (or the first
instant after it, when that time does not exist).
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from functools import cache
from zoneinfo import ZoneInfo, available_timezones

import pytest

from supervisor.runtime.daemon import run_end
from supervisor.timing.horizons import DEFAULTS, HorizonProfile
from supervisor.timing.windows import WindowLength, window_at

FROM = datetime(2026, 1, 1, tzinfo=UTC)
TO = datetime(2028, 1, 1, tzinfo=UTC)


@cache
def transition_dates() -> dict[str, list[date]]:
    """Zone name -> local dates of its offset changes in [FROM, TO) (a day-by-day scan, then
    hour by hour within the day that changed)."""
    found: dict[str, list[date]] = {}
    for name in sorted(available_timezones()):
        tz = ZoneInfo(name)
        dates: list[date] = []
        t = FROM
        offset = t.astimezone(tz).utcoffset()
        while t < TO:
            nxt = t + timedelta(days=1)
            if nxt.astimezone(tz).utcoffset() != offset:
                probe = t
                while probe.astimezone(tz).utcoffset() == offset:
                    probe += timedelta(hours=1)
                dates.append(probe.astimezone(tz).date())
                offset = nxt.astimezone(tz).utcoffset()
            t = nxt
        if dates:
            found[name] = dates
    return found


def _day_start(d: date, tz: ZoneInfo) -> datetime:
    """The first instant of local date `d` that is a local top of the hour, found by stepping
    through UTC quarter hours (every offset in use is a multiple of 15 minutes), independently
    of the window code under test."""
    t = datetime(d.year, d.month, d.day, tzinfo=tz).astimezone(UTC) - timedelta(hours=3)
    t = t.replace(minute=t.minute - t.minute % 15, second=0, microsecond=0)
    while True:
        local = t.astimezone(tz)
        if local.date() >= d and local.minute == 0:
            return t
        t += timedelta(minutes=15)


def _profile(name: str, window: WindowLength) -> HorizonProfile:
    from dataclasses import replace

    return replace(DEFAULTS[name], window=window)


def test_the_scan_finds_the_zones_of_the_issue() -> None:
    zones = transition_dates()
    assert date(2026, 9, 6) in zones["America/Santiago"]
    assert date(2026, 3, 8) in zones["America/Havana"]
    assert len(zones) > 50  # every zone with DST, not a handful


@pytest.mark.parametrize(
    ("zone", "day", "hours"),
    [("America/Santiago", date(2026, 9, 6), 23), ("America/Havana", date(2026, 3, 8), 23),
     ("Europe/Berlin", date(2026, 10, 25), 25), ("America/Havana", date(2026, 11, 1), 25)],
)  # fmt: skip
def test_a_day_run_on_a_dst_date_ends_at_the_next_date(zone: str, day: date, hours: int) -> None:
    tz = ZoneInfo(zone)
    anchor = _day_start(day, tz)
    end = run_end(anchor, DEFAULTS["day"], tz)
    assert end == _day_start(day + timedelta(days=1), tz)
    assert end - anchor == timedelta(hours=hours)


@pytest.mark.parametrize("horizon", ["day", "week", "month"])
def test_whole_day_runs_cover_whole_local_dates_in_every_zone(horizon: str) -> None:
    profile = DEFAULTS[horizon]
    days = profile.run_length // timedelta(days=1)
    failures: list[str] = []
    for name, dates in transition_dates().items():
        tz = ZoneInfo(name)
        for changed in dates:
            # The date of the change, and runs that start before it and cross it.
            for first in {changed, changed - timedelta(days=1), changed - timedelta(days=days)}:
                for window in ("hourly", "daily"):
                    anchor = _day_start(first, tz)
                    end = run_end(anchor, _profile(horizon, window), tz)  # type: ignore[arg-type]
                    want = _day_start(first + timedelta(days=days), tz)
                    if end != want:
                        failures.append(f"{name} {first} {window}: {end} != {want}")
    assert not failures, f"{len(failures)} runs off: {failures[:10]}"


def test_a_run_anchored_mid_date_ends_at_that_wall_time_on_the_next_date() -> None:
    failures: list[str] = []
    for name, dates in transition_dates().items():
        tz = ZoneInfo(name)
        for changed in dates:
            first = changed - timedelta(days=1)
            noonish = datetime(first.year, first.month, first.day, 15, tzinfo=tz).astimezone(UTC)
            anchor = window_at(noonish, "hourly", tz).start
            end = run_end(anchor, DEFAULTS["day"], tz)
            wall = anchor.astimezone(tz).replace(tzinfo=None) + timedelta(days=1)
            if end.astimezone(tz).replace(tzinfo=None) != wall:
                failures.append(f"{name} {anchor.astimezone(tz)} -> {end.astimezone(tz)}")
    assert not failures, f"{len(failures)} runs off: {failures[:10]}"
