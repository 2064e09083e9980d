"""Warm minimums by schedule: the periods (fleet/schedule.py) on their own, then the fleet
that keeps them on a fake clock (the fleet's reactor clock, never the wall clock): it
warms the measured provisioning time ahead of a period, instances idle out the idle
timeout after its end, and a period at 08:00 Berlin time moves in UTC with daylight
saving."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from twisted.internet import defer, task

from buildbot_dockerami.cloud.ec2 import LaunchSpec
from buildbot_dockerami.cloud.instances import instance_tags
from buildbot_dockerami.cloud.testing import FakeEc2, InlineThreads
from buildbot_dockerami.config.checks import config_problems, fleet_problems
from buildbot_dockerami.config.model import FleetWide, WorkerSettings
from buildbot_dockerami.fleet import pools, provisioning
from buildbot_dockerami.fleet.prewarm import PrewarmTimer
from buildbot_dockerami.fleet.schedule import ScheduleError, describe, parse
from buildbot_dockerami.fleet.service import Fleet
from buildbot_dockerami.fleet.stopped_pool import StoppedPool
from tests.harness import master_cfg, wait_for
from tests.helpers import instances, live, pool_master

BERLIN = ZoneInfo("Europe/Berlin")


def at(*args: int, tz: Any = UTC) -> float:
    """Epoch seconds of a moment given as year, month, day, hour, minute (, second)."""
    return datetime(*args, tzinfo=tz).timestamp()


def utc(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%a %m-%d %H:%M:%S")


# -- the periods --------------------------------------------------------------------------

WEEK = {"mon-fri 08:00-19:00 Europe/Berlin": 4, "sat 10:00-14:00 UTC": 1, "default": 0}


def test_the_period_in_force_and_the_next_one() -> None:
    schedule = parse(WEEK)
    friday_noon = at(2026, 1, 9, 12, 0, tz=BERLIN)
    assert schedule.value(friday_noon) == 4
    assert schedule.current(friday_noon).end == at(2026, 1, 9, 19, 0, tz=BERLIN)
    upcoming = schedule.next(friday_noon)
    assert (upcoming.period.text, upcoming.start) == ("sat 10:00-14:00 UTC",
                                                      at(2026, 1, 10, 10, 0))
    saturday_evening = at(2026, 1, 10, 18, 0)
    assert schedule.value(saturday_evening) == 0 and schedule.current(saturday_evening) is None
    assert schedule.next(saturday_evening).start == at(2026, 1, 12, 8, 0, tz=BERLIN)  # Monday
    shown = describe(schedule, saturday_evening, 92)
    assert shown["current"] == {"period": "default", "value": 0, "since": None,
                                "until": at(2026, 1, 12, 8, 0, tz=BERLIN)}
    assert shown["next"]["period"] == "mon-fri 08:00-19:00 Europe/Berlin"
    assert shown["lead_seconds"] == 92


def test_a_period_starts_at_its_start_and_ends_at_its_end() -> None:
    schedule = parse({"wed 08:00-10:00 UTC": 2})
    start, end = at(2026, 1, 7, 8, 0), at(2026, 1, 7, 10, 0)
    assert [schedule.value(t) for t in (start - 1, start, end - 1, end)] == [0, 2, 2, 0]


@pytest.mark.parametrize(("days", "expected"), [
    ("mon-fri", [0, 1, 2, 3, 4]), ("sat,sun", [5, 6]), ("fri-mon", [4, 5, 6, 0]),
    ("mon-wed,sat", [0, 1, 2, 5]), ("*", list(range(7))), ("Tue", [1]),
])
def test_days_lists_and_ranges(days: str, expected: list[int]) -> None:
    (period,) = parse({f"{days} 09:00-10:00 UTC": 1}).periods
    assert sorted(period.days) == sorted(expected)


def test_an_overnight_period_ends_the_next_day() -> None:
    schedule = parse({"fri 22:00-06:00 UTC": 3, "mon 00:00-24:00 UTC": 1})
    assert schedule.value(at(2026, 1, 9, 23, 0)) == 3
    assert schedule.value(at(2026, 1, 10, 5, 59)) == 3  # Saturday morning
    assert schedule.value(at(2026, 1, 10, 6, 0)) == 0
    assert schedule.value(at(2026, 1, 12, 23, 59)) == 1  # 24:00 is the day's end


def test_warming_ahead_raises_the_value_early_and_never_drops_it_early() -> None:
    schedule = parse({"wed 08:00-10:00 UTC": 2, "wed 10:00-12:00 UTC": 1, "default": 0})
    start = at(2026, 1, 7, 8, 0)
    assert schedule.target(start - 301, 300) == 0
    assert schedule.target(start - 300, 300) == 2
    # At 09:58 the 10:00 period (1) is within the lead: the current 2 still holds.
    assert schedule.target(at(2026, 1, 7, 9, 58), 300) == 2
    assert schedule.target(at(2026, 1, 7, 10, 0), 300) == 1
    assert schedule.last_end(at(2026, 1, 7, 12, 5), 600) == at(2026, 1, 7, 12, 0)
    assert schedule.last_end(at(2026, 1, 7, 12, 11), 600) is None


def test_daylight_saving_moves_a_local_period_in_utc() -> None:
    """Europe/Berlin: CET (UTC+1) until the last Sunday of March (2026-03-29), CEST
    (UTC+2) until the last Sunday of October (2026-10-25)."""
    schedule = parse({"* 08:00-19:00 Europe/Berlin": 1})
    starts = {day: schedule.next(at(2026, *day, 0, 0)).start
              for day in ((3, 28), (3, 30), (10, 24), (10, 26))}
    assert starts == {(3, 28): at(2026, 3, 28, 7, 0), (3, 30): at(2026, 3, 30, 6, 0),
                      (10, 24): at(2026, 10, 24, 6, 0), (10, 26): at(2026, 10, 26, 7, 0)}
    # The day of the change itself is 08:00-19:00 local too.
    assert schedule.next(at(2026, 3, 29, 0, 0)).start == at(2026, 3, 29, 6, 0)
    assert schedule.current(at(2026, 10, 25, 12, 0)).end == at(2026, 10, 25, 18, 0)
    # 02:30 does not exist on 2026-03-29 in Berlin: the period starts at 03:30 CEST.
    skipped = parse({"sun 02:30-04:00 Europe/Berlin": 1})
    assert skipped.next(at(2026, 3, 28, 0, 0)).start == at(2026, 3, 29, 1, 30)


@pytest.mark.parametrize(("spec", "message"), [
    ({"mon-fry 08:00-19:00 UTC": 1}, "'fry' is not a day (one of mon, tue"),
    ({"mon 8-19 UTC": 1}, "'8' is not a time HH:MM"),
    ({"mon 08:00 UTC": 1}, "'08:00' is not a time range HH:MM-HH:MM"),
    ({"mon 25:00-26:00 UTC": 1}, "'25:00' is not a time HH:MM (00:00-23:59)"),
    ({"mon 08:60-09:00 UTC": 1}, "'08:60' is not a time"),
    ({"mon 08:00-24:01 UTC": 1}, "'24:01' is not a time HH:MM (00:00-24:00)"),
    ({"mon 08:00-08:00 UTC": 1}, "starts and ends at 08:00"),
    ({"mon 08:00-19:00": 1}, "expected DAYS HH:MM-HH:MM ZONE"),
    ({"mon 08:00-19:00 Europe/Berln": 1}, "'Europe/Berln' is not a time zone this host knows"),
    ({"mon 08:00-19:00 ../../etc/passwd": 1}, "is not a time zone"),
    ({"mon 08:00-19:00 UTC": -1}, "-1 must be a whole number >= 0"),
    ({"mon 08:00-19:00 UTC": 1.5}, "1.5 must be a whole number"),
    ({"mon 08:00-19:00 UTC": True}, "True must be a whole number"),
    ({"default": "2"}, "'default': '2' must be a whole number"),
    ({3: 1}, "period 3 must be a string"),
    ("4", "must be a whole number or a dict of periods"),
    ({"mon-fri 08:00-19:00 Europe/Berlin": 4, "fri 18:00-20:00 Europe/Berlin": 1},
     "periods 'mon-fri 08:00-19:00 Europe/Berlin' and 'fri 18:00-20:00 Europe/Berlin' "
     "overlap (both at Fri"),
    ({"sun 22:00-02:00 UTC": 1, "mon 01:00-03:00 UTC": 1}, "overlap (both at Mon"),
    # 07:00 UTC is 08:00 in Berlin only in winter: overlaps on some days of the year.
    ({"mon 08:00-19:00 Europe/Berlin": 1, "mon 06:30-07:30 UTC": 1}, "overlap"),
])
def test_bad_schedules_are_named(spec: Any, message: str) -> None:
    with pytest.raises(ScheduleError) as raised:
        parse(spec, checked_from=at(2026, 1, 1, 0, 0))
    assert message in str(raised.value)


def test_adjacent_periods_do_not_overlap() -> None:
    parse({"mon-fri 08:00-12:00 UTC": 2, "mon-fri 12:00-19:00 UTC": 4, "sat 00:00-24:00 UTC": 1,
           "sun 00:00-24:00 UTC": 1})


def test_checkconfig_names_the_setting() -> None:
    base = {"image": "org/w:1", "ami": "ami-0123456789abcdef0", "instance_type": "t3.micro",
            "region": "us-east-1"}
    assert config_problems("w", None, pool="p", min_warm=WEEK, **base) == []
    assert config_problems("w", None, pool="p", min_warm=2, **base) == []
    (problem,) = config_problems("w", None, pool="p", min_warm={"mon 9-5 UTC": 1}, **base)
    assert problem.startswith("min_warm: period 'mon 9-5 UTC': '9' is not a time")
    (problem,) = config_problems("w", None, min_warm=2, **base)
    assert problem.startswith("min_warm: needs pool=")
    (problem,) = fleet_problems(FleetWide(max_stopped={"sat-sun 00:00-24:00 Mars/Base": 0}))
    assert problem.startswith("max_stopped: period 'sat-sun 00:00-24:00 Mars/Base': 'Mars/Base'")
    assert fleet_problems(FleetWide(max_stopped={"sat,sun 00:00-24:00 UTC": 0,
                                                 "default": 10})) == []


def test_the_number_of_stopped_instances_kept_follows_its_periods() -> None:
    clock = task.Clock()
    clock.advance(at(2026, 1, 9, 23, 0))  # Friday
    stopped = StoppedPool(clock=clock.seconds)
    stopped.max_count = {"sat,sun 00:00-24:00 UTC": 0, "default": 10}
    assert stopped.max_count == 10
    clock.advance(3600)
    assert stopped.max_count == 0  # Saturday: stopped instances are terminated
    stopped.max_count = 3
    assert stopped.max_count == 3


def test_the_provisioning_lead_is_a_high_percentile_of_recent_launches() -> None:
    times = provisioning.ProvisioningTimes()
    assert times.lead("p") == provisioning.DEFAULT_LEAD
    for seconds in [60.0] * 17 + [300.0, 90.0, 120.0]:
        times.record("p", seconds)
    assert times.lead("p") == 90.0  # the 18th of 20: the two slowest are not the lead
    for _ in range(provisioning.SAMPLES):
        times.record("p", 45.0)
    assert times.lead("p") == 45.0  # only the recent ones count
    for _ in range(3):  # three hung boots in 20 reach the 90th percentile
        times.record("p", 10 * 3600.0)
    assert times.lead("p") == provisioning.MAX_LEAD
    assert times.lead("other") == provisioning.DEFAULT_LEAD


# -- the fleet keeping a scheduled minimum, on a fake clock -----------------------------


class State:
    """buildbot's state table (master.db.state), in memory."""

    def __init__(self) -> None:
        self.values: dict[tuple[int, str], Any] = {}

    def getObjectId(self, name: str, class_name: str) -> defer.Deferred:
        return defer.succeed(1)

    def getState(self, objectid: int, key: str, default: Any) -> defer.Deferred:
        return defer.succeed(self.values.get((objectid, key), default))

    def setState(self, objectid: int, key: str, value: Any) -> defer.Deferred:
        self.values[(objectid, key)] = value
        return defer.succeed(None)


