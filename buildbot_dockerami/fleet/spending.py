"""What this master's instances cost: prices (spot from EC2, on-demand from the
operator's table or the default one), each build's share, the
``dockerami_cost_dollars_total`` counter and the day's total. The rules are cost.py's;
this is the fleet's part that applies them on its own schedule.

A pass (``tick``, every ``PASS_SECONDS`` while the fleet runs) accrues the instances
the master holds and asks EC2 for the spot prices that are due (spot_prices.py). Builds
starting and finishing (told by the glue) accrue too. Readers (the Fleet page,
``/metrics``) may accrue, which reads only the master's memory: nothing here is asked
of EC2 for a reader.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, task
from twisted.python import log

from buildbot_dockerami.fleet import cost, prices
from buildbot_dockerami.fleet.holdings import Holdings
from buildbot_dockerami.fleet.metrics import Metrics
from buildbot_dockerami.fleet.spot_prices import SpotPrices

#: Seconds between two spending passes: an ended instance is counted until the pass
#: that no longer sees it (or until a build event or a reader, if sooner).
PASS_SECONDS = 10.0
COUNTER = "dockerami_cost_dollars_total"
MARKETS = ("on-demand", "spot")


@dataclass(frozen=True)
class BuildCost:
    """A finished build's cost: ``usd`` = ``price`` x ``share.seconds``."""

    usd: float
    price: cost.Price
    share: cost.Share


class Spending:
    """The fleet's costs. ``configured`` gives the operator's prices (FleetSettings'
    ``prices``, or the www plugin's older setting), read at each use."""

    def __init__(self, reactor: Any, holdings: Holdings, metrics: Metrics,
                 configured: Callable[[], Mapping[str, float]],
                 pools: Callable[[], Iterator[str]] = lambda: iter(())) -> None:
        self.reactor = reactor
        self.holdings = holdings
        self.metrics = metrics
        self.configured = configured
        self.pools = pools
        self.spot = SpotPrices(reactor.seconds)
        self.ledger = cost.ShareLedger()
        self.spend = cost.Spend(
            lambda labels, dollars: metrics.inc(COUNTER, labels, by=dollars))
        #: Worker name -> its last finished build's cost (for the Fleet page).
        self.last_build: dict[str, dict[str, Any]] = {}
        #: Build -> the instance it runs on (a LaunchedInstance).
        self._running: dict[Hashable, Any] = {}
        self._loop: task.LoopingCall | None = None

    # -- the fleet's schedule ---------------------------------------------------------

    def start(self) -> None:
        if self._loop is None:
            self._loop = task.LoopingCall(self.tick)
            self._loop.clock = self.reactor
            self._loop.start(PASS_SECONDS, now=False).addErrback(
                log.err, "dockerami: spending pass")

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def tick(self) -> defer.Deferred:
        """A pass: accrue, and ask EC2 for the spot prices due (never waited for)."""
        self.accrue()
        wanted = [(i.client, i.instance_type, i.availability_zone)
                  for i, _ in self._held() if i.market == "spot"]
        d = self.spot.refresh(wanted)
        d.addCallback(lambda _: self.accrue())
        d.addErrback(log.err, "dockerami: spot prices")
        return defer.succeed(None)

    # -- prices -----------------------------------------------------------------------

    def price(self, instance: Any) -> cost.Price | None:
        """The instance's price as known now (a LaunchedInstance); never asks EC2."""
        quote = None
        if instance.market == "spot":
            quote = self.spot.known(instance.client, instance.instance_type,
                                    instance.availability_zone)
        return cost.instance_price(instance.market, instance.instance_type,
                                   None if quote is None else quote.usd_per_hour,
                                   self.configured())

    def stopped_price(self) -> float | None:
        """USD per hour of a stopped instance's storage, if the operator gives one."""
        value = self.configured().get(prices.STOPPED)
        return None if value is None else float(value)

    # -- what it counts -----------------------------------------------------------------

    def _held(self) -> list[tuple[Any, str | None]]:
        """Each running instance this master holds (not stopped ones), with its pool."""
        found: dict[str, tuple[Any, str | None]] = {}
        for worker in list(self.holdings.workers):
            instance = worker.instance
            if instance is not None:
                found.setdefault(instance.instance_id, (instance, worker.pool))
        for group in list(self.holdings.groups.values()):
            instance = group.instance
            if instance is not None and instance.instance_id not in found:
                pool = next((m.pool for m in group.members.values()), None)
                found[instance.instance_id] = (instance, pool)
        return list(found.values())

    def accrue(self) -> None:
        """Count what the instances cost up to now (memory only)."""
        for pool in self.pools():
            for market in MARKETS:
                self.metrics.inc(COUNTER, {"market": market, "pool": pool}, by=0)
        self.spend.accrue(self.reactor.seconds(), [
            cost.Running(i.instance_id, i.launched_at, self.price(i), pool, i.market)
            for i, pool in self._held()])

    def today(self) -> dict[str, Any]:
        """The Fleet API's ``cost``: today's total (UTC) on this master's instances."""
        now = self.reactor.seconds()
        self.accrue()
        return {"day": cost.utc_day(now), "today_usd": round(self.spend.today(now), 6),
                "counting_since": self.spend.started,
                "spot_prices_error": self.spot.last_error}

    # -- builds (told by the glue, worker/scheduling.py) ------------------------------------

    def build_started(self, build: Hashable, instance: Any) -> bool:
        """``build`` runs on ``instance`` (its worker is connected) from now; True the
        first time it is told."""
        if not self.ledger.start(build, instance.instance_id, self.reactor.seconds()):
            return False
        self._running[build] = instance
        self.accrue()
        return True

    @defer.inlineCallbacks
    def build_finished(self, build: Hashable, worker: str, about: Mapping[str, Any]) -> Any:
        """``build`` ended: its BuildCost, or None if it never ran on an instance or the
        instance's price is unknown. ``about`` (its id, number, builder) is kept with
        the cost as the worker's last build for the Fleet page."""
        share = self.ledger.finish(build, self.reactor.seconds())
        instance = self._running.pop(build, None)
        if share is None or instance is None:
            return None
        self.accrue()
        if instance.market == "spot":  # not known yet: asked now (at most once a while)
            yield self.spot.price(instance.client, instance.instance_type,
                                  instance.availability_zone)
        price = self.price(instance)
        if price is None:
            log.msg(f"dockerami: no {instance.market} price for {instance.instance_type} "
                    f"in {instance.availability_zone}: no cost for the build on {worker}")
            return None
        result = BuildCost(round(price.of(share.seconds), 6), price, share)
        self.last_build[worker] = {
            **about, "usd": result.usd, "usd_per_hour": price.usd_per_hour,
            "price_source": price.source, "share_seconds": round(share.seconds, 1),
            "ran_seconds": round(share.ran, 1)}
        return result
