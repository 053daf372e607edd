"""When a donor lends its machine: `rma join --schedule "Mon-Fri 19:00-07:00; Sat-Sun"`, in the donor's local
time. Clauses are separated by `;`; each names days (`Mon`, `Mon-Fri`, `Fri-Mon`, `Mon,Wed`, `daily`) and,
optionally, a time range (`19:00-07:00`); a range that ends at or before its start runs past midnight into the
next day, and days without a range are whole days. A clause that is only a range means every day.

Windows are wall-clock times: they are compared and stepped in local time and only then turned into instants,
so a DST change moves the instant, never the wall-clock window. No library reads this syntax (cron and iCal
rules say something else), hence the small parser."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
DAY_MIN = 24 * 60
WEEK_MIN = 7 * DAY_MIN
_TIME = re.compile(r"^([01]?\d|2[0-4]):([0-5]\d)$")


class ScheduleError(ValueError):
    """A schedule the parser cannot read; the message says what to fix."""


@dataclass(frozen=True)
class Schedule:
    text: str
    # [start, end) in minutes from Monday 00:00 local time; end may pass the week's end (wraps to Monday)
    spans: tuple[tuple[int, int], ...]
    tz: tzinfo | None = None  # None: the machine's local time zone

    def _local(self, now: datetime) -> datetime:
        return now.astimezone(self.tz) if self.tz else now.astimezone()

    def _instant(self, wall: datetime) -> datetime:
        """A naive local wall-clock time as an aware instant (a time DST skips lands just after the gap)."""
        # in UTC: Python compares and subtracts two datetimes of one tzinfo by their wall clocks
        return (wall.replace(tzinfo=self.tz) if self.tz else wall.astimezone()).astimezone(UTC)

    def in_window(self, now: datetime) -> bool:
        local = self._local(now)
        m = local.weekday() * DAY_MIN + local.hour * 60 + local.minute
        return any(s <= m < e or s <= m + WEEK_MIN < e for s, e in self.spans)

    def next_change(self, now: datetime) -> datetime | None:
        """The next instant at which in_window flips (a window starts or ends); None when it never does."""
        inside, now = self.in_window(now), now.astimezone(UTC)
        local = self._local(now).replace(tzinfo=None)
        monday = datetime(local.year, local.month, local.day) - timedelta(days=local.weekday())
        edges = sorted({b % WEEK_MIN for s, e in self.spans for b in (s, e)})
        candidates = sorted(
            self._instant(monday + timedelta(weeks=w, minutes=b)) for w in (0, 1, 2) for b in edges
        )
        for at in candidates:
            if at > now and self.in_window(at) != inside:
                return at
        return None


def _days(text: str, clause: str) -> list[int]:
    if text in ("daily", "every day", "*"):
        return list(range(7))
    out: list[int] = []
    for part in text.split(","):
        ends = [p.strip()[:3] for p in part.split("-")]
        bad = [p for p in ends if p not in DAYS] or ([] if len(ends) <= 2 else ends)
        if bad:
            raise ScheduleError(
                f"cannot read the days {part.strip()!r} in {clause!r}; use Mon, Tue, Wed, Thu, Fri, Sat, "
                "Sun, a range such as Mon-Fri, a list such as Mon,Wed, or daily"
            )
        first, last = DAYS.index(ends[0]), DAYS.index(ends[-1])
        out += [(first + i) % 7 for i in range((last - first) % 7 + 1)]
    return out


def _minute(text: str, clause: str) -> int:
    m = _TIME.match(text.strip())
    if not m or (m.group(1) == "24" and m.group(2) != "00"):
        raise ScheduleError(
            f"cannot read the time {text.strip()!r} in {clause!r}; use 24-hour HH:MM, e.g. 19:00"
        )
    return int(m.group(1)) * 60 + int(m.group(2))


def parse(text: str, tz: tzinfo | None = None) -> Schedule:
    """Read a schedule such as `Mon-Fri 19:00-07:00; Sat-Sun`; ScheduleError names what to fix."""
    spans: list[tuple[int, int]] = []
    clauses = [c.strip() for c in text.split(";") if c.strip()]
    if not clauses:
        raise ScheduleError('an empty schedule; write e.g. "Mon-Fri 19:00-07:00; Sat-Sun"')
    for clause in clauses:
        words = clause.lower().split()
        times = [w for w in words if ":" in w]
        days_text = " ".join(w for w in words if ":" not in w)
        if len(times) > 1:
            raise ScheduleError(f"one time range per clause in {clause!r}; separate clauses with ';'")
        days = _days(days_text, clause) if days_text else list(range(7))
        if times:
            start_end = times[0].split("-")
            if len(start_end) != 2:
                raise ScheduleError(
                    f"cannot read the time range {times[0]!r} in {clause!r}; use e.g. 19:00-07:00"
                )
            start, end = (_minute(t, clause) for t in start_end)
            if end <= start:  # runs past midnight
                end += DAY_MIN
        else:
            start, end = 0, DAY_MIN
        spans += [(d * DAY_MIN + start, d * DAY_MIN + end) for d in days]
    return Schedule(text=text.strip(), spans=tuple(sorted(set(spans))), tz=tz)
