"""Cost per build: the share rule and the fleet's spending on a fake clock, spot prices
from the in-memory EC2 (held to moto by test_fake_ec2_conformance.py), and a real
master through the local cloud whose spot price history says what an hour costs."""

from __future__ import annotations

import calendar
from typing import Any

import pytest
import requests
from prometheus_client import parser as text_format
from twisted.internet import task

from buildbot_dockerami.cloud.testing import FakeEc2, InlineThreads
from buildbot_dockerami.config.checks import fleet_problems
from buildbot_dockerami.config.model import FleetWide
from buildbot_dockerami.fleet import cost, prices, spot_prices
from buildbot_dockerami.fleet.launch import LaunchedInstance
from buildbot_dockerami.fleet.metrics import FleetCollector
from buildbot_dockerami.fleet.service import Fleet
from tests.harness import SUCCESS, master_cfg, wait_for

ZONE = "us-east-1a"


def test_builds_running_together_share_their_instance_equally() -> None:
    ledger = cost.ShareLedger()
    assert ledger.start("a", "i-1", 100)
    assert not ledger.start("a", "i-1", 101)  # told again: nothing changes
    ledger.start("b", "i-1", 110)  # a alone for 10 s, then a and b
    ledger.start("c", "i-2", 110)  # another instance: not shared with a or b
    assert ledger.running("i-1") == 2
    a = ledger.finish("a", 120)
    assert a == cost.Share("i-1", 10 + 10 / 2, 20)
    ledger.start("d", "i-1", 125)  # b alone for 5 s, then b and d
    b = ledger.finish("b", 135)
    assert b is not None and b.seconds == pytest.approx(10 / 2 + 5 + 10 / 2)
    assert b.ran == 25
    d = ledger.finish("d", 140)
    assert d is not None and d.seconds == pytest.approx(10 / 2 + 5)
    assert ledger.finish("c", 150) == cost.Share("i-2", 40, 40)
    assert ledger.running("i-1") == ledger.running("i-2") == 0
    assert ledger.finish("never-started", 150) is None
    # The shares of one instance never add up to more than the time builds ran on it.
    assert a.seconds + b.seconds + d.seconds == pytest.approx(140 - 100)


def test_three_slots_and_a_build_that_ends_when_another_starts() -> None:
    ledger = cost.ShareLedger()
    for build in ("a", "b", "c"):
        ledger.start(build, "i-1", 0)
    first = ledger.finish("a", 30)
    ledger.start("d", "i-1", 30)
    assert first is not None and first.seconds == pytest.approx(10)
    rest = [ledger.finish(b, 60) for b in ("b", "c", "d")]
    assert [r.seconds for r in rest if r] == pytest.approx([20, 20, 10])


def test_an_instance_price_by_market() -> None:
    configured = {"t3.large": 0.05}
    assert cost.instance_price("spot", "t3.large", 0.025, configured) == cost.Price(
        0.025, "spot")
    assert cost.instance_price("spot", "t3.large", None, configured) is None
    assert cost.instance_price("on-demand", "t3.large", 0.025, configured) == cost.Price(
        0.05, "configured")
    default = cost.instance_price("on-demand", "t3.micro", None, configured)
    assert default == cost.Price(0.0104, prices.SOURCE)
    assert "approximate" in default.source and prices.AS_OF in default.source
    assert cost.instance_price("on-demand", "x9.huge", None, configured) is None


def test_the_default_table_is_proportional_within_a_family() -> None:
    table = prices.DEFAULT_ON_DEMAND
    assert table["t3.large"] == 0.0832 and table["c5.xlarge"] == 0.17
    for name, price in table.items():
        family, size = name.split(".")
        assert 0 < price < 5, name
        if size == "xlarge":
            assert price == pytest.approx(2 * table[f"{family}.large"])


def day_start(date: str) -> float:
    return float(calendar.timegm((*(int(p) for p in date.split("-")), 0, 0, 0)))