@pytest.mark.parametrize(("stored", "min_warm"), [
    ({}, None),
    # Stored before a minimum could be configured: 0 was "none set", a number was set.
    ({"cap": 3, "min_warm": 0}, None),
    ({"cap": 3, "min_warm": 2}, 2),
    ({"cap": None, "min_warm": 0, "override": True}, 0),
    ({"cap": None, "min_warm": 0, "override": False}, None),
])
def test_the_pages_override_is_kept_apart_from_none_set(stored: dict, min_warm: Any) -> None:
    state = State()
    state.values[(1, "limits")] = stored
    master = SimpleNamespace(db=SimpleNamespace(state=state))
    loaded = pools.load_limits(master, "p").result
    assert (loaded.cap, loaded.min_warm) == (stored.get("cap"), min_warm)
    pools.save_limits(master, "p", loaded)
    assert pools.load_limits(master, "p").result == loaded
    # A master of the release before reads a number.
    assert isinstance(state.values[(1, "limits")]["min_warm"], int)


class World:
    """A fleet on a fake clock (set to ``start``) with a pool of ``count`` workers whose
    configured warm minimum is ``spec``, registered as the glue registers them, over a
    FakeEc2; ``log`` lists launches and terminations as (what, when, worker)."""

    def __init__(self, spec: Any, start: float, *, count: int, boot: float,
                 idle_timeout: float) -> None:
        self.clock = task.Clock()
        self.clock.advance(start)
        self.fake = FakeEc2(clock=self.clock.seconds)
        self.client = InlineThreads().client(self.fake)
        self.fleet = Fleet(self.clock, "host:/basedir")
        # Its master, as far as loading pool limits goes (a service's is its parent's).
        self.fleet.parent = SimpleNamespace(
            master=SimpleNamespace(db=SimpleNamespace(state=State())))
        self.log: list[tuple[str, float, str]] = []
        self.boot, self.idle_timeout = boot, idle_timeout
        # The fleet holds its workers weakly.
        self.workers = [Worker(f"pool-{k}", self, spec) for k in range(1, count + 1)]
        for worker in self.workers:
            self.fleet.register(worker, worker.settings, idle_timeout)
        self.fleet.reconciler.stop()  # not what these tests look at

    def run_until(self, until: float) -> None:
        """Every call due up to ``until``, each at its own time (keeper ticks, timers)."""
        clock = self.clock
        while clock.seconds() < until:
            due = min((c.getTime() for c in clock.getDelayedCalls()), default=until)
            clock.advance(max(0.0, min(due, until) - clock.seconds()))

    def skip_quiet(self, until: float) -> None:
        """Over hours with no instance and no period: one jump (the keeper ticks once, at
        the end) instead of a keeper tick every 2 s."""
        assert self.live() == 0
        self.clock.advance(until - self.clock.seconds())

    def live(self) -> int:
        return sum(1 for i in self.fake.instances.values() if i.state in ("pending", "running"))

    def events(self) -> list[tuple[str, str]]:
        """The log as (what, when in UTC), cleared."""
        events = [(what, utc(when)) for what, when, _ in self.log]
        self.log.clear()
        return events


