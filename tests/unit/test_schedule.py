"""The donor's --schedule: parsing, window math across midnight, the week's end and DST, on an injected clock
(no waiting)."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from rma_ray.schedule import ScheduleError, parse

BERLIN = ZoneInfo("Europe/Berlin")
EVENINGS = "Mon-Fri 19:00-07:00; Sat-Sun"


def at(text: str, tz: ZoneInfo = BERLIN) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=tz)


@pytest.mark.parametrize(
    ("when", "inside"),
    [
        ("2026-12-07 18:59", False),  # Monday, before the evening window
        ("2026-12-07 19:00", True),
        ("2026-12-08 06:59", True),  # Tuesday morning: Monday's window runs past midnight
        ("2026-12-08 07:00", False),
        ("2026-12-11 23:30", True),  # Friday night
        ("2026-12-12 12:00", True),  # Saturday, whole day
        ("2026-12-13 23:59", True),  # Sunday, whole day
        ("2026-12-14 03:00", False),  # Monday early: Sunday's whole day ended at midnight
    ],
)
def test_in_window(when: str, inside: bool) -> None:
    assert parse(EVENINGS, BERLIN).in_window(at(when)) is inside


def test_next_change_skips_adjacent_windows() -> None:
    s = parse(EVENINGS, BERLIN)
    # Friday evening to Monday 00:00 is one stretch: Friday's window, Saturday and Sunday touch
    assert s.next_change(at("2026-12-11 20:00")) == at("2026-12-14 00:00")
    assert s.next_change(at("2026-12-14 07:00")) == at("2026-12-14 19:00")
    assert s.next_change(at("2026-12-14 12:00").astimezone(UTC)) == at("2026-12-14 19:00")


def test_window_across_the_weeks_end() -> None:
    s = parse("Sun 22:00-02:00", BERLIN)
    assert s.in_window(at("2026-12-14 01:00"))  # Monday 01:00
    assert not s.in_window(at("2026-12-14 02:00"))
    assert s.next_change(at("2026-12-14 01:00")) == at("2026-12-14 02:00")


def test_dst_keeps_wall_clock_windows() -> None:
    s = parse("daily 01:00-03:30", BERLIN)
    # the night clocks go forward (2027-03-28, 02:00 -> 03:00): the window still ends at 03:30 local
    end = s.next_change(at("2027-03-28 01:30"))
    assert end == at("2027-03-28 03:30")
    assert end is not None and (end - at("2027-03-28 01:30").astimezone(UTC)).total_seconds() == 3600
    # and the night they go back (2027-10-31), 03:30 is 3 real hours after 01:30
    end = s.next_change(at("2027-10-31 01:30"))
    assert end is not None and (end - at("2027-10-31 01:30").astimezone(UTC)).total_seconds() == 3 * 3600


def test_whole_days_and_lists() -> None:
    s = parse("Mon,Wed; Fri-Sun 10:00-12:00", BERLIN)
    assert s.in_window(at("2026-12-09 23:00"))  # Wednesday
    assert not s.in_window(at("2026-12-10 11:00"))  # Thursday
    assert s.in_window(at("2026-12-13 11:00"))  # Sunday, through the Fri-Sun range
    assert parse("daily", BERLIN).next_change(at("2026-12-10 11:00")) is None  # always lent


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("Mnd-Fri 19:00-07:00", "cannot read the days 'mnd-fri'"),
        ("Mon-Fri 25:00-07:00", "cannot read the time '25:00'"),
        ("Mon-Fri 19:00", "cannot read the time range '19:00'"),
        ("Mon 08:00-09:00 10:00-11:00", "one time range per clause"),
        (" ; ", "an empty schedule"),
    ],
)
def test_bad_schedules_say_what_to_fix(text: str, says: str) -> None:
    with pytest.raises(ScheduleError, match=says.replace("(", r"\(")):
        parse(text)