def test_spending_counts_each_instance_by_pool_market_and_utc_day() -> None:
    counted: list[tuple[dict, float]] = []
    spend = cost.Spend(lambda labels, dollars: counted.append((labels, dollars)))
    midnight = day_start("2026-12-08")
    hourly = cost.Price(3.6, "spot")  # 0.001 USD a second
    a = cost.Running("i-a", midnight - 100, hourly, "linux", "spot")
    b = cost.Running("i-b", midnight - 50, None, None, "on-demand")  # price not known yet
    spend.accrue(midnight - 50, [a, b])
    assert counted == [({"market": "spot", "pool": "linux"}, pytest.approx(0.05))]
    spend.accrue(midnight + 100, [a, b])
    assert spend.daily == {"2026-12-07": pytest.approx(0.1),
                           "2026-12-08": pytest.approx(0.1)}
    # b's price became known: counted from its launch, not from when it was learnt.
    b = cost.Running("i-b", midnight - 50, cost.Price(36, "configured"), None, "on-demand")
    spend.accrue(midnight + 150, [a, b])
    assert counted[-1] == ({"market": "on-demand"}, pytest.approx(2.0))
    assert spend.today(midnight + 150) == pytest.approx(0.1 + 0.05 + 1.5)
    # Gone: a up to the pass that no longer sees it; b, 200 s old, at least a minute.
    spend.accrue(midnight + 160, [])
    assert sum(d for labels, d in counted if labels["market"] == "spot") == pytest.approx(0.26)
    assert sum(d for labels, d in counted if labels["market"] == "on-demand") == \
        pytest.approx(0.01 * 210)
    before = list(counted)
    spend.accrue(midnight + 999, [])
    assert counted == before
    # A short life costs EC2's one-minute minimum; a start from stopped is a new start.
    c = cost.Running("i-c", midnight + 1000, hourly, None, "spot")
    spend.accrue(midnight + 1010, [c])
    spend.accrue(midnight + 1020, [])
    assert counted[-1][1] == pytest.approx(0.001 * 50)
    c2 = cost.Running("i-c", midnight + 2000, hourly, None, "spot")
    spend.accrue(midnight + 2100, [c2])
    assert counted[-1][1] == pytest.approx(0.1)
    assert spend.started == midnight - 50


class Ec2World:
    """A fake clock, the in-memory EC2 and an AsyncEc2 over it answering at once."""

    def __init__(self) -> None:
        self.clock = task.Clock()
        self.clock.advance(day_start("2026-12-08") + 3600)
        self.ec2 = FakeEc2(clock=self.clock.seconds)
        self.threads = InlineThreads()
        self.client = self.threads.client(self.ec2)

    def instance(self, instance_id: str = "i-1", market: str = "spot",
                 instance_type: str = "t3.micro") -> LaunchedInstance:
        return LaunchedInstance(self.client, instance_id, instance_type, "org/img:1",
                                "ami-1", ZONE, self.clock.seconds(), market)


def test_spot_prices_are_asked_on_a_bounded_schedule() -> None:
    world = Ec2World()
    world.ec2.set_spot_price("t3.micro", 0.0031)
    known = spot_prices.SpotPrices(world.clock.seconds)
    wanted = [(world.client, "t3.micro", ZONE), (world.client, "c5.large", ZONE),
              (world.client, "t3.micro", "us-east-1b")]
    assert known.known(world.client, "t3.micro", ZONE) is None
    known.refresh(wanted)
    assert world.ec2.count("DescribeSpotPriceHistory") == 1  # one call for every pair
    assert known.known(world.client, "t3.micro", ZONE).usd_per_hour == 0.0031
    assert known.known(world.client, "c5.large", ZONE).usd_per_hour > 0
    for _ in range(20):  # passes every 10 s: nothing is due again before REFRESH_SECONDS
        world.clock.advance(10)
        known.refresh(wanted)
        known.price(world.client, "t3.micro", ZONE)
    assert world.ec2.count("DescribeSpotPriceHistory") == 1
    world.clock.advance(spot_prices.REFRESH_SECONDS)
    world.ec2.set_spot_price("t3.micro", 0.0042)
    known.refresh(wanted)
    assert world.ec2.count("DescribeSpotPriceHistory") == 2
    assert known.known(world.client, "t3.micro", ZONE).usd_per_hour == 0.0042

    # EC2 refuses: the old price stays, the error is shown, asked again only later.
    world.clock.advance(spot_prices.REFRESH_SECONDS)
    world.ec2.inject("DescribeSpotPriceHistory", "UnauthorizedOperation", "no", count=1)
    known.refresh(wanted)
    assert "UnauthorizedOperation" in (known.last_error or "")
    assert known.known(world.client, "t3.micro", ZONE).usd_per_hour == 0.0042
    world.clock.advance(spot_prices.RETRY_SECONDS - 1)
    known.refresh(wanted)
    assert world.ec2.count("DescribeSpotPriceHistory") == 3
    world.clock.advance(1)
    known.refresh(wanted)
    assert world.ec2.count("DescribeSpotPriceHistory") == 4 and known.last_error is None


