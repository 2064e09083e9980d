"""launch.Launcher on a real Fleet with the in-memory FakeEc2 and a fake clock: the
order of capacity options, lost answers, the stopped pool. The same paths run against
the local cloud in test_fallback.py, test_faults.py and test_warmpool.py."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from twisted.internet import task

from buildbot_dockerami.cloud import instances
from buildbot_dockerami.cloud.ec2 import AsyncEc2, LaunchSpec
from buildbot_dockerami.cloud.testing import FakeEc2
from buildbot_dockerami.fleet import fallback
from buildbot_dockerami.fleet.launch import LaunchedInstance, Launcher, LaunchFailed
from buildbot_dockerami.fleet.service import Fleet
from tests.helpers import run

SPEC = LaunchSpec(ami="ami-1", instance_type="", user_data="w0 pw 127.0.0.1:9989\nimg",
                  tags={"team": "ci"})


@pytest.fixture
def fleet() -> Fleet:
    clock = task.Clock()
    clock.advance(1000)
    return Fleet(clock, "master-a")






def launch(fleet: Fleet, client: AsyncEc2, instance_types: Any = "t3.micro",
           timeline: dict[str, float] | None = None, **kwargs: Any) -> Any:
    note = (timeline if timeline is not None else {}).__setitem__
    launcher = Launcher(fleet, "w0", "<worker 'w0'>", note)
    settings = {"image": "org/img:1", "key": "k1", "serves": ["w0"], "reuse": False, **kwargs}
    return run(launcher.launch(client, SPEC, fallback.options(instance_types, None, "on-demand"),
                               **settings))


def test_a_capacity_refusal_launches_the_next_type_and_cools_the_first(fleet, fake, client):
    fake.inject("RunInstances", "InsufficientInstanceCapacity", "no")
    timeline: dict[str, float] = {}
    instance = launch(fleet, client, ["m5.large", "c5.large"], timeline)
    (launched,) = fake.instances.values()
    assert (instance.instance_id, instance.instance_type, instance.availability_zone) == (
        launched.instance_id, "c5.large", launched.availability_zone)
    specs = fake.requests("RunInstances")
    assert [s.instance_type for s in specs] == ["m5.large", "c5.large"]
    assert list(timeline) == ["fallback 1: m5.large (on-demand): InsufficientInstanceCapacity"]
    assert fleet.metrics.counter("dockerami_launch_fallbacks_total",
                                 {"code": "InsufficientInstanceCapacity"}) == 1
    assert fleet.metrics.counter("dockerami_instance_launches_total", {"worker": "w0"}) == 1
    # Every attempt has its own token, as a tag too, with the operator's tags and ownership.
    first, second = specs
    assert first.client_token and first.client_token != second.client_token
    assert second.tags[instances.LAUNCH_TAG] == second.client_token
    assert second.tags["team"] == "ci" and second.tags[instances.WORKER_TAG] == "w0"
    assert second.tags[instances.MASTER_TAG] == fleet.master_id
    assert fleet.launching == {}, "no launch is left in flight"
    # The next launch goes straight to the type that worked.
    assert launch(fleet, client, ["m5.large", "c5.large"]).instance_type == "c5.large"


def test_the_last_option_refused_fails_the_launch_with_ec2s_words(fleet, fake, client):
    fake.inject("RunInstances", "InsufficientInstanceCapacity", "none left")
    with pytest.raises(LaunchFailed) as failed:
        launch(fleet, client)
    assert failed.value.reason == "RunInstances:InsufficientInstanceCapacity"
    assert failed.value.message == (
        "RunInstances failed: InsufficientInstanceCapacity: none left")


def test_a_launch_whose_answer_is_lost_is_found_by_its_token(fleet, fake, client):
    fake.drop("RunInstances", error=ConnectionError("answer lost"))
    instance = launch(fleet, client)
    (lost,) = fake.instances
    assert instance.instance_id == lost
    # Looked up by its launch tag (the token), not by anything that could match another.
    token = fake.instances[lost].client_token
    assert fake.requests("DescribeInstances") == [{f"tag:{instances.LAUNCH_TAG}": token}]
    assert fleet.metrics.counter("dockerami_launch_answers_lost_total",
                                 {"outcome": "found"}) == 1


def test_a_launch_that_never_reached_ec2_fails_as_not_launched(fleet, fake, client):
    fake.hang("RunInstances", error=ConnectionError("hung up"))
    with pytest.raises(LaunchFailed) as failed:
        launch(fleet, client)
    assert not fake.instances
    assert failed.value.reason == "RunInstances:no_answer"
    assert failed.value.message == "RunInstances gave no answer (hung up); not launched"
    assert fleet.metrics.counter("dockerami_launch_answers_lost_total",
                                 {"outcome": "not_found"}) == 1


def stopped_instance(fleet: Fleet, fake: FakeEc2, client: AsyncEc2,
                     key: str, **fields: Any) -> LaunchedInstance:
    """The owner's instance, launched with an older credential, stopped for reuse."""
    old = fake.run_instance(dataclasses.replace(SPEC, user_data="w0 old 127.0.0.1:9989\nimg"))
    instance = LaunchedInstance(client, old.instance_id, "t3.micro", "org/img:1", "ami-1",
                                launched_at=1.0, key=key, **fields)
    assert run(Launcher(fleet, "w0", "w0", lambda *_: None).stop_for_reuse(instance))
    assert fleet.stopped.by_instance().keys() == {old.instance_id}
    return instance


def test_a_matching_stopped_instance_is_started_with_the_new_user_data(fleet, fake, client):
    old = stopped_instance(fleet, fake, client, "k1").instance_id
    timeline: dict[str, float] = {}
    instance = launch(fleet, client, timeline=timeline, reuse=True)
    assert instance.instance_id == old and instance.launched_at == fleet.reactor.seconds()
    assert fake.requests("ModifyInstanceAttribute") == [(old, SPEC.user_data)]
    assert fake.instances[old].user_data == SPEC.user_data
    assert fake.requests("StartInstances") == [[old]] and fake.status(old).state == "running"
    assert fake.count("RunInstances") == 1  # the old one's own launch: none since
    assert "started_from_stopped" in timeline and not fleet.stopped.entries


def test_a_restarted_stopped_instance_forgets_the_image_digest_it_ran(fleet, fake, client):
    """Started again it pulls the tag anew: the digest its image reported before it
    stopped says nothing of what it will run, so no image refresh drains it for that."""
    old = stopped_instance(fleet, fake, client, "k1", image_digest="sha256:" + "a" * 64,
                           image_digest_at=5.0).instance_id
    instance = launch(fleet, client, reuse=True)
    assert instance.instance_id == old
    assert instance.image_digest == "" and instance.image_digest_at == 0.0


def test_a_stale_stopped_instance_is_terminated_and_a_new_one_launched(fleet, fake, client):
    old = stopped_instance(fleet, fake, client, "k-other-settings").instance_id
    instance = launch(fleet, client, reuse=True)
    (new,) = set(fake.instances) - {old}
    assert instance.instance_id == new
    assert fake.status(old).state == "terminated" and not fleet.stopped.entries