class Worker:
    """A FleetWorker whose instance the fake EC2 runs: it connects ``boot`` seconds after
    it is asked to pre-warm, records that as its pool's provisioning time and waits for
    a build with the glue's PrewarmTimer (as worker/scheduling.py and connections.py)."""

    def __init__(self, name: str, world: World, spec: Any) -> None:
        self.name, self.world, self.fleet = name, world, world.fleet
        self.pool, self.group = "pool", None
        self.instance: Any = None
        self.conn: Any = None
        self.busy = False
        self.stopping = False
        self.last_failure = ""
        self.settings = WorkerSettings(pool=self.pool, min_warm=spec)
        fleet = world.fleet
        self.timer = PrewarmTimer(
            world.clock, lambda: world.idle_timeout, lambda: fleet.keeper.keeps_warm(self),
            self.expire, lambda within: fleet.keeper.warm_ended(self, within))

    @property
    def active(self) -> bool:
        return self.instance is not None

    def ec2_client(self) -> defer.Deferred:
        return defer.succeed(self.world.client)

    def prewarm(self) -> bool:
        if self.instance is not None:
            return False
        world = self.world
        tags = instance_tags(self.name, self.fleet.master_id, {})
        status = world.fake.run_instance(LaunchSpec(ami="ami-1", instance_type="t3.micro",
                                                    user_data="u", tags=tags))
        self.instance = SimpleNamespace(instance_id=status.instance_id, client=world.client)
        self.fleet.in_use.note(self)
        requested = world.clock.seconds()
        world.log.append(("launch", requested, self.name))
        world.clock.callLater(world.boot, self.connected, requested)
        return True

    def connected(self, requested: float) -> None:
        self.conn = object()
        self.fleet.provisioning.record(self.pool, self.world.clock.seconds() - requested)
        self.timer.start()

    def expire(self) -> None:
        instance, self.instance, self.conn = self.instance, None, None
        self.world.log.append(("terminate", self.world.clock.seconds(), self.name))
        self.fleet.in_use.note(self)
        self.fleet.terminate(instance.client, instance.instance_id)

    def instance_lost(self, status: Any) -> None:
        raise AssertionError(f"{self.name} lost its instance")