def test_callers_wait_for_the_one_call_in_flight() -> None:
    world = Ec2World()
    world.ec2.set_spot_price("t3.micro", 0.0031)
    known = spot_prices.SpotPrices(world.clock.seconds)
    world.threads.hold("DescribeSpotPriceHistory")
    answers = [known.price(world.client, "t3.micro", ZONE) for _ in range(5)]
    known.refresh([(world.client, "t3.micro", ZONE)])
    assert world.threads.held() == 1
    assert world.threads.release() == 1
    results: list[Any] = []
    for d in answers:
        d.addCallback(results.append)
    assert [r.usd_per_hour for r in results] == [0.0031] * 5
    assert world.ec2.count("DescribeSpotPriceHistory") == 1


class Worker:
    """A worker as the fleet's spending and metrics see it: connected, not building."""

    busy = False
    conn = object()
    group = None

    def __init__(self, name: str, instance: LaunchedInstance | None,
                 pool: str | None = None) -> None:
        self.name, self.instance, self.pool = name, instance, pool


def spot_fleet(world: Ec2World) -> tuple[Fleet, LaunchedInstance]:
    fleet = Fleet(world.clock, "host:/basedir")
    instance = world.instance()
    fleet.workers.add(keep := Worker("w0", instance, pool="linux"))
    fleet._test_keep = keep  # type: ignore[attr-defined]  # the WeakSet's only reference
    return fleet, instance


def test_readers_never_ask_ec2_and_the_fleets_pass_does() -> None:
    world = Ec2World()
    world.ec2.set_spot_price("t3.micro", 3.6)
    fleet, instance = spot_fleet(world)
    fleet.pool_limits["linux"] = None
    collector = FleetCollector(fleet)
    for _ in range(50):  # the page and /metrics, as often as they like
        world.clock.advance(0.5)
        assert fleet.spending.today()["today_usd"] == 0  # price not known yet
        assert fleet.spending.price(instance) is None
        list(collector.collect())
    assert world.ec2.calls == []
    fleet.spending.tick()  # the fleet's own pass
    assert world.ec2.count("DescribeSpotPriceHistory") == 1
    assert fleet.spending.price(instance) == cost.Price(3.6, "spot")
    # Counted from the launch, 25 s ago, once the price is known.
    assert fleet.spending.today()["today_usd"] == pytest.approx(0.025)
    found = {(s.name, tuple(sorted(s.labels.items()))): s.value
             for m in collector.collect() for s in m.samples}
    assert found[("dockerami_cost_dollars_total",
                  (("market", "spot"), ("pool", "linux")))] == pytest.approx(0.025)
    # Every pool and market from the start, at zero; outside a pool the pool is empty.
    assert found[("dockerami_cost_dollars_total",
                  (("market", "on-demand"), ("pool", "linux")))] == 0
    assert found[("dockerami_cost_dollars_total",
                  (("market", "on-demand"), ("pool", "")))] == 0
    for _ in range(100):
        world.clock.advance(10)
        fleet.spending.tick()
    assert world.ec2.count("DescribeSpotPriceHistory") == 1  # within REFRESH_SECONDS


def test_a_builds_cost_is_its_share_at_its_instances_price() -> None:
    world = Ec2World()
    world.ec2.set_spot_price("t3.micro", 3.6)
    fleet, instance = spot_fleet(world)
    spending = fleet.spending
    spending.build_started("a", instance)
    world.clock.advance(10)
    spending.build_started("b", instance)
    world.clock.advance(10)
    results: list[Any] = []
    spending.build_finished("a", "w0", {"buildid": 7}).addCallback(results.append)
    # The spot price was not known yet: asked for this build, once.
    assert world.ec2.count("DescribeSpotPriceHistory") == 1
    (a,) = results
    assert a.usd == pytest.approx(0.001 * (10 + 5)) and a.price.source == "spot"
    assert spending.last_build["w0"]["buildid"] == 7
    assert spending.last_build["w0"]["usd"] == a.usd
    world.clock.advance(5)
    spending.build_finished("b", "w0", {"buildid": 8}).addCallback(results.append)
    assert results[1].usd == pytest.approx(0.001 * (5 + 5))
    assert world.ec2.count("DescribeSpotPriceHistory") == 1
    spending.build_finished("never-ran", "w0", {}).addCallback(results.append)
    assert results[2] is None
    # An on-demand instance of a type no table knows: no cost, and no EC2 call.
    unknown = world.instance("i-2", "on-demand", "x9.huge")
    spending.build_started("c", unknown)
    world.clock.advance(5)
    spending.build_finished("c", "w1", {}).addCallback(results.append)
    assert results[3] is None and "w1" not in spending.last_build
    assert world.ec2.count("DescribeSpotPriceHistory") == 1


