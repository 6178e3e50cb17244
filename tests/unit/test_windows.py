"""Session-window boundaries and cron schedules (supervisor.timing.windows)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import pairwise
from zoneinfo import ZoneInfo

import pytest

from supervisor.errors import ConfigError
from supervisor.timing.windows import (
    DUE_COUNT_CAP,
    CronSchedule,
    Window,
    WindowLength,
    next_boundary,
    parse_timezone,
    window_at,
    windows_between,
)

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
UTC_ZONE = ZoneInfo("UTC")
H = timedelta(hours=1)


def utc(y: int, m: int, d: int, h: int = 0, mi: int = 0, s: int = 0, us: int = 0) -> datetime:
    return datetime(y, m, d, h, mi, s, us, tzinfo=UTC)


def local_day(tz: ZoneInfo, y: int, m: int, d: int) -> tuple[datetime, datetime]:
    """[start, end) of a local calendar day in UTC, computed with zoneinfo alone."""
    start = datetime(y, m, d, tzinfo=tz)
    end = datetime.combine(start.date() + timedelta(days=1), start.time(), tzinfo=tz)
    return start.astimezone(UTC), end.astimezone(UTC)


def assert_tiles(windows: list[Window], lo: datetime, hi: datetime, tz: ZoneInfo) -> None:
    """Windows are UTC, non-empty, contiguous, cover [lo, hi) exactly, and have sound keys."""
    assert windows, "no windows"
    assert windows[0].start <= lo < windows[0].end
    assert windows[-1].start < hi <= windows[-1].end
    for w in windows:
        assert w.start.tzinfo is UTC and w.end.tzinfo is UTC
        assert w.start < w.end
        key_time = datetime.fromisoformat(w.key)
        assert key_time == w.start  # the key names the start instant...
        assert key_time.utcoffset() == w.start.astimezone(tz).utcoffset()  # ...in local time
    for a, b in pairwise(windows):
        assert a.end == b.start, f"gap or overlap between {a.key} and {b.key}"
    keys = [w.key for w in windows]
    assert len(set(keys)) == len(keys)


def day_windows(tz: ZoneInfo, y: int, m: int, d: int, length: WindowLength) -> list[Window]:
    lo, hi = local_day(tz, y, m, d)
    windows = windows_between(lo, hi, length, tz)
    assert_tiles(windows, lo, hi, tz)
    return windows


# --- UTC ----------------------------------------------------------------------------------------


def test_utc_hourly_alignment() -> None:
    w = window_at(utc(2026, 5, 17, 13, 42, 7), "hourly", UTC_ZONE)
    assert w == Window(utc(2026, 5, 17, 13), utc(2026, 5, 17, 14), "2026-05-17T13:00:00+00:00")


def test_utc_daily_alignment() -> None:
    w = window_at(utc(2026, 5, 17, 23, 59, 59, 999999), "daily", UTC_ZONE)
    assert w == Window(utc(2026, 5, 17), utc(2026, 5, 18), "2026-05-17T00:00:00+00:00")


def test_utc_hourly_tiles_a_day() -> None:
    windows = day_windows(UTC_ZONE, 2026, 5, 17, "hourly")
    assert len(windows) == 24
    assert all(w.end - w.start == H for w in windows)
    assert [w.start.hour for w in windows] == list(range(24))


def test_input_in_another_zone_is_the_same_instant() -> None:
    instant = datetime(2026, 5, 17, 15, 30, tzinfo=BERLIN)  # 13:30 UTC
    assert window_at(instant, "hourly", UTC_ZONE).start == utc(2026, 5, 17, 13)
    assert window_at(instant, "daily", NEW_YORK).key == "2026-05-17T00:00:00-04:00"


# --- boundaries ---------------------------------------------------------------------------------


@pytest.mark.parametrize("length", ["hourly", "daily"])
def test_exact_boundary_belongs_to_the_new_window(length: WindowLength) -> None:
    boundary = utc(2026, 5, 18)  # a boundary in UTC for both lengths
    w = window_at(boundary, length, UTC_ZONE)
    assert w.start == boundary
    before = window_at(boundary - timedelta(microseconds=1), length, UTC_ZONE)
    assert before.end == boundary
    assert before.key != w.key


def test_next_boundary_is_strictly_after() -> None:
    assert next_boundary(utc(2026, 5, 17, 13), "hourly", UTC_ZONE) == utc(2026, 5, 17, 14)
    assert next_boundary(utc(2026, 5, 17, 13, 59, 59), "hourly", UTC_ZONE) == utc(2026, 5, 17, 14)
    # local midnight in Berlin (summer, +02:00) is 22:00 UTC
    assert next_boundary(utc(2026, 5, 17, 22), "daily", BERLIN) == utc(2026, 5, 18, 22)
    assert next_boundary(utc(2026, 5, 17, 21, 59), "daily", BERLIN) == utc(2026, 5, 17, 22)


def test_naive_datetimes_are_rejected() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        window_at(datetime(2026, 5, 17, 12), "hourly", UTC_ZONE)
    with pytest.raises(ValueError, match="timezone-aware"):
        CronSchedule("0 3 * * *", UTC_ZONE).next_after(datetime(2026, 5, 17))


def test_windows_between_empty_and_partial_ranges() -> None:
    assert windows_between(utc(2026, 5, 17, 12), utc(2026, 5, 17, 12), "hourly", UTC_ZONE) == []
    assert windows_between(utc(2026, 5, 17, 13), utc(2026, 5, 17, 12), "hourly", UTC_ZONE) == []
    got = windows_between(utc(2026, 5, 17, 12, 30), utc(2026, 5, 17, 14, 0, 1), "hourly", UTC_ZONE)
    assert [w.start for w in got] == [utc(2026, 5, 17, h) for h in (12, 13, 14)]


def test_windows_between_a_30_day_month_daily() -> None:
    lo = datetime(2026, 4, 1, tzinfo=BERLIN)
    hi = datetime(2026, 5, 1, tzinfo=BERLIN)
    windows = windows_between(lo, hi, "daily", BERLIN)
    assert_tiles(windows, lo.astimezone(UTC), hi.astimezone(UTC), BERLIN)
    assert len(windows) == 30
    assert windows[0].key == "2026-04-01T00:00:00+02:00"
    assert windows[-1].key == "2026-04-30T00:00:00+02:00"
    assert windows[-1].end == hi


def test_windows_between_a_month_with_a_dst_change_daily() -> None:
    lo = datetime(2026, 3, 1, tzinfo=BERLIN)
    hi = datetime(2026, 4, 1, tzinfo=BERLIN)
    windows = windows_between(lo, hi, "daily", BERLIN)
    assert_tiles(windows, lo.astimezone(UTC), hi.astimezone(UTC), BERLIN)
    assert len(windows) == 31
    elapsed = hi.astimezone(UTC) - lo.astimezone(UTC)
    assert elapsed == 31 * 24 * H - H
    assert sum((w.end - w.start for w in windows), timedelta()) == elapsed


# --- DST: Europe/Berlin -------------------------------------------------------------------------


def test_berlin_spring_forward_has_23_hourly_windows() -> None:
    windows = day_windows(BERLIN, 2026, 3, 29, "hourly")
    lo, hi = local_day(BERLIN, 2026, 3, 29)
    assert hi - lo == 23 * H
    assert len(windows) == 23
    assert sum((w.end - w.start for w in windows), timedelta()) == hi - lo
    assert all(w.end - w.start == H for w in windows)
    keys = [w.key for w in windows]
    assert keys[:3] == [
        "2026-03-29T00:00:00+01:00",
        "2026-03-29T01:00:00+01:00",
        "2026-03-29T03:00:00+02:00",  # 02:00 does not exist
    ]
    assert not any(k.startswith("2026-03-29T02:") for k in keys)


def test_berlin_fall_back_has_25_hourly_windows_with_two_repeated_hours() -> None:
    windows = day_windows(BERLIN, 2026, 10, 25, "hourly")
    lo, hi = local_day(BERLIN, 2026, 10, 25)
    assert hi - lo == 25 * H
    assert len(windows) == 25
    assert sum((w.end - w.start for w in windows), timedelta()) == hi - lo
    assert all(w.end - w.start == H for w in windows)
    repeated = [w for w in windows if w.key.startswith("2026-10-25T02:")]
    assert [w.key for w in repeated] == ["2026-10-25T02:00:00+02:00", "2026-10-25T02:00:00+01:00"]
    assert [w.start for w in repeated] == [utc(2026, 10, 25, 0), utc(2026, 10, 25, 1)]


def test_berlin_repeated_hour_instants_land_in_different_windows() -> None:
    first = window_at(utc(2026, 10, 25, 0, 30), "hourly", BERLIN)  # 02:30+02:00
    second = window_at(utc(2026, 10, 25, 1, 30), "hourly", BERLIN)  # 02:30+01:00
    assert first.key == "2026-10-25T02:00:00+02:00"
    assert second.key == "2026-10-25T02:00:00+01:00"
    assert first.end == second.start == utc(2026, 10, 25, 1)


@pytest.mark.parametrize(
    ("month", "day", "hours", "key"),
    [(3, 29, 23, "2026-03-29T00:00:00+01:00"), (10, 25, 25, "2026-10-25T00:00:00+02:00")],
)
def test_berlin_daily_windows_on_dst_days(month: int, day: int, hours: int, key: str) -> None:
    windows = day_windows(BERLIN, 2026, month, day, "daily")
    assert len(windows) == 1
    assert windows[0].key == key
    assert windows[0].end - windows[0].start == hours * H
    assert (windows[0].start, windows[0].end) == local_day(BERLIN, 2026, month, day)


# --- DST: America/New_York ----------------------------------------------------------------------


def test_new_york_spring_forward_and_fall_back() -> None:
    spring = day_windows(NEW_YORK, 2026, 3, 8, "hourly")
    assert len(spring) == 23
    assert [w.key for w in spring[1:3]] == [
        "2026-03-08T01:00:00-05:00",
        "2026-03-08T03:00:00-04:00",
    ]
    fall = day_windows(NEW_YORK, 2026, 11, 1, "hourly")
    assert len(fall) == 25
    assert [w.key for w in fall[1:3]] == ["2026-11-01T01:00:00-04:00", "2026-11-01T01:00:00-05:00"]
    assert all(w.end - w.start == H for w in spring + fall)
    for (month, day), hours in (((3, 8), 23), ((11, 1), 25)):
        (daily,) = day_windows(NEW_YORK, 2026, month, day, "daily")
        assert daily.end - daily.start == hours * H


def test_new_york_week_of_hourly_windows_tiles() -> None:
    lo = datetime(2026, 10, 29, tzinfo=NEW_YORK)
    hi = datetime(2026, 11, 5, tzinfo=NEW_YORK)
    windows = windows_between(lo, hi, "hourly", NEW_YORK)
    assert_tiles(windows, lo.astimezone(UTC), hi.astimezone(UTC), NEW_YORK)
    assert len(windows) == 7 * 24 + 1


# --- zones where DST touches midnight or shifts by half an hour ---------------------------------


def test_santiago_skipped_midnight_day_starts_at_its_first_hour() -> None:
    # Chile springs forward at 24:00 on 2026-09-05: 2026-09-06 00:00 does not exist.
    santiago = ZoneInfo("America/Santiago")
    lo = datetime(2026, 9, 4, tzinfo=santiago)
    hi = datetime(2026, 9, 8, tzinfo=santiago)
    windows = windows_between(lo, hi, "daily", santiago)
    assert_tiles(windows, lo.astimezone(UTC), hi.astimezone(UTC), santiago)
    assert [w.key for w in windows] == [
        "2026-09-04T00:00:00-04:00",
        "2026-09-05T00:00:00-04:00",
        "2026-09-06T01:00:00-03:00",
        "2026-09-07T00:00:00-03:00",
    ]
    assert [w.end - w.start for w in windows] == [24 * H, 24 * H, 23 * H, 24 * H]


def test_havana_repeated_midnight_is_one_day() -> None:
    # Cuba falls back at 01:00 to 00:00 on 2026-11-01: midnight happens twice.
    havana = ZoneInfo("America/Havana")
    (w,) = day_windows(havana, 2026, 11, 1, "daily")
    assert w.key == "2026-11-01T00:00:00-04:00"
    assert w.end - w.start == 25 * H
    hourly = day_windows(havana, 2026, 11, 1, "hourly")
    assert [x.key for x in hourly[:2]] == ["2026-11-01T00:00:00-04:00", "2026-11-01T00:00:00-05:00"]


def test_sao_paulo_fall_back_across_midnight() -> None:
    # At 2018-02-18 00:00-02:00 clocks went back to 2018-02-17 23:00-03:00: the 17th has 25 hours
    # and the 18th begins at 00:00-03:00.
    sao_paulo = ZoneInfo("America/Sao_Paulo")
    lo = datetime(2018, 2, 17, tzinfo=sao_paulo)
    hi = datetime(2018, 2, 20, tzinfo=sao_paulo)
    windows = windows_between(lo, hi, "daily", sao_paulo)
    assert_tiles(windows, lo.astimezone(UTC), hi.astimezone(UTC), sao_paulo)
    assert [w.key for w in windows] == [
        "2018-02-17T00:00:00-02:00",
        "2018-02-18T00:00:00-03:00",
        "2018-02-19T00:00:00-03:00",
    ]
    assert [w.end - w.start for w in windows] == [25 * H, 24 * H, 24 * H]
    in_repeated_hour = utc(2018, 2, 18, 2, 30)  # the second 23:30 on the 17th
    assert window_at(in_repeated_hour, "daily", sao_paulo).key == "2018-02-17T00:00:00-02:00"


def test_apia_skipped_date_has_no_window() -> None:
    apia = ZoneInfo("Pacific/Apia")  # 2011-12-29 was followed by 2011-12-31
    lo = datetime(2011, 12, 29, tzinfo=apia)
    hi = datetime(2012, 1, 1, tzinfo=apia)
    windows = windows_between(lo, hi, "daily", apia)
    assert_tiles(windows, lo.astimezone(UTC), hi.astimezone(UTC), apia)
    assert [w.key for w in windows] == ["2011-12-29T00:00:00-10:00", "2011-12-31T00:00:00+14:00"]


def test_lord_howe_half_hour_shift_tiles() -> None:
    lord_howe = ZoneInfo("Australia/Lord_Howe")
    # The zone shifts by 30 minutes at 02:00, so the hour around the shift lasts 1.5 h both ways.
    for (month, day), total in (((4, 5), 24 * H + H / 2), ((10, 4), 23 * H + H / 2)):
        lo, hi = local_day(lord_howe, 2026, month, day)
        assert hi - lo == total
        windows = day_windows(lord_howe, 2026, month, day, "hourly")
        assert sum((w.end - w.start for w in windows), timedelta()) == total
        assert sorted(w.end - w.start for w in windows if w.end - w.start != H) == [H * 1.5]


def test_keys_are_unique_across_a_year_hourly() -> None:
    lo, hi = utc(2026, 1, 1), utc(2027, 1, 1)
    windows = windows_between(lo, hi, "hourly", BERLIN)
    assert_tiles(windows, lo, hi, BERLIN)
    assert len(windows) == 365 * 24


# --- cron schedules -----------------------------------------------------------------------------


def test_cron_next_after_in_a_zone() -> None:
    s = CronSchedule("0 3 * * *", BERLIN)
    assert s.next_after(utc(2026, 5, 17, 0)) == utc(2026, 5, 17, 1)  # 03:00+02:00
    assert s.next_after(utc(2026, 5, 17, 1)) == utc(2026, 5, 18, 1)  # strictly after
    assert s.next_after(utc(2026, 1, 10, 12)) == utc(2026, 1, 11, 2)  # 03:00+01:00
    after = s.next_after(utc(2026, 5, 17, 0))
    assert after.tzinfo is UTC


def test_cron_next_after_across_spring_forward() -> None:
    s = CronSchedule("0 3 * * *", BERLIN)
    assert s.next_after(utc(2026, 3, 28, 12)) == utc(2026, 3, 29, 1)  # 03:00+02:00
    ny = CronSchedule("0 3 * * *", NEW_YORK)
    assert ny.next_after(utc(2026, 11, 1, 0)) == utc(2026, 11, 1, 8)  # 03:00-05:00


def test_cron_weekday_numbers_follow_crontab() -> None:
    # 2026-06-01 is a Monday. In crontab 1 = Monday and 0 = 7 = Sunday.
    monday = CronSchedule("0 3 * * 1", UTC_ZONE).next_after(utc(2026, 6, 1))
    assert monday == utc(2026, 6, 1, 3)
    for expr in ("0 3 * * 0", "0 3 * * 7", "0 3 * * sun", "0 3 * * SUN"):
        assert CronSchedule(expr, UTC_ZONE).next_after(utc(2026, 6, 1)) == utc(2026, 6, 7, 3)
    weekdays = CronSchedule("0 3 * * 1-5", UTC_ZONE)
    assert weekdays.next_after(utc(2026, 6, 5, 4)) == utc(2026, 6, 8, 3)  # Fri -> Mon
    every_other = CronSchedule("0 3 * * */2", UTC_ZONE)  # Sun, Tue, Thu, Sat
    assert every_other.next_after(utc(2026, 6, 1)) == utc(2026, 6, 2, 3)


def test_cron_day_of_month_or_day_of_week() -> None:
    # Both restricted: fires on the 1st of the month OR on Mondays (standard cron).
    s = CronSchedule("0 0 1 * 1", UTC_ZONE)
    assert s.next_after(utc(2026, 6, 2)) == utc(2026, 6, 8)  # Monday
    assert s.next_after(utc(2026, 6, 29)) == utc(2026, 7, 1)  # the 1st, a Wednesday


def test_due_coalesces_five_missed_days() -> None:
    s = CronSchedule("0 3 * * *", BERLIN)
    last_run = utc(2026, 5, 10, 1)  # 03:00 local on the 10th
    now = utc(2026, 5, 15, 12)  # fires on the 11th..15th were missed
    count, latest = s.due(last_run, now)
    assert count == 5
    assert latest == utc(2026, 5, 15, 1)


def test_due_window_is_half_open() -> None:
    s = CronSchedule("0 3 * * *", UTC_ZONE)
    fire = utc(2026, 5, 15, 3)
    assert s.due(fire, fire) == (0, None)  # last_run excluded
    assert s.due(fire - timedelta(seconds=1), fire) == (1, fire)  # now included
    assert s.due(fire, fire + timedelta(hours=23)) == (0, None)
    assert s.due(fire + H, fire) == (0, None)  # last_run after now (clock skew)


def test_due_never_ran_owes_one_run() -> None:
    s = CronSchedule("0 3 * * *", UTC_ZONE)
    assert s.due(None, utc(2026, 5, 15, 12)) == (1, utc(2026, 5, 15, 3))
    assert s.due(None, utc(2026, 5, 15, 3)) == (1, utc(2026, 5, 15, 3))


def test_due_count_is_capped_after_long_downtime() -> None:
    s = CronSchedule("* * * * *", UTC_ZONE)
    now = utc(2027, 5, 15, 12, 34, 56)
    count, latest = s.due(utc(2026, 5, 15), now)
    assert count == DUE_COUNT_CAP
    assert latest == utc(2027, 5, 15, 12, 34)


def test_due_counts_both_fires_of_a_repeated_hour() -> None:
    # CronTrigger fires at both occurrences of 02:30 on the fall-back day; due() coalesces them.
    s = CronSchedule("30 2 * * *", BERLIN)
    count, latest = s.due(utc(2026, 10, 24, 12), utc(2026, 10, 25, 12))
    assert count == 2
    assert latest == utc(2026, 10, 25, 1, 30)  # 02:30+01:00


@pytest.mark.parametrize(
    "expr",
    [
        "",
        "0 3 * *",
        "0 3 * * * *",
        "61 * * * *",
        "0 25 * * *",
        "a b c d e",
        "0 3 * * 8",
        "0 3 * * 5-1",
        "*/0 * * * *",
        "0 3 * * 1/0",
        "0 0 30 2 *",
    ],
)
def test_invalid_crontab_raises_config_error(expr: str) -> None:
    with pytest.raises(ConfigError) as info:
        CronSchedule(expr, UTC_ZONE)
    assert repr(expr) in str(info.value)
    assert info.value.exit_code == 2


# --- time zones ---------------------------------------------------------------------------------


def test_parse_timezone() -> None:
    assert parse_timezone("Europe/Berlin") == BERLIN
    assert parse_timezone("UTC").key == "UTC"


@pytest.mark.parametrize("name", ["Mars/Olympus_Mons", "Europe", "", "../etc/passwd", "utc "])
def test_unknown_timezone_raises_config_error(name: str) -> None:
    with pytest.raises(ConfigError, match="unknown time zone") as info:
        parse_timezone(name)
    assert str(info.value) == f"unknown time zone {name!r}"
