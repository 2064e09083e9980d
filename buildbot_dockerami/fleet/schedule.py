"""Values that follow the working week: a warm minimum (or a number of stopped instances)
given as periods, e.g. ``{'mon-fri 08:00-19:00 Europe/Berlin': 4, 'default': 0}``.

A period is ``DAYS HH:MM-HH:MM ZONE``:

- DAYS: ``mon``..``sun``, lists and ranges (``mon-fri``, ``mon,wed,fri``, ``fri-mon``
  wraps over the weekend, ``mon-wed,sat``), or ``*`` for every day;
- the time range is local time in ZONE, an IANA name (``UTC``, ``Europe/Berlin``); the
  end may be ``24:00``; an end at or before the start is an overnight period, ending the
  next day (``fri 22:00-06:00`` runs from Friday 22:00 to Saturday 06:00);
- ``default`` is the value outside every period (0 when not given).

Periods must not overlap. A local time that a daylight-saving change skips is taken an
hour later (02:30 on the last Sunday of March in Berlin is 03:30), one that it repeats
is taken the first time; a period at 08:00 local is at 08:00 local on both sides of the
change, so at another UTC hour.

Pure: every question takes the instant as epoch seconds (the fleet's reactor clock), so
tests run it on a fake clock; nothing here reads the wall clock but ``parse`` when it is
given no instant to check overlaps from.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
DEFAULT_KEY = "default"
#: The example every message about a period's form shows.
EXAMPLE = "'mon-fri 08:00-19:00 Europe/Berlin'"
#: How far ahead overlaps are looked for: a year and a week covers every weekday on
#: both sides of every daylight-saving change of every zone.
OVERLAP_HORIZON_DAYS = 366 + 7
_TIME = re.compile(r"^(\d{1,2}):(\d{2})$")


class ScheduleError(ValueError):
    """A schedule that cannot be used; the message says what to write instead."""


@dataclass(frozen=True)
class Period:
    #: As the operator wrote it (the key of the dict).
    text: str
    #: Weekdays it starts on (0 = Monday).
    days: frozenset[int]
    #: Minutes after local midnight; ``end <= start``: it ends the next day.
    start: int
    end: int
    zone: ZoneInfo
    value: int

    def occurrence(self, day: date) -> Occurrence:
        """The occurrence that starts on local ``day`` (whether or not it is one of
        ``days``)."""
        end_day = day if self.end > self.start else day + timedelta(days=1)
        return Occurrence(self, _epoch(day, self.start, self.zone),
                          _epoch(end_day, self.end, self.zone))


@dataclass(frozen=True)
class Occurrence:
    """One period on one day, in epoch seconds: [start, end)."""

    period: Period
    start: float
    end: float

    @property
    def value(self) -> int:
        return self.period.value


def _epoch(day: date, minutes: int, zone: ZoneInfo) -> float:
    """Local ``day`` plus ``minutes`` (24:00 is the next midnight) in epoch seconds;
    fold=0: a skipped local time is an hour later, a repeated one the first."""
    day += timedelta(days=minutes // (24 * 60))
    minutes %= 24 * 60
    return datetime(day.year, day.month, day.day, minutes // 60, minutes % 60,
                    tzinfo=zone).timestamp()


@dataclass(frozen=True)
class Schedule:
    periods: tuple[Period, ...]
    default: int

    @property
    def constant(self) -> bool:
        """One value at all times (a plain number was given)."""
        return not self.periods

    def occurrences(self, since: float, until: float) -> list[Occurrence]:
        """Every occurrence that ends after ``since`` and starts before ``until``,
        by start."""
        found = []
        for period in self.periods:
            first = datetime.fromtimestamp(since, period.zone).date() - timedelta(days=2)
            last = datetime.fromtimestamp(until, period.zone).date() + timedelta(days=1)
            day = first
            while day <= last:
                if day.weekday() in period.days:
                    o = period.occurrence(day)
                    if o.end > since and o.start < until:
                        found.append(o)
                day += timedelta(days=1)
        return sorted(found, key=lambda o: o.start)

    def current(self, now: float) -> Occurrence | None:
        """The occurrence ``now`` is in, or None (the default applies)."""
        return next((o for o in self.occurrences(now, now + 1) if o.start <= now), None)

    def value(self, now: float) -> int:
        current = self.current(now)
        return self.default if current is None else current.value

    def next(self, now: float) -> Occurrence | None:
        """The first occurrence that starts after ``now`` (None: no periods)."""
        later = [o for o in self.occurrences(now, now + 8 * 86400) if o.start > now]
        return later[0] if later else None

    def target(self, now: float, lead: float) -> int:
        """The value to keep at ``now`` when a value must be in place ``lead`` seconds
        before its period starts: the current value, or a higher one starting soon. A
        value is never dropped early: the period's end is its end."""
        soon = [o.value for o in self.occurrences(now, now + lead + 1)
                if now < o.start <= now + lead]
        return max([self.value(now), *soon])

    def last_end(self, now: float, within: float) -> float | None:
        """When the latest occurrence that ended at or before ``now`` ended, if that
        was at most ``within`` seconds ago."""
        ended = [o.end for o in self.occurrences(now - within, now + 1)
                 if now - within <= o.end <= now]
        return max(ended) if ended else None


