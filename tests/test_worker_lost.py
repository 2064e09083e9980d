"""One lost instance, one record: the reconciler (instance_lost) and a lost connection
(_why_lost) may both report it, in either order, and every slot of a shared instance
hears of it. Real workers and Fleet, a stand-in master and EC2 client, a fake clock;
test_faults.py makes both reports race on a real master and the local cloud."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from buildbot.worker.latent import States
from twisted.internet import defer, task

from buildbot_dockerami.cloud.instances import InstanceStatus
from buildbot_dockerami.fleet.launch import LaunchedInstance
from buildbot_dockerami.fleet.service import Fleet
from buildbot_dockerami.worker.latent import DockerAMILatentWorker

LOST = InstanceStatus("i-1", "terminated", "Client.UserInitiatedShutdown: User initiated")
REASON = "instance i-1 terminated: Client.UserInitiatedShutdown: User initiated"


class SlowEc2:
    """DescribeInstances answers only when the test says (``answer``)."""

    def __init__(self) -> None:
        self.pending: list[defer.Deferred] = []
        self.terminated: list[str] = []

    def describe(self, ids: list[str]) -> defer.Deferred:
        self.pending.append(defer.Deferred())
        return self.pending[-1]

    def answer(self, status: InstanceStatus) -> None:
        self.pending.pop(0).callback({status.instance_id: status})

    def terminate(self, ids: list[str]) -> defer.Deferred:
        self.terminated += ids
        return defer.succeed(dict.fromkeys(ids, "terminated"))


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
def client() -> SlowEc2:
    return SlowEc2()


@pytest.fixture
def instance(client: SlowEc2) -> LaunchedInstance:
    return LaunchedInstance(client, "i-1", "t3.micro", "org/img:1", "ami-12345678")


def test_the_reconciler_first_then_the_lost_connections_answer(fleet, client, instance):
    worker = connected_worker(fleet, "w0", instance)
    why = worker._why_lost(instance)  # the connection dropped; EC2 is slow to answer
    worker.instance_lost(LOST)
    assert (lost_count(fleet), worker.last_failure) == (1, REASON)
    assert released(worker) and client.terminated == ["i-1"]
    # A newer failure stands; the late answer about the old instance changes nothing.
    worker._count_failure("RunInstances:Unsupported", "RunInstances failed: Unsupported")
    client.answer(LOST)
    assert succeeded(why) and lost_count(fleet) == 1
    assert worker.last_failure == "RunInstances failed: Unsupported"


def test_the_lost_connections_answer_first_then_the_reconciler(fleet, client, instance):
    worker = connected_worker(fleet, "w0", instance)
    why = worker._why_lost(instance)
    client.answer(LOST)
    assert succeeded(why) and released(worker)
    worker.instance_lost(LOST)  # the reconciler's pass, from before the release
    assert (lost_count(fleet), worker.last_failure) == (1, REASON)


def test_a_shared_instance_is_counted_once_and_every_slot_says_why(fleet, client, instance):
    group = fleet.group("g")
    slots = []
    for name in ("g-1", "g-2"):
        worker = connected_worker(fleet, name, instance)
        worker.group = group
        group.join(worker)
        slots.append(worker)
    group.instance = instance
    for owner in [*slots, group]:  # as the reconciler tells every owner
        owner.instance_lost(LOST)
    assert lost_count(fleet) == 1
    assert [w.last_failure for w in slots] == [REASON, REASON]
    assert all(released(w) for w in slots) and client.terminated == ["i-1"]


def test_a_spot_reclaim_is_counted_with_its_loss_once(fleet, client, instance):
    spot = InstanceStatus("i-1", "terminated", "Server.SpotInstanceTermination: Spot")
    worker = connected_worker(fleet, "w0", instance)
    why = worker._why_lost(instance)
    worker.instance_lost(spot)
    client.answer(spot)
    assert succeeded(why) and released(worker)
    assert fleet.metrics.counter("dockerami_spot_interruptions_total") == 1