def test_launches_lead_the_period_by_the_measured_time_and_idle_out_after_its_end() -> None:
    """Wednesday before anything is measured: the default lead. Thursday: the lead is
    the pool's measured provisioning time (90 s here), plus one keeper tick."""
    world = World({"wed,thu 08:00-10:00 UTC": 2, "default": 0}, at(2026, 1, 7, 6, 0),
                  count=3, boot=90, idle_timeout=600)
    default_lead = provisioning.DEFAULT_LEAD + pools.KEEPER_INTERVAL
    start = at(2026, 1, 7, 8, 0)
    world.run_until(start - default_lead - 0.5)
    assert world.log == [] and world.live() == 0
    world.run_until(start + 1)
    assert world.events() == [("launch", utc(start - default_lead))] * 2
    assert pools.pool_status(world.fleet, "pool")["idle"] == 2

    end = at(2026, 1, 7, 10, 0)
    world.run_until(end + 600 - 1)
    assert world.log == [] and world.live() == 2  # nothing ends before end + idle timeout
    world.run_until(end + 600 + 1)
    assert world.events() == [("terminate", utc(end + 600))] * 2
    assert world.live() == 0

    # Thursday: the measured lead.
    assert world.fleet.provisioning.lead("pool") == 90
    thursday = at(2026, 1, 8, 8, 0)
    world.skip_quiet(thursday - 3600)
    world.run_until(thursday + 1)
    assert world.events() == [("launch", utc(thursday - 92))] * 2
    status = pools.pool_status(world.fleet, "pool")
    assert status["schedule"]["current"]["period"] == "wed,thu 08:00-10:00 UTC"
    assert status["schedule"]["next"]["start"] == at(2026, 1, 14, 8, 0)
    assert status["schedule"]["lead_measured"] is True
    assert (status["min_warm"], status["idle"], status["schedule"]["override"]) == (2, 2, None)


