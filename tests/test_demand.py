"""Launch on request: instances for queued build requests boot before buildbot hands
the builds out, and buildbot gives a build to the worker whose instance is on its way
(not to a random idle worker, which would launch a second instance)."""

from __future__ import annotations

import time

import pytest

from buildbot_dockerami.worker.on_request import Candidate, plan
from tests.harness import SUCCESS, control_worker, master_cfg, wait_for
from tests.helpers import instances, live


def test_plan_launches_one_worker_per_request_beyond_the_spares() -> None:
    candidates = [Candidate(f"w{i}", frozenset({"a"})) for i in range(10)]
    assert plan({"a": 4}, {"a": 1}, candidates) == ["w0", "w1", "w2"]
    assert plan({"a": 2}, {"a": 2}, candidates) == []
    assert plan({"a": 0}, {}, candidates) == []
    assert plan({"a": 20}, {}, candidates[:3]) == ["w0", "w1", "w2"]  # only who is idle


def test_plan_counts_a_shared_worker_for_every_builder_it_serves() -> None:
    both = Candidate("ab", frozenset({"a", "b"}))
    only_b = Candidate("b1", frozenset({"b"}))
    only_c = Candidate("c1", frozenset({"c"}))
    # One request each on a and b: the shared worker covers both, b1 stays idle.
    assert plan({"a": 1, "b": 1}, {}, [both, only_b]) == ["ab"]
    assert plan({"a": 1, "b": 2}, {}, [both, only_b]) == ["ab", "b1"]
    assert plan({"a": 1}, {}, [only_c]) == []  # serves no builder with requests


GATE = """
import os as _os
def _gate(builder, wfb, request):
    return _os.path.exists({gate!r})
c['builders'][0].canStartBuild = _gate
"""


def gated_master(make_master, gate, **kwargs):
    """A builder that hands nothing out until the gate file exists: requests queue up
    as in a burst where buildbot has not got to them yet."""
    return make_master(master_cfg(workers=6, build_wait_timeout=30, **kwargs)
                       + GATE.format(gate=str(gate)))


@pytest.mark.integration
def test_queued_requests_launch_instances_that_their_builds_then_use(
        make_master, cloud, tmp_path):
    gate = tmp_path / "gate"
    cloud.delays.boot = 4.0
    master = gated_master(make_master, gate, worker_extra="launch_on_request=True,")
    requests_ = [master.force() for _ in range(3)]
    # Nothing was handed out (the gate is shut), yet three instances boot.
    wait_for(lambda: len(live(cloud)) == 3, 30, "three instances for three requests")
    assert all(not master.builds_for(brid) for brid in requests_)
    ids = {i["InstanceId"] for i in live(cloud)}
    gate.touch()
    for name in ("w0", "w1"):  # buildbot looks at the queue again when a worker unpauses
        control_worker(master, name, "pause")
        control_worker(master, name, "unpause")
    results = [master.wait_request(brid, 120)["results"] for brid in requests_]
    assert results == [SUCCESS] * 3
    assert cloud.faults.count("RunInstances") == 3, "a build launched another instance"
    assert {i["InstanceId"] for i in instances(cloud)} == ids
    assert master.stop()


@pytest.mark.integration
def test_launch_on_request_is_off_by_default(make_master, cloud, tmp_path):
    gate = tmp_path / "gate"
    master = gated_master(make_master, gate)
    brid = master.force()
    wait_for(lambda: "added buildset" in master.log(), 30, "the request")
    opened = time.monotonic()
    gate.touch()
    control_worker(master, "w0", "pause")  # buildbot looks at the queue again
    control_worker(master, "w0", "unpause")
    # The build ran on an instance buildbot itself launched for it, once the gate let it
    # hand the build out; launch on request would have launched at the request (in the
    # same reactor turn as the event), said so in the log, and buildbot would have used
    # that instance.
    assert master.wait_request(brid, 120)["results"] == SUCCESS
    (instance,) = instances(cloud)
    boot = cloud.faults.clock.boot(instance["InstanceId"])
    assert boot is not None and boot.at >= opened, "launched while the request waited"
    assert "for the build requests waiting" not in master.log()
    assert master.stop()


@pytest.mark.integration
def test_a_build_goes_to_the_prewarmed_worker_not_a_random_one(make_master, cloud):
    master = make_master(master_cfg(workers=10, build_wait_timeout=60,
                                    plugins={"dockerami": {"anonymous_control": True}}))

    def state(name: str) -> str:
        return next(r["state"] for r in master.fleet()["workers"] if r["name"] == name)
    for round_, name in enumerate(("w7", "w3")):
        assert master.control(action="prewarm", worker=name).status_code == 200
        wait_for(lambda name=name: state(name) == "connected", 60, f"{name} to connect")
        brid = master.force()
        assert master.wait_request(brid, 120)["results"] == SUCCESS
        workerid = master.builds_for(brid)[0]["workerid"]
        worker = next(w["name"] for w in master.get("workers") if w["workerid"] == workerid)
        # Round 2: w7 is still up and idle too; either is right, a third instance is not.
        assert worker in ("w7", "w3")[:round_ + 1], f"round {round_}: the build went to {worker}"
        assert cloud.faults.count("RunInstances") == round_ + 1
    assert master.stop()


def fake_worker(name: str, state, *, launched=None, next_worker=None, settings=None):
    """Just what demand.py reads of a DockerAMILatentWorker and its builder."""
    from types import SimpleNamespace

    settings = settings or {"image": "org/w:1", "instance_type": "t3.micro", "ami": None,
                            "setup_repo": None, "setup_branch": None}
    builder = SimpleNamespace(config=SimpleNamespace(nextWorker=next_worker))
    worker = SimpleNamespace(name=name, state=state, building=[], stopping=False, conn=object(),
                             _actual_build_props=launched, master=SimpleNamespace(
                                 config=SimpleNamespace(select_next_worker=None)), **settings)
    worker.workerforbuilders = {"b": SimpleNamespace(builder=builder,
                                                     isAvailable=lambda: True)}
    return worker


def test_an_instance_launched_with_old_settings_is_not_a_spare() -> None:
    """After a reconfig changed the image, buildbot refuses the old instance every
    build: idle workers must not decline in its favour (the builds would stall)."""
    from types import SimpleNamespace

    from buildbot.worker.latent import States

    from buildbot_dockerami.worker.on_request import prefers_spare

    current = {"image": "org/w:2", "instance_type": "t3.micro", "ami": None,
               "setup_repo": None, "setup_branch": None}
    up = fake_worker("up", States.SUBSTANTIATED, launched={**current, "image": "org/w:1"},
                     settings=current)
    idle = fake_worker("idle", States.NOT_SUBSTANTIATED, settings=current)
    fleet = SimpleNamespace(workers=[up, idle])
    up.fleet = idle.fleet = fleet
    assert not prefers_spare(idle, "b")
    up._actual_build_props = dict(current)
    assert prefers_spare(idle, "b")
    # The operator's own nextWorker may never offer the spare: no preference then.
    idle.workerforbuilders["b"].builder.config.nextWorker = lambda *_: None
    assert not prefers_spare(idle, "b")