def _parse_days(text: str, period: str) -> frozenset[int]:
    if text == "*":
        return frozenset(range(7))
    days: set[int] = set()
    for item in text.split(","):
        ends = item.split("-")
        if len(ends) > 2 or not item:
            raise ScheduleError(f"period {period!r}: {item!r} is not a day or a range of "
                                f"days ({', '.join(DAY_NAMES)}, e.g. 'mon-fri' or 'sat,sun')")
        numbers = []
        for name in ends:
            if name not in DAY_NAMES:
                raise ScheduleError(f"period {period!r}: {name!r} is not a day (one of "
                                    f"{', '.join(DAY_NAMES)}, or '*' for every day)")
            numbers.append(DAY_NAMES.index(name))
        first, last = numbers[0], numbers[-1]
        days.update((first + i) % 7 for i in range((last - first) % 7 + 1))
    return frozenset(days)


def _parse_time(text: str, period: str, *, end: bool) -> int:
    match = _TIME.match(text)
    if match:
        hours, minutes = int(match.group(1)), int(match.group(2))
        if minutes < 60 and (hours < 24 or (end and hours == 24 and minutes == 0)):
            return hours * 60 + minutes
    allowed = "00:00-24:00" if end else "00:00-23:59"
    raise ScheduleError(f"period {period!r}: {text!r} is not a time HH:MM ({allowed})")


def _parse_zone(text: str, period: str) -> ZoneInfo:
    try:
        return ZoneInfo(text)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ScheduleError(
            f"period {period!r}: {text!r} is not a time zone this host knows (an IANA "
            "name such as 'UTC' or 'Europe/Berlin'; the zone database is the system's "
            "or the tzdata package)") from None


def parse_period(text: Any, value: Any, maximum: int | None = None) -> Period:
    if not isinstance(text, str):
        raise ScheduleError(f"period {text!r} must be a string like {EXAMPLE}")
    fields = text.split()
    if len(fields) != 3:
        raise ScheduleError(f"period {text!r}: expected DAYS HH:MM-HH:MM ZONE, e.g. {EXAMPLE}")
    days, hours, zone = fields
    if hours.count("-") != 1:
        raise ScheduleError(f"period {text!r}: {hours!r} is not a time range HH:MM-HH:MM")
    start_text, end_text = hours.split("-")
    start = _parse_time(start_text, text, end=False)
    end = _parse_time(end_text, text, end=True)
    if end == start:
        raise ScheduleError(f"period {text!r}: starts and ends at {start_text}; give a "
                            "range that is not empty (an end before the start runs overnight)")
    check_value(value, f"period {text!r}", maximum)
    return Period(text, _parse_days(days.lower(), text), start, end, _parse_zone(zone, text),
                  value)


def check_value(value: Any, what: str, maximum: int | None = None) -> None:
    if (isinstance(value, bool) or not isinstance(value, int) or value < 0
            or (maximum is not None and value > maximum)):
        bound = f"0-{maximum}" if maximum is not None else ">= 0"
        raise ScheduleError(f"{what}: {value!r} must be a whole number {bound}")


def parse(spec: Any, *, checked_from: float | None = None,
          maximum: int | None = None) -> Schedule:
    """A whole number (the same at all times) or a dict of periods and ``default``;
    raises ScheduleError. Overlaps are looked for over the year from ``checked_from``
    (default: now)."""
    if not isinstance(spec, Mapping):
        if isinstance(spec, int) and not isinstance(spec, bool):
            check_value(spec, "value", maximum)
            return Schedule((), spec)
        raise ScheduleError(f"{spec!r} must be a whole number or a dict of periods "
                            f"like {{{EXAMPLE}: 4, 'default': 0}}")
    default = spec.get(DEFAULT_KEY, 0)
    check_value(default, repr(DEFAULT_KEY), maximum)
    periods = tuple(parse_period(text, value, maximum)
                    for text, value in spec.items() if text != DEFAULT_KEY)
    schedule = Schedule(periods, default)
    check_overlaps(schedule, time.time() if checked_from is None else checked_from)
    return schedule


def check_overlaps(schedule: Schedule, since: float) -> None:
    """Periods that overlap on any day of the coming year, the first pair found named
    with a moment they share."""
    horizon = since + OVERLAP_HORIZON_DAYS * 86400
    latest: Occurrence | None = None
    for o in schedule.occurrences(since, horizon):
        if latest is not None and o.start < latest.end:
            a, b = latest.period, o.period
            shared = datetime.fromtimestamp(o.start, a.zone)
            raise ScheduleError(
                f"periods {a.text!r} and {b.text!r} overlap (both at "
                f"{shared:%a %Y-%m-%d %H:%M} {a.zone.key})")
        if latest is None or o.end > latest.end:
            latest = o


def describe(schedule: Schedule, now: float, lead: float) -> dict[str, Any]:
    """What the Fleet page shows: the period in force, the next one, the lead."""
    current, upcoming = schedule.current(now), schedule.next(now)
    return {
        "periods": {p.text: p.value for p in schedule.periods},
        "default": schedule.default,
        "current": {
            "period": DEFAULT_KEY if current is None else current.period.text,
            "value": schedule.value(now),
            "since": None if current is None else current.start,
            "until": (current.end if current is not None
                      else upcoming.start if upcoming is not None else None),
        },
        "next": None if upcoming is None else {
            "period": upcoming.period.text, "value": upcoming.value,
            "start": upcoming.start, "end": upcoming.end},
        "lead_seconds": round(lead, 1),
    }