def test_the_pages_override_wins_until_cleared() -> None:
    world = World({"wed 08:00-10:00 UTC": 2}, at(2026, 1, 7, 9, 0), count=3, boot=30,
                  idle_timeout=60)
    world.fleet.pool_limits["pool"] = pools.PoolLimits(min_warm=0)
    world.run_until(at(2026, 1, 7, 9, 5))
    assert world.live() == 0
    assert pools.pool_status(world.fleet, "pool")["schedule"]["override"] == 0
    world.fleet.pool_limits["pool"] = pools.PoolLimits(min_warm=None)  # cleared
    world.run_until(at(2026, 1, 7, 9, 6))
    assert world.live() == 2


def test_a_period_at_eight_in_berlin_is_an_hour_earlier_in_utc_after_the_spring_change() -> None:
    """Friday 2026-03-27 08:00 CET is 07:00 UTC; Monday 2026-03-30 08:00 CEST is 06:00 UTC.
    The instance warmed for Friday idles out 10 minutes after 19:00 CET (18:00 UTC)."""
    world = World({"mon-fri 08:00-19:00 Europe/Berlin": 1}, at(2026, 3, 27, 6, 50),
                  count=2, boot=120, idle_timeout=600)
    default_lead = provisioning.DEFAULT_LEAD + pools.KEEPER_INTERVAL
    world.run_until(at(2026, 3, 27, 7, 1))
    assert world.events() == [("launch", utc(at(2026, 3, 27, 7, 0) - default_lead))]
    world.run_until(at(2026, 3, 27, 18, 11))
    assert world.events() == [("terminate", utc(at(2026, 3, 27, 18, 10)))]
    world.skip_quiet(at(2026, 3, 30, 5, 0))  # the weekend
    world.run_until(at(2026, 3, 30, 6, 1))
    assert world.events() == [("launch", utc(at(2026, 3, 30, 6, 0) - 122))]


