"""What an instance costs and each build's share of it. Pure: every method is given the
time (the fleet's clock) and the prices; nothing here calls EC2 or keeps a timer.

The rules (docs/web-ui-and-metrics.md#costs):

- **An instance's price** is its market's: a spot instance's is the spot price EC2
  last gave for its type and availability zone (spot_prices.py), an on-demand one's the
  operator's price for its type, else the default table's (prices.py). Unknown (a type
  in neither, a spot price not yet known): no cost is counted for it.
- **A build's share**: while k builds run on one instance at once (slots of
  isolation='container', or several builds of a worker with max_builds > 1) each pays
  1/k of the instance's time; a build's cost is the instance's price times the integral
  of 1/k over the time it ran on the instance, from the moment it had the instance's
  worker connected until it finished. Time with no build on the instance (its boot,
  waiting for a build, the idle timeout) is no build's: it is in the fleet's spending
  (``Spend``), not in any build's cost, so the builds' costs add up to at most it.
- **The fleet's spending** counts every instance from its launch (or its start from
  stopped) until this master sees it gone, at least EC2's one-minute minimum per start,
  at the price known then; by pool and market, and by UTC day.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field

from buildbot_dockerami.fleet import prices

#: EC2 bills a Linux instance per second, at least this many seconds each time it
#: starts running.
MINIMUM_SECONDS = 60.0
#: UTC days of spending kept in memory (today's is shown; a few for a restart's sake).
DAYS_KEPT = 8


@dataclass(frozen=True)
class Price:
    """USD per hour of one instance, and where it comes from ("spot", "configured", or
    the default table's prices.SOURCE)."""

    usd_per_hour: float
    source: str

    def of(self, seconds: float) -> float:
        return self.usd_per_hour * seconds / 3600


def instance_price(market: str, instance_type: str, spot: float | None,
                   configured: Mapping[str, float]) -> Price | None:
    """The price of an instance of ``instance_type`` bought on ``market`` ("spot" or
    "on-demand"), given the spot price known for its type and zone (or None)."""
    if market == "spot":
        return None if spot is None else Price(spot, "spot")
    found = prices.on_demand(instance_type, configured)
    return None if found is None else Price(*found)


@dataclass(frozen=True)
class Share:
    """A finished build's part of its instance: ``seconds`` of the instance's time it
    paid for (the integral of 1/k), over ``ran`` seconds on it."""

    instance_id: str
    seconds: float
    ran: float


@dataclass
class _OnInstance:
    """The builds running on one instance, and what each has paid for so far."""

    since: float
    paid: dict[Hashable, float] = field(default_factory=dict)
    started: dict[Hashable, float] = field(default_factory=dict)


class ShareLedger:
    """Which builds run on which instance, and each one's share of its time."""

    def __init__(self) -> None:
        self._instances: dict[str, _OnInstance] = {}
        self._on: dict[Hashable, str] = {}

    def _settle(self, instance_id: str, now: float) -> _OnInstance:
        """Share the time since the last start or finish among the builds running."""
        entry = self._instances.setdefault(instance_id, _OnInstance(now))
        if entry.paid and now > entry.since:
            each = (now - entry.since) / len(entry.paid)
            for build in entry.paid:
                entry.paid[build] += each
        entry.since = max(entry.since, now)
        return entry

    def start(self, build: Hashable, instance_id: str, now: float) -> bool:
        """``build`` runs on the instance from ``now``; False if it already did."""
        if build in self._on:
            return False
        entry = self._settle(instance_id, now)
        entry.paid[build] = 0.0
        entry.started[build] = now
        self._on[build] = instance_id
        return True

    def finish(self, build: Hashable, now: float) -> Share | None:
        """``build`` ended at ``now``: its share, or None if it never ran on an instance."""
        instance_id = self._on.pop(build, None)
        if instance_id is None:
            return None
        entry = self._settle(instance_id, now)
        seconds = entry.paid.pop(build)
        started = entry.started.pop(build)
        if not entry.paid:
            del self._instances[instance_id]
        return Share(instance_id, seconds, max(0.0, now - started))

    def running(self, instance_id: str) -> int:
        entry = self._instances.get(instance_id)
        return len(entry.paid) if entry is not None else 0


@dataclass(frozen=True)
class Running:
    """An instance this master holds, as the spending pass sees it."""

    instance_id: str
    #: Epoch seconds it was launched, or started again from stopped.
    since: float
    price: Price | None
    pool: str | None
    market: str


def utc_day(epoch: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(epoch))


def _next_midnight(epoch: float) -> float:
    return (epoch // 86400 + 1) * 86400


class Spend:
    """What this master's instances cost, accrued by passes over the instances it holds
    (``accrue``): ``count(labels, dollars)`` is told each amount, by pool and market, and
    ``daily`` keeps the totals of the last UTC days. Only its own memory: a restarted
    master starts again from zero (Prometheus counters do that too)."""

    def __init__(self, count: Callable[[dict[str, str], float], None]) -> None:
        self._count = count
        #: (instance id, since) -> (counted until, the instance as last seen).
        self._counted: dict[tuple[str, float], tuple[float, Running]] = {}
        self.daily: dict[str, float] = {}
        self.started: float | None = None

    def accrue(self, now: float, live: Iterable[Running]) -> None:
        """Count every live instance up to ``now``, and those no longer live up to now
        or their one-minute minimum. One whose price is unknown is not counted yet: it is
        counted from its start once its price is known."""
        if self.started is None:
            self.started = now
        seen = set()
        for instance in live:
            key = (instance.instance_id, instance.since)
            seen.add(key)
            until, _ = self._counted.get(key, (instance.since, instance))
            self._counted[key] = (until, instance)
            if instance.price is not None:
                self._add(instance, until, now)
                self._counted[key] = (max(until, now), instance)
        for key in [k for k in self._counted if k not in seen]:
            until, instance = self._counted.pop(key)
            if instance.price is not None:
                self._add(instance, until, max(now, instance.since + MINIMUM_SECONDS))

    def _add(self, instance: Running, start: float, end: float) -> None:
        assert instance.price is not None
        if end <= start:
            return
        labels = {"market": instance.market}
        if instance.pool:
            labels["pool"] = instance.pool
        self._count(labels, instance.price.of(end - start))
        while start < end:  # split at UTC midnights
            stop = min(end, _next_midnight(start))
            day = utc_day(start)
            self.daily[day] = self.daily.get(day, 0.0) + instance.price.of(stop - start)
            start = stop
        for day in sorted(self.daily)[:-DAYS_KEPT]:
            del self.daily[day]

    def today(self, now: float) -> float:
        return self.daily.get(utc_day(now), 0.0)
