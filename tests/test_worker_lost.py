"""One lost instance, one record: the reconciler (instance_lost) and a lost connection
(_why_lost) may both report it, in either order, and every slot of a shared instance
hears of it. Real workers and Fleet, a stand-in master, the in-memory FakeEc2, a fake clock;
test_faults.py makes both reports race on a real master and the local cloud."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from buildbot.worker.latent import States
from twisted.internet import defer, task

from buildbot_dockerami.cloud.ec2 import LaunchSpec
from buildbot_dockerami.cloud.instances import InstanceStatus
from buildbot_dockerami.cloud.testing import FakeEc2, InlineThreads
from buildbot_dockerami.config.model import WorkerSettings
from buildbot_dockerami.fleet.launch import LaunchedInstance
from buildbot_dockerami.fleet.service import Fleet
from buildbot_dockerami.worker.latent import DockerAMILatentWorker


@pytest.fixture
def fleet() -> Fleet:
    return Fleet(task.Clock(), "master-a")


def connected_worker(fleet: Fleet, name: str, instance: LaunchedInstance) -> Any:
    worker = DockerAMILatentWorker(name, image="org/img:1", ami="ami-12345678",
                                   instance_type="t3.micro", region="us-east-1",
                                   master_address="127.0.0.1:9989")
    botmaster = SimpleNamespace(builders={}, maybeStartBuildsForWorker=lambda name: None)
    worker.parent = SimpleNamespace(master=SimpleNamespace(reactor=fleet.reactor,
                                                           botmaster=botmaster))
    worker.fleet = fleet
    worker.instance = instance
    worker.state = States.SUBSTANTIATED
    worker._connected = True
    return worker


def succeeded(d: defer.Deferred) -> bool:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results == [None], results
    return True


def released(worker: Any) -> bool:
    """buildbot's insubstantiation ran to its end: the worker waits for its next build."""
    return worker.instance is None and worker.state == States.NOT_SUBSTANTIATED


def lost_count(fleet: Fleet) -> float:
    return fleet.metrics.counter("dockerami_instances_lost_total", {"state": "terminated"})


@pytest.fixture
def fake() -> FakeEc2:
    return FakeEc2()


@pytest.fixture
def threads() -> InlineThreads:
    """DescribeInstances answers only when the test says (``release``)."""
    threads = InlineThreads()
    threads.hold("DescribeInstances")
    return threads


def launched(fake: FakeEc2, threads: InlineThreads,
             market: str = "on-demand") -> LaunchedInstance:
    spec = LaunchSpec(ami="ami-12345678", instance_type="t3.micro",
                      user_data="w0 pw 127.0.0.1:9989\norg/img:1", tags={"team": "ci"},
                      market=market)
    return LaunchedInstance(threads.client(fake), fake.run_instance(spec).instance_id,
                            "t3.micro", "org/img:1", "ami-12345678", market=market)


@pytest.fixture
def instance(fake: FakeEc2, threads: InlineThreads) -> LaunchedInstance:
    return launched(fake, threads)


def lost(fake: FakeEc2, instance: LaunchedInstance) -> InstanceStatus:
    """Someone terminates the instance (the console): what EC2 then says of it."""
    fake.terminated_elsewhere([instance.instance_id])
    return fake.status(instance.instance_id)


def reason(instance: LaunchedInstance) -> str:
    return (f"instance {instance.instance_id} terminated: "
            "Client.UserInitiatedShutdown: User initiated shutdown")


def terminations(fake: FakeEc2) -> list[str]:
    """What this master asked to terminate."""
    return [iid for ids in fake.requests("TerminateInstances") for iid in ids]


def test_the_reconciler_first_then_the_lost_connections_answer(fleet, fake, threads, instance):
    status = lost(fake, instance)
    worker = connected_worker(fleet, "w0", instance)
    why = worker._why_lost(instance)  # the connection dropped; EC2 is slow to answer
    worker.instance_lost(status)
    assert (lost_count(fleet), worker.last_failure) == (1, reason(instance))
    assert released(worker) and terminations(fake) == [instance.instance_id]
    # A newer failure stands; the late answer about the old instance changes nothing.
    worker._count_failure("RunInstances:Unsupported", "RunInstances failed: Unsupported")
    assert threads.release("DescribeInstances", count=1) == 1
    assert succeeded(why) and lost_count(fleet) == 1
    assert worker.last_failure == "RunInstances failed: Unsupported"


def test_the_lost_connections_answer_first_then_the_reconciler(fleet, fake, threads, instance):
    status = lost(fake, instance)
    worker = connected_worker(fleet, "w0", instance)
    why = worker._why_lost(instance)
    assert threads.release("DescribeInstances", count=1) == 1
    assert succeeded(why) and released(worker)
    worker.instance_lost(status)  # the reconciler's pass, from before the release
    assert (lost_count(fleet), worker.last_failure) == (1, reason(instance))


def test_a_shared_instance_is_counted_once_and_every_slot_says_why(fleet, fake, instance):
    status = lost(fake, instance)
    group = fleet.group("g")
    slots = []
    for name in ("g-1", "g-2"):
        worker = connected_worker(fleet, name, instance)
        worker.group = group
        group.join(worker)
        slots.append(worker)
    group.instance = instance
    for owner in [*slots, group]:  # as the reconciler tells every owner
        owner.instance_lost(status)
    assert lost_count(fleet) == 1
    assert [w.last_failure for w in slots] == [reason(instance), reason(instance)]
    assert all(released(w) for w in slots) and terminations(fake) == [instance.instance_id]


def test_a_spot_reclaim_is_counted_with_its_loss_once(fleet, fake, threads):
    instance = launched(fake, threads, "spot")
    fake.reclaim_spot(instance.instance_id)
    worker = connected_worker(fleet, "w0", instance)
    why = worker._why_lost(instance)
    worker.instance_lost(fake.status(instance.instance_id))
    assert threads.release("DescribeInstances", count=1) == 1
    assert succeeded(why) and released(worker)
    assert fleet.metrics.counter("dockerami_spot_interruptions_total") == 1


def test_a_busy_worker_past_max_instance_age_drains_and_ends_only_after_its_build(
        fleet, fake, threads, instance):
    """The master's drain (fleet/retirement.py) on the fleet's clock: no new build, the
    running one is never killed, then the instance is terminated."""
    threads.release("DescribeInstances")
    worker = connected_worker(fleet, "w0", instance)
    worker.botmaster.maybeStartBuildsForAllBuilders = lambda: None
    worker.settings = WorkerSettings(max_instance_age=3600)
    fleet.reactor.advance(100)
    instance.launched_at = fleet.reactor.seconds()
    class Running:  # a WorkerForBuilder with a build on it
        running = True

        def isBusy(self) -> bool:
            return self.running

    build = Running()
    worker.workerforbuilders = {"b": build}
    fleet.reactor.advance(3599)
    worker.drain_if_due()
    assert not instance.retired
    fleet.reactor.advance(1)
    assert not worker.canStartBuild()  # due: no build handed to it, drained at once
    fleet.reactor.advance(0)
    assert instance.retired == "max_age: launched 3600s ago (max_instance_age=3600)"
    assert fleet.metrics.counter("dockerami_retirements_total", {"reason": "max_age"}) == 1
    assert terminations(fake) == []  # its build runs on
    assert not worker.last_failure  # a drain is no failure
    build.running = False
    worker.maybeShutdown()  # as each build finishes
    assert instance.instance_id in terminations(fake)
