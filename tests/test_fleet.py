"""The fleet's batching and termination logic, with a fake EC2 client and a fake clock."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from botocore.exceptions import ClientError
from twisted.internet import defer, task

from buildbot_dockerami.cloud.ec2 import CloudError
from buildbot_dockerami.cloud.instances import InstanceStatus
from buildbot_dockerami.fleet import service as fleet_module
from buildbot_dockerami.fleet import termination
from buildbot_dockerami.fleet.monitor import StateMonitor
from buildbot_dockerami.fleet.service import Fleet
from tests.fleet_reactor import ThreadedReactor


class FakeEc2:
    def __init__(self) -> None:
        self.describes: list[list[str]] = []
        self.terminates = 0
        self.pending: list[defer.Deferred] = []
        self.hold = False
        self.states: dict[str, str] = {}
        self.terminate_failures = 0

    def describe(self, ids: list[str]) -> defer.Deferred:
        self.describes.append(list(ids))
        result = {i: InstanceStatus(i, self.states.get(i, "pending")) for i in ids}
        if self.hold:
            d: defer.Deferred = defer.Deferred()
            self.pending.append(d)
            d.addCallback(lambda _: result)
            return d
        return defer.succeed(result)

    def terminate(self, ids: list[str]) -> defer.Deferred:
        self.terminates += 1
        if self.terminate_failures:
            self.terminate_failures -= 1
            return defer.fail(ClientError({"Error": {"Code": "RequestLimitExceeded",
                                                     "Message": "slow down"}}, "Terminate"))
        return defer.succeed(dict.fromkeys(ids, "shutting-down"))


def results(d: defer.Deferred) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "deferred has not fired"
    return out[0]


def test_many_instances_one_describe_per_interval() -> None:
    clock = task.Clock()
    monitor, ec2 = StateMonitor(clock=clock.seconds), FakeEc2()
    ids = [f"i-{n}" for n in range(20)]
    for iid in ids:
        monitor.watch(ec2, iid)  # type: ignore[arg-type]
    for step in range(3):
        for iid in ids:
            clock.advance(0.01)
            assert results(monitor.status(iid, max_age=0.8)).state == "pending"
        clock.advance(1)
        assert len(ec2.describes) == step + 1
    assert sorted(ec2.describes[0]) == sorted(ids)


def test_concurrent_askers_share_the_call_in_flight() -> None:
    clock = task.Clock()
    monitor, ec2 = StateMonitor(clock=clock.seconds), FakeEc2()
    ec2.hold = True
    for iid in ("i-a", "i-b", "i-c"):
        monitor.watch(ec2, iid)  # type: ignore[arg-type]
    waiting = [monitor.status(iid, 0.5) for iid in ("i-a", "i-b", "i-c")]
    assert len(ec2.describes) == 1
    ec2.states["i-b"] = "terminated"
    ec2.pending.pop().callback(None)
    assert [results(d).state for d in waiting] == ["pending", "pending", "pending"]


def test_failed_poll_is_not_cached() -> None:
    clock = task.Clock()
    monitor = StateMonitor(clock=clock.seconds)

    class Failing(FakeEc2):
        def describe(self, ids: list[str]) -> defer.Deferred:
            self.describes.append(ids)
            return defer.fail(RuntimeError("boom"))

    ec2 = Failing()
    monitor.watch(ec2, "i-a")  # type: ignore[arg-type]
    assert isinstance(results(monitor.status("i-a", 10)).value, RuntimeError)
    results(monitor.status("i-a", 10))
    assert len(ec2.describes) == 2


def test_unwatched_instance_has_no_status() -> None:
    monitor = StateMonitor()
    assert results(monitor.status("i-x", 1)) is None


def test_terminate_retries_then_confirms() -> None:
    clock = task.Clock()
    fleet, ec2 = Fleet(clock, "host:/basedir"), FakeEc2()
    ec2.terminate_failures = 2
    d = fleet.terminate(ec2, "i-1")  # type: ignore[arg-type]
    clock.advance(1)
    clock.advance(2)
    assert results(d) == "shutting-down"
    assert ec2.terminates == 3
    assert fleet.undead == []


def test_terminate_that_keeps_failing_is_reported_and_retried_in_background() -> None:
    clock = task.Clock()
    fleet, ec2 = Fleet(clock, "host:/basedir"), FakeEc2()
    ec2.terminate_failures = 100
    d = fleet.terminate(ec2, "i-1")  # type: ignore[arg-type]
    for _ in range(10):
        clock.advance(30)
    failure = results(d)
    assert isinstance(failure.value, CloudError) and "i-1" in str(failure.value)
    assert fleet.undead == ["i-1"]
    ec2.terminate_failures = 0
    clock.advance(60)
    assert fleet.undead == []


@pytest.mark.parametrize("code", ["InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed"])
def test_terminate_of_an_unknown_instance_is_done(code: str) -> None:
    fleet = Fleet(task.Clock(), "host:/b")

    class Gone(FakeEc2):
        def terminate(self, ids: list[str]) -> defer.Deferred:
            return defer.fail(ClientError({"Error": {"Code": code, "Message": "x"}}, "T"))

    assert results(fleet.terminate(Gone(), "i-1")) == "terminated"  # type: ignore[arg-type]


def test_concurrent_terminations_of_one_instance_share_one_call_and_its_failure():
    clock = task.Clock()
    fleet, ec2 = Fleet(clock, "host:/basedir"), FakeEc2()
    ec2.terminate_failures = 100
    first, second = fleet.terminate(ec2, "i-1"), fleet.terminate(ec2, "i-1")
    assert fleet.in_progress("i-1")
    assert ec2.terminates == 1, "the second caller must wait for the first termination"
    for _ in range(10):
        clock.advance(60)
    for d in (first, second):  # both callers see the failure (and handle it)
        assert results(d).check(CloudError)
    assert fleet.in_progress("i-1")  # kept on the background retry list
    ec2.terminate_failures = 0
    clock.advance(60)
    assert not fleet.in_progress("i-1")


def test_an_ended_instance_is_remembered_and_the_memory_is_bounded(monkeypatch):
    """A worker reconnecting from an instance this master ended needs no EC2 call."""
    monkeypatch.setattr(termination, "ENDED_MEMORY", 3)
    clock = task.Clock()
    fleet, ec2 = Fleet(clock, "host:/basedir"), FakeEc2()
    assert not fleet.ending_or_ended("i-1")
    ec2.terminate_failures = 1
    d = fleet.terminate(ec2, "i-1")
    assert fleet.ending_or_ended("i-1")  # in progress
    clock.advance(60)
    assert results(d) == "shutting-down"
    assert fleet.ending_or_ended("i-1") and not fleet.in_progress("i-1")
    for n in range(2, 5):
        results(fleet.terminate(ec2, f"i-{n}"))
    assert not fleet.ending_or_ended("i-1")  # the oldest is forgotten
    assert all(fleet.ending_or_ended(f"i-{n}") for n in range(2, 5))


def test_callers_arriving_while_the_client_is_built_share_it(monkeypatch) -> None:
    """Building a boto3 client costs ~0.2 CPU-s: workers configured together, or a
    burst's first launches, must wait for one, not each build their own."""
    built: list[tuple[Any, ...]] = []
    release = threading.Event()

    def slow_ec2(*args: Any, **kwargs: Any) -> object:
        built.append(args)
        release.wait(10)
        return object()

    monkeypatch.setattr(fleet_module, "Ec2", slow_ec2)
    reactor = ThreadedReactor()
    fleet = Fleet(reactor, "host:/basedir")
    try:
        first = fleet.client("us-east-1", "http://127.0.0.1:9", None)
        second = fleet.client("us-east-1", "http://127.0.0.1:9", None)
        other_region = fleet.client("eu-west-1", "http://127.0.0.1:9", None)
        release.set()
        reactor.run_handed_back(2)
        assert len(built) == 2  # one per region, not one per caller
        client = results(first)
        assert results(second) is client
        assert results(other_region) is not client
        assert results(fleet.client("us-east-1", "http://127.0.0.1:9", None)) is client
        assert len(built) == 2  # built once: later callers get it at once
    finally:
        fleet._stop()
