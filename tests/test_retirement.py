"""Instances that retire themselves (fleet/retirement.py): what an instance reports,
counted once, no new builds, and the end after the running builds, on a fake clock and
the in-memory EC2."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer

from buildbot_dockerami.cloud import instances
from buildbot_dockerami.fleet import ending, refresh, retirement
from buildbot_dockerami.fleet import metrics as metrics_module
from buildbot_dockerami.fleet.launch import LaunchedInstance
from buildbot_dockerami.fleet.metrics import Metrics
from buildbot_dockerami.fleet.reconciler import Reconciler
from buildbot_dockerami.fleet.shared_instance import InstanceGroup
from tests.test_fleet_parts import MASTER, launch, parts

DISK_FULL = "disk_full: 0.41 GiB free on /var/lib/docker after pruning, below the floor (10%)"


def test_what_a_worker_reports_in_its_info():
    assert retirement.reported({}) is None
    assert retirement.reported(None) is None
    assert retirement.reported({"dockerami_retired": "  \n"}) is None
    assert retirement.reported({"dockerami_retired": 5}) is None
    assert retirement.reported({"dockerami_retired": DISK_FULL + "\n"}) == DISK_FULL
    assert retirement.reported({"dockerami_retired": "a\nsecond line"}) == "a"
    long = retirement.reported({"dockerami_retired": "x" * 1000})
    assert long is not None and len(long) == 300 and long.endswith("...")
    assert retirement.reason_code(DISK_FULL) == "disk_full"
    assert retirement.reason_code("cosmic_rays: oh") == "other"
    assert retirement.reason_code("no reason given") == "other"


def test_a_retirement_is_counted_once_however_many_workers_report_it():
    _, fake, client, *_ = parts()
    metrics = Metrics()
    instance = LaunchedInstance(client, launch(fake, "w"), "t3.micro", "img", "ami-1")
    assert retirement.takes_builds(instance) and retirement.takes_builds(None)
    assert retirement.record(metrics, instance, DISK_FULL)
    assert not retirement.record(metrics, instance, "disk_full: later, other words")
    assert instance.retired == DISK_FULL and not retirement.takes_builds(instance)
    assert metrics.counter("dockerami_retirements_total", {"reason": "disk_full"}) == 1
    assert retirement.message(instance) == (
        f"instance {instance.instance_id} retired itself: {DISK_FULL}")
    assert not retirement.may_end(instance, [True, False])
    assert retirement.may_end(instance, [False, False])


class Slot:
    pool = None

    def __init__(self, name: str) -> None:
        self.name, self.busy, self.armed, self.released = name, False, 0, 0

    def arm(self) -> None:
        self.armed += 1

    def release(self) -> defer.Deferred:
        self.released += 1
        return defer.succeed(None)


def test_a_retiring_shared_instance_ends_after_its_last_build_and_only_then_is_replaced():
    clock, fake, client, holdings, terminator, metrics = parts()
    group = InstanceGroup("g", clock, terminator, holdings, lambda pool, g: None)
    holdings.groups["g"] = group
    group.idle_timeout = 60
    launched: list[str] = []

    def launch_one() -> defer.Deferred:
        launched.append(launch(fake, "g"))
        return defer.succeed((LaunchedInstance(client, launched[-1], "t3.micro", "img",
                                               "ami-1"), {}))

    building, idle = Slot("a"), Slot("b")
    group.join(building)
    group.join(idle)
    first = group.acquire(launch_one).result
    building.busy = True
    group.build_started()

    retirement.record(metrics, first, DISK_FULL)
    group.end_if_retired()  # a slot still builds: the instance stays
    clock.advance(3600)
    assert fake.status(first.instance_id).state == "running" and group.instance is first

    # A slot that wants the instance now waits for a new one; none is launched yet.
    waiting = group.acquire(launch_one)
    assert not waiting.called and launched == [first.instance_id]

    building.busy = False
    group.build_finished()  # the last build ended: terminated, not kept idle
    assert fake.status(first.instance_id).state in instances.GONE_STATES
    assert (building.released, idle.released) == (1, 1)
    second = waiting.result
    assert second.instance_id != first.instance_id and not second.retired
    assert launched == [first.instance_id, second.instance_id]


def test_a_retired_instance_is_terminated_never_stopped_for_reuse():
    _, fake, client, *_ = parts()
    instance = LaunchedInstance(client, launch(fake, "w"), "t3.micro", "img", "ami-1")
    instance.retired = DISK_FULL
    ended: list[Any] = []

    class Fleet:
        def terminate(self, client: Any, instance_id: str) -> defer.Deferred:
            ended.append(("terminate", instance_id))
            return defer.succeed("shutting-down")

        def released(self, pool: Any, *, key: str) -> None:
            ended.append(("released", pool))

    class Launcher:
        def stop_for_reuse(self, instance: Any) -> defer.Deferred:
            ended.append(("stop", instance.instance_id))
            return defer.succeed(True)

    ending.end(Fleet(), instance, Launcher(), "p", key="w", reuse=True, log_prefix="w")
    assert ended == [("terminate", instance.instance_id), ("released", "p")]


# -- drained by the master: max builds, max age (issue 21) -----------------------------


def test_the_master_drains_after_max_builds_or_max_age_on_the_fleet_clock():
    clock, fake, client, *_ = parts()
    clock.advance(1000)
    instance = LaunchedInstance(client, launch(fake, "w"), "t3.micro", "img", "ami-1",
                                launched_at=clock.seconds())
    assert retirement.due(instance, clock.seconds(), None, None) is None
    assert retirement.due(None, clock.seconds(), 1, 1) is None
    retirement.build_started(instance)
    assert retirement.due(instance, clock.seconds(), 2, None) is None
    retirement.build_started(instance)
    text = retirement.due(instance, clock.seconds(), 2, None)
    assert text == "max_builds: 2 builds started on it (max_builds_per_instance=2)"
    assert retirement.reason_code(text) == "max_builds"

    assert retirement.due(instance, clock.seconds(), None, 3600) is None
    clock.advance(3599)
    assert retirement.due(instance, clock.seconds(), None, 3600) is None
    clock.advance(1)
    text = retirement.due(instance, clock.seconds(), None, 3600)
    assert text == "max_age: launched 3600s ago (max_instance_age=3600)"
    metrics = Metrics()
    assert retirement.record(metrics, instance, text)
    assert retirement.message(instance) == f"instance {instance.instance_id} drains: {text}"
    assert metrics.counter("dockerami_retirements_total", {"reason": "max_age"}) == 1
    # Already draining: nothing more is due (counted once).
    assert retirement.due(instance, clock.seconds(), 1, 1) is None


def test_every_reason_is_seeded_in_the_metric():
    family = metrics_module.FAMILIES["dockerami_retirements_total"]
    assert set(family.seeds) == {*retirement.REASONS, "other"}


def test_the_reconciler_pass_asks_each_worker_to_drain_on_the_fleet_clock():
    clock, _fake, client, holdings, terminator, metrics = parts()

    class Draining:
        def __init__(self) -> None:
            self.instance, self.asked = None, []

        def ec2_client(self) -> defer.Deferred:
            return defer.succeed(client)

        def drain_if_due(self) -> None:
            self.asked.append(clock.seconds())

        def refresh_if_stale(self) -> defer.Deferred:
            return defer.succeed(None)

    worker = Draining()
    holdings.workers.add(worker)
    reconciler = Reconciler(clock, MASTER, holdings, terminator=terminator, metrics=metrics,
                            stopping=lambda: False)
    reconciler.start(30, first_delay=1)
    clock.advance(1)
    clock.advance(30)
    assert worker.asked == [1.0, 31.0]
    reconciler.stop()


def test_ami_refresh_asks_ec2_at_most_once_per_interval_and_names_the_newer_image():
    clock, fake, client, *_ = parts()
    clock.advance(1_800_000_000)
    fake.clock = clock.seconds
    filters = [{"Name": "name", "Values": ["base-*"]}]
    old = fake.register_image("base-1", "2026-12-01T00:00:00.000Z")
    instance = LaunchedInstance(client, launch(fake, "w"), "t3.micro", "img", old)
    checker = refresh.AmiRefresh(clock.seconds, interval=600)
    # Two instances asking at once share one DescribeImages.
    first, second = (checker.newest_for(instance, filters, None) for _ in range(2))
    assert first.result == second.result == old and checker.calls == 1
    assert not refresh.stale(old, old) and not refresh.stale("", "ami-x")
    assert not refresh.stale(old, None)  # unknown: no reason to drain

    newer = fake.register_image("base-2", "2026-12-07T00:00:00.000Z")
    clock.advance(599)
    assert checker.newest_for(instance, filters, None).result == old  # not asked again
    assert checker.calls == 1
    clock.advance(1)
    assert checker.newest_for(instance, filters, None).result == newer
    assert checker.calls == 2 and refresh.stale(old, newer)
    assert retirement.reason_code(refresh.reason(old, newer)) == "refresh_ami"
    # Filters that match nothing: unknown, remembered for the interval too.
    nothing = [{"Name": "name", "Values": ["none-*"]}]
    assert checker.newest_for(instance, nothing, None).result is None
    assert checker.newest_for(instance, nothing, None).result is None
    assert checker.calls == 3


def test_max_builds_counts_the_builds_of_every_slot_of_a_shared_instance():
    clock, fake, client, holdings, terminator, _ = parts()
    group = InstanceGroup("g", clock, terminator, holdings, lambda pool, g: None)
    holdings.groups["g"] = group
    a, b = Slot("a"), Slot("b")
    group.join(a)
    group.join(b)
    shared = group.acquire(lambda: defer.succeed((LaunchedInstance(
        client, launch(fake, "g"), "t3.micro", "img", "ami-1"), {}))).result
    metrics = Metrics()
    for slot in (a, b):  # one build on each slot, on the same instance
        slot.busy = True
        group.build_started()
        retirement.build_started(shared)
    text = retirement.due(shared, clock.seconds(), 2, None)
    assert text is not None and text.startswith("max_builds: 2 builds")
    retirement.record(metrics, shared, text)
    assert not retirement.takes_builds(shared)
    a.busy = False
    group.build_finished()  # b still builds: the instance stays
    assert fake.status(shared.instance_id).state == "running"
    b.busy = False
    group.build_finished()
    assert fake.status(shared.instance_id).state in instances.GONE_STATES
