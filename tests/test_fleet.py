"""The fleet's batching and termination logic, on the in-memory FakeEc2 and a fake clock."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from botocore.exceptions import ClientError
from twisted.internet import defer, task

from buildbot_dockerami.cloud.ec2 import AsyncEc2, CloudError, LaunchSpec
from buildbot_dockerami.cloud.testing import FakeEc2, InlineThreads
from buildbot_dockerami.fleet import service as fleet_module
from buildbot_dockerami.fleet import termination
from buildbot_dockerami.fleet.monitor import StateMonitor
from buildbot_dockerami.fleet.service import Fleet
from tests.fleet_reactor import ThreadedReactor

SPEC = LaunchSpec(ami="ami-1", instance_type="t3.micro",
                  user_data="w0 pw 127.0.0.1:9989\nimg", tags={"team": "ci"})


def ec2_with(count: int) -> tuple[FakeEc2, InlineThreads, AsyncEc2, list[str]]:
    """A FakeEc2 holding ``count`` instances, and an AsyncEc2 over it that answers at
    once (or, for what ``InlineThreads.hold`` names, when the test says)."""
    fake, threads = FakeEc2(), InlineThreads()
    ids = [fake.run_instance(SPEC).instance_id for _ in range(count)]
    return fake, threads, threads.client(fake), ids


def results(d: defer.Deferred) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "deferred has not fired"
    return out[0]


def test_many_instances_one_describe_per_interval() -> None:
    clock = task.Clock()
    monitor = StateMonitor(clock=clock.seconds)
    fake, _, ec2, ids = ec2_with(20)
    for iid in ids:
        monitor.watch(ec2, iid)
    for step in range(3):
        for iid in ids:
            clock.advance(0.01)
            assert results(monitor.status(iid, max_age=0.8)).state == "running"
        clock.advance(1)
        assert fake.count("DescribeInstances") == step + 1
    assert sorted(fake.requests("DescribeInstances")[0]) == sorted(ids)


def test_concurrent_askers_share_the_call_in_flight() -> None:
    clock = task.Clock()
    monitor = StateMonitor(clock=clock.seconds)
    fake, threads, ec2, ids = ec2_with(3)
    threads.hold("DescribeInstances")
    for iid in ids:
        monitor.watch(ec2, iid)
    waiting = [monitor.status(iid, 0.5) for iid in ids]
    assert fake.count("DescribeInstances") == 1
    fake.terminated_elsewhere([ids[1]])  # after the call: its answer does not say so
    assert threads.release("DescribeInstances") == 1
    assert [results(d).state for d in waiting] == ["running", "running", "running"]


def test_failed_poll_is_not_cached() -> None:
    clock = task.Clock()
    monitor = StateMonitor(clock=clock.seconds)
    fake, _, ec2, (iid,) = ec2_with(1)
    fake.inject("DescribeInstances", "InternalError", "boom", count=2, status=500)
    monitor.watch(ec2, iid)
    assert isinstance(results(monitor.status(iid, 10)).value, ClientError)
    results(monitor.status(iid, 10))
    assert fake.count("DescribeInstances") == 2


def test_unwatched_instance_has_no_status() -> None:
    monitor = StateMonitor()
    assert results(monitor.status("i-x", 1)) is None


def test_terminate_retries_then_confirms() -> None:
    clock = task.Clock()
    fleet = Fleet(clock, "host:/basedir")
    fake, _, ec2, (iid,) = ec2_with(1)
    fake.inject("TerminateInstances", "RequestLimitExceeded", "slow down", count=2, status=503)
    d = fleet.terminate(ec2, iid)
    clock.advance(1)
    clock.advance(2)
    assert results(d) == "shutting-down"
    assert fake.count("TerminateInstances") == 3
    assert fleet.undead == []


def test_terminate_that_keeps_failing_is_reported_and_retried_in_background() -> None:
    clock = task.Clock()
    fleet = Fleet(clock, "host:/basedir")
    fake, _, ec2, (iid,) = ec2_with(1)
    fake.throttle("TerminateInstances", count=100)
    d = fleet.terminate(ec2, iid)
    for _ in range(10):
        clock.advance(30)
    failure = results(d)
    assert isinstance(failure.value, CloudError) and iid in str(failure.value)
    assert fleet.undead == [iid]
    fake.clear()
    clock.advance(60)
    assert fleet.undead == []


@pytest.mark.parametrize("code", ["InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed"])
def test_terminate_of_an_unknown_instance_is_done(code: str) -> None:
    fleet = Fleet(task.Clock(), "host:/b")
    fake, _, ec2, _ = ec2_with(0)
    if code != "InvalidInstanceID.NotFound":  # what moto (and so the fake) says of "i-1"
        fake.inject("TerminateInstances", code, "x")
    assert results(fleet.terminate(ec2, "i-1")) == "terminated"
    assert fake.count("TerminateInstances") == 1


def test_concurrent_terminations_of_one_instance_share_one_call_and_its_failure():
    clock = task.Clock()
    fleet = Fleet(clock, "host:/basedir")
    fake, _, ec2, (iid,) = ec2_with(1)
    fake.throttle("TerminateInstances", count=100)
    first, second = fleet.terminate(ec2, iid), fleet.terminate(ec2, iid)
    assert fleet.in_progress(iid)
    assert fake.count("TerminateInstances") == 1, (
        "the second caller must wait for the first termination")
    for _ in range(10):
        clock.advance(60)
    for d in (first, second):  # both callers see the failure (and handle it)
        assert results(d).check(CloudError)
    assert fleet.in_progress(iid)  # kept on the background retry list
    fake.clear()
    clock.advance(60)
    assert not fleet.in_progress(iid)


def test_an_ended_instance_is_remembered_and_the_memory_is_bounded(monkeypatch):
    """A worker reconnecting from an instance this master ended needs no EC2 call."""
    monkeypatch.setattr(termination, "ENDED_MEMORY", 3)
    clock = task.Clock()
    fleet = Fleet(clock, "host:/basedir")
    fake, _, ec2, ids = ec2_with(4)
    assert not fleet.ending_or_ended(ids[0])
    fake.throttle("TerminateInstances")
    d = fleet.terminate(ec2, ids[0])
    assert fleet.ending_or_ended(ids[0])  # in progress
    clock.advance(60)
    assert results(d) == "shutting-down"
    assert fleet.ending_or_ended(ids[0]) and not fleet.in_progress(ids[0])
    for iid in ids[1:]:
        results(fleet.terminate(ec2, iid))
    assert not fleet.ending_or_ended(ids[0])  # the oldest is forgotten
    assert all(fleet.ending_or_ended(iid) for iid in ids[1:])


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