# -- a real master through the local cloud, over one period boundary --------------------


def minute_period(earliest: float) -> tuple[str, float, float]:
    """A one-minute UTC period starting at the first whole minute after ``earliest``."""
    start = (int(earliest) // 60 + 1) * 60
    begins, ends = datetime.fromtimestamp(start, UTC), datetime.fromtimestamp(start + 60, UTC)
    end_text = "24:00" if ends.day != begins.day else f"{ends:%H:%M}"
    day = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")[begins.weekday()]
    return f"{day} {begins:%H:%M}-{end_text} UTC", float(start), float(start + 60)


@pytest.mark.integration
def test_a_real_master_warms_ahead_of_a_period_and_idles_out_after_it(make_master, cloud):
    """The master measures the pool's provisioning on a first instance, then, with a period
    configured a minute or so ahead, launches that measured lead before its start and lets
    the instance idle out its idle timeout (5 s) after the end."""
    idle = 5
    master = pool_master(make_master, count=2, build_wait_timeout=idle)
    assert master.control(action="prewarm", worker="pool-1").status_code == 200
    # The state says connected as the connection is made; the timeline a moment later.
    row = wait_for(lambda: next((w for w in master.fleet()["workers"]
                                 if "connected" in w["timeline"]), None), 60, "a first instance")
    measured = row["timeline"]["connected"] - row["timeline"]["requested"]
    wait_for(lambda: not live(cloud), 60, "the first instance to idle out")

    period, start, end = minute_period(time.time() + measured + pools.KEEPER_INTERVAL + 15)
    master.reconfig(master_cfg(
        pool=f"'pool', count=2, min_warm={{{period!r}: 1, 'default': 0}}",
        plugins={"dockerami": {"anonymous_control": True}}, build_wait_timeout=idle))
    shown = master.fleet()["pools"]["pool"]
    assert shown["schedule"]["next"] == {"period": period, "value": 1, "start": start,
                                         "end": end}
    assert shown["schedule"]["lead_measured"] is True
    lead = shown["schedule"]["lead_seconds"]
    assert lead == pytest.approx(measured + pools.KEEPER_INTERVAL, abs=0.2)
    assert time.time() < start - lead, "the reconfig took too long for the test's period"

    (instance,) = wait_for(lambda: live(cloud), start - time.time() + 30, "the warm launch")
    launched = time.time()
    assert launched < start, "not launched ahead of the period"
    # EC2's launch time is in whole seconds; a keeper tick is 2 s.
    assert instance["LaunchTime"].timestamp() >= int(start - lead - pools.KEEPER_INTERVAL) - 1
    shown = wait_for(lambda: (p := master.fleet()["pools"]["pool"])["idle"] == 1 and p, 60,
                     "the warm instance to connect")
    wait_for(lambda: time.time() >= end, end - time.time() + 5, "the period's end")
    assert [i["InstanceId"] for i in live(cloud)] == [instance["InstanceId"]]
    assert master.fleet()["pools"]["pool"]["schedule"]["current"]["period"] == "default"
    wait_for(lambda: not live(cloud), idle + 30, "the warm instance to idle out")
    assert time.time() >= end + idle
    assert len(instances(cloud)) == 2  # the measured one and the warm one, nothing more