def test_configured_prices_win_over_the_default_and_are_checked() -> None:
    world = Ec2World()
    fleet = Fleet(world.clock, "host:/basedir")
    instance = world.instance("i-3", "on-demand", "t3.micro")
    assert fleet.spending.price(instance) == cost.Price(0.0104, prices.SOURCE)
    fleet.page_prices = {"t3.micro": 0.02, "stopped": 0.001}  # the www plugin's, older
    assert fleet.spending.price(instance) == cost.Price(0.02, "configured")
    fleet.configure(FleetWide(prices={"t3.micro": 0.03}))
    assert fleet.spending.price(instance) == cost.Price(0.03, "configured")
    assert fleet.spending.stopped_price() == 0.001
    fleet.reconciler.stop()
    assert fleet_problems(FleetWide(prices={"t3.micro": 0.03, "stopped": 0})) == []
    assert fleet_problems(FleetWide(prices=[0.03])) == [
        "prices: [0.03] must be a dict of instance type -> on-demand USD per hour, "
        "e.g. {'t3.large': 0.0832}"]
    assert fleet_problems(FleetWide(prices={"t3.micro": -1, "c5.large": "0.1", 3: 1.0})) == [
        "prices: t3.micro: -1 must be USD per hour, a number >= 0",
        "prices: c5.large: '0.1' must be USD per hour, a number >= 0",
        "prices: 3 is not an instance type"]


# -- a real master ------------------------------------------------------------------------

#: Builders of the real master's test: two, so that one worker runs two builds at once.
TWO_BUILDERS = """
c['builders'].append(util.BuilderConfig(name='other', workernames=['w0'], factory=factory))
c['schedulers'] = [schedulers.ForceScheduler(name='force', builderNames=['runtests']),
                   schedulers.ForceScheduler(name='force2', builderNames=['other'])]
from buildbot_dockerami import FleetSettings
c['services'] = [FleetSettings(prices={'t3.micro': 0.5})]
"""

#: USD per hour of the local cloud's spot instances in this test: 0.001 a second.
SPOT_PRICE = 3.6


def build_cost(master: Any, build: dict) -> float:
    """The build's cost property, once the master has written it."""
    def written() -> float | None:
        found = master.get(f"builds/{build['buildid']}/properties")[0]
        return found.get("dockerami_cost_usd", [None])[0]
    return wait_for(written, 20, f"the cost of build {build['buildid']}")


def scrape(master: Any) -> dict[tuple[str, frozenset], float]:
    """/metrics: (sample name, its labels with an empty one as absent) -> value."""
    text = requests.get(master.plugin_url("metrics"), timeout=10).text
    return {(s.name, frozenset((k, v) for k, v in s.labels.items() if v)): s.value
            for family in text_format.text_string_to_metric_families(text)
            for s in family.samples}


@pytest.mark.integration
def test_builds_sharing_a_spot_instance_pay_half_each(make_master, cloud) -> None:
    cloud.set_spot_price("t3.micro", SPOT_PRICE)
    master = make_master(master_cfg(
        build_wait_timeout=600, command="sleep 6", worker_extra="market='spot',",
        settings={"max_builds": "2"}, plugins={"dockerami": {}}) + TWO_BUILDERS)
    alone = master.wait_request(master.force(), 120)
    assert alone["results"] == SUCCESS
    first = build_cost(master, alone)
    # At least its 6 s of sleep on the instance, at the spot price (not FleetSettings'
    # on-demand price for t3.micro); no more than its time as buildbot counts it.
    per_second = SPOT_PRICE / 3600
    assert 6 * per_second <= first <= (alone["complete_at"] - alone["started_at"] + 1) * \
        per_second, first

    both = [master.force("runtests", "force"), master.force("other", "force2")]
    together = [master.wait_request(brid, 120) for brid in both]
    assert [b["results"] for b in together] == [SUCCESS, SUCCESS]
    costs = [build_cost(master, b) for b in together]
    # Each ran its 6 s with the other on the same instance: about half the price each.
    for shared in costs:
        assert 0.3 * first < shared < 0.75 * first, (costs, first)
    assert sum(costs) >= 6 * per_second

    status = master.fleet()
    (w0,) = status["workers"]
    assert w0["instance"]["market"] == "spot"
    assert w0["instance"]["usd_per_hour"] == SPOT_PRICE
    last = w0["last_build_cost"]
    assert last["usd"] in costs and last["buildid"] in [b["buildid"] for b in together]
    assert last["price_source"] == "spot"
    # The day's total and the counter hold the instance's whole time, idle and boot
    # included: at least what its builds paid.
    assert status["cost"]["today_usd"] >= first + sum(costs) - 1e-6
    scraped = scrape(master)
    counted = scraped["dockerami_cost_dollars_total", frozenset({("market", "spot")})]
    assert counted >= first + sum(costs) - 1e-6
    assert scraped["dockerami_ec2_requests_total",
                   frozenset({("operation", "DescribeSpotPriceHistory")})] >= 1
