"""launch.Launcher on a real Fleet with a scripted EC2 client and a fake clock: the
order of capacity options, lost answers, the stopped pool. The same paths run against
the local cloud in test_fallback.py, test_faults.py and test_warmpool.py."""

from __future__ import annotations

from typing import Any

import pytest
from botocore.exceptions import ClientError
from twisted.internet import defer, task

from buildbot_dockerami.cloud import instances
from buildbot_dockerami.cloud.ec2 import LaunchSpec
from buildbot_dockerami.cloud.instances import InstanceStatus
from buildbot_dockerami.fleet import fallback
from buildbot_dockerami.fleet.launch import LaunchedInstance, Launcher, LaunchFailed
from buildbot_dockerami.fleet.service import Fleet

SPEC = LaunchSpec(ami="ami-1", instance_type="", user_data="w0 pw 127.0.0.1:9989\nimg",
                  tags={"team": "ci"})


def refused(code: str, message: str = "no") -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": message}}, "RunInstances")


class ScriptedEc2:
    """Answers RunInstances from ``outcomes`` in order (an InstanceStatus, or an error
    to raise); remembers what EC2 would hold, for lookups by tag and state."""

    def __init__(self, *outcomes: Any) -> None:
        self.outcomes = list(outcomes)
        self.specs: list[LaunchSpec] = []
        self.states: dict[str, str] = {}
        self.tokens: dict[str, str] = {}
        self.user_data: dict[str, str] = {}

    def run_instance(self, spec: LaunchSpec) -> defer.Deferred:
        self.specs.append(spec)
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, tuple):  # (launched, error): EC2 acted, the answer is lost
            launched, outcome = outcome
            self.states[launched] = "pending"
            self.tokens[launched] = spec.client_token
        if isinstance(outcome, Exception):
            return defer.fail(outcome)
        self.states[outcome.instance_id] = outcome.state
        return defer.succeed(outcome)

    def describe_tagged(self, tag: str, value: str) -> defer.Deferred:
        assert tag == instances.LAUNCH_TAG
        return defer.succeed({i: InstanceStatus(i, self.states[i]) for i, token
                              in self.tokens.items() if token == value})

    def describe(self, ids: list[str]) -> defer.Deferred:
        return defer.succeed({i: InstanceStatus(i, self.states[i]) for i in ids
                              if i in self.states})

    def terminate(self, ids: list[str]) -> defer.Deferred:
        self.states.update(dict.fromkeys(ids, "shutting-down"))
        return defer.succeed(dict.fromkeys(ids, "shutting-down"))

    def stop(self, ids: list[str]) -> defer.Deferred:
        self.states.update(dict.fromkeys(ids, "stopped"))
        return defer.succeed(dict.fromkeys(ids, "stopping"))

    def start(self, ids: list[str]) -> defer.Deferred:
        self.states.update(dict.fromkeys(ids, "pending"))
        return defer.succeed(dict.fromkeys(ids, "pending"))

    def set_user_data(self, instance_id: str, user_data: str) -> defer.Deferred:
        self.user_data[instance_id] = user_data
        return defer.succeed(None)


@pytest.fixture
def fleet() -> Fleet:
    clock = task.Clock()
    clock.advance(1000)
    return Fleet(clock, "master-a")


def run(d: defer.Deferred) -> Any:
    """The result of a Deferred that the scripted client has already fired."""
    results: list[Any] = []
    d.addBoth(results.append)
    (result,) = results
    if hasattr(result, "raiseException"):
        result.raiseException()
    return result


def launch(fleet: Fleet, client: ScriptedEc2, instance_types: Any = "t3.micro",
           timeline: dict[str, float] | None = None, **kwargs: Any) -> Any:
    note = (timeline if timeline is not None else {}).__setitem__
    launcher = Launcher(fleet, "w0", "<worker 'w0'>", note)
    settings = {"image": "org/img:1", "key": "k1", "serves": ["w0"], "reuse": False, **kwargs}
    return run(launcher.launch(client, SPEC, fallback.options(instance_types, None, "on-demand"),
                               **settings))


def test_a_capacity_refusal_launches_the_next_type_and_cools_the_first(fleet):
    client = ScriptedEc2(refused("InsufficientInstanceCapacity"),
                         InstanceStatus("i-2", "pending", availability_zone="az-b"))
    timeline: dict[str, float] = {}
    instance = launch(fleet, client, ["m5.large", "c5.large"], timeline)
    assert (instance.instance_id, instance.instance_type, instance.availability_zone) == (
        "i-2", "c5.large", "az-b")
    assert [s.instance_type for s in client.specs] == ["m5.large", "c5.large"]
    assert list(timeline) == ["fallback 1: m5.large (on-demand): InsufficientInstanceCapacity"]
    assert fleet.metrics.counter("dockerami_launch_fallbacks_total",
                                 {"code": "InsufficientInstanceCapacity"}) == 1
    assert fleet.metrics.counter("dockerami_instance_launches_total", {"worker": "w0"}) == 1
    # Every attempt has its own token, as a tag too, with the operator's tags and ownership.
    first, second = client.specs
    assert first.client_token and first.client_token != second.client_token
    assert second.tags[instances.LAUNCH_TAG] == second.client_token
    assert second.tags["team"] == "ci" and second.tags[instances.WORKER_TAG] == "w0"
    assert second.tags[instances.MASTER_TAG] == fleet.master_id
    assert fleet.launching == {}, "no launch is left in flight"
    # The next launch goes straight to the type that worked.
    client.outcomes.append(InstanceStatus("i-3", "pending"))
    assert launch(fleet, client, ["m5.large", "c5.large"]).instance_type == "c5.large"


def test_the_last_option_refused_fails_the_launch_with_ec2s_words(fleet):
    client = ScriptedEc2(refused("InsufficientInstanceCapacity", "none left"))
    with pytest.raises(LaunchFailed) as failed:
        launch(fleet, client)
    assert failed.value.reason == "RunInstances:InsufficientInstanceCapacity"
    assert failed.value.message == (
        "RunInstances failed: InsufficientInstanceCapacity: none left")


def test_a_launch_whose_answer_is_lost_is_found_by_its_token(fleet):
    client = ScriptedEc2(("i-lost", ConnectionError("answer lost")))
    instance = launch(fleet, client)
    assert instance.instance_id == "i-lost"
    assert fleet.metrics.counter("dockerami_launch_answers_lost_total",
                                 {"outcome": "found"}) == 1


def test_a_launch_that_never_reached_ec2_fails_as_not_launched(fleet):
    client = ScriptedEc2(ConnectionError("hung up"))
    with pytest.raises(LaunchFailed) as failed:
        launch(fleet, client)
    assert failed.value.reason == "RunInstances:no_answer"
    assert failed.value.message == "RunInstances gave no answer (hung up); not launched"
    assert fleet.metrics.counter("dockerami_launch_answers_lost_total",
                                 {"outcome": "not_found"}) == 1


def stopped_instance(fleet: Fleet, client: ScriptedEc2, key: str) -> LaunchedInstance:
    client.states["i-old"] = "running"
    instance = LaunchedInstance(client, "i-old", "t3.micro", "org/img:1", "ami-1",
                                launched_at=1.0, key=key)
    assert run(Launcher(fleet, "w0", "w0", lambda *_: None).stop_for_reuse(instance))
    assert fleet.stopped.by_instance().keys() == {"i-old"}
    return instance


def test_a_matching_stopped_instance_is_started_with_the_new_user_data(fleet):
    client = ScriptedEc2()  # no RunInstances expected
    stopped_instance(fleet, client, "k1")
    timeline: dict[str, float] = {}
    instance = launch(fleet, client, timeline=timeline, reuse=True)
    assert instance.instance_id == "i-old" and instance.launched_at == fleet.reactor.seconds()
    assert client.user_data == {"i-old": SPEC.user_data}
    assert client.states["i-old"] == "pending" and not client.specs
    assert "started_from_stopped" in timeline and not fleet.stopped.entries


def test_a_stale_stopped_instance_is_terminated_and_a_new_one_launched(fleet):
    client = ScriptedEc2(InstanceStatus("i-new", "pending"))
    stopped_instance(fleet, client, "k-other-settings")
    instance = launch(fleet, client, reuse=True)
    assert instance.instance_id == "i-new"
    assert client.states["i-old"] == "shutting-down" and not fleet.stopped.entries
