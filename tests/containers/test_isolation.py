"""Per-build isolation on a real Docker engine: a fresh container for every build on a
kept instance (isolation='container'), several slots per instance, lost containers."""

from __future__ import annotations

import time

import pytest

from tests.docker_support import (
    LEFTOVERS,
    containers_of,
    facts,
    instance_ids,
    only_instance,
)
from tests.harness import RETRY, SUCCESS, master_cfg, wait_for

pytestmark = pytest.mark.integration

def run_two_builds(master) -> tuple[dict, dict]:
    first = master.wait_request(master.force(), 180)
    second = master.wait_request(master.force(), 180)
    assert (first["results"], second["results"]) == (SUCCESS, SUCCESS), master.log()[-3000:]
    assert_no_container_turned_away(master)
    return facts(master, first), facts(master, second)


def assert_no_container_turned_away(master) -> None:
    """A fresh container is expected, never refused and retried."""
    assert "while not trying to substantiate" not in master.log()


def test_consecutive_builds_on_one_instance_see_nothing_of_each_other(
        make_master, cloud, engine, worker_image):
    master = make_master(master_cfg(image=worker_image, command=LEFTOVERS, build_wait_timeout=60,
                                    worker_extra="isolation='container',"))
    first, second = run_two_builds(master)
    assert second["instance"] == first["instance"]  # the instance was kept
    assert second["container"] != first["container"]  # but the container is new
    assert {k: second[k] for k in ("workspace", "home", "tmp", "process")} == dict.fromkeys(
        ("workspace", "home", "tmp", "process"), "no")
    # The previous container is gone before the next build starts.
    assert all(first["container"] not in c["Id"] for c in engine.api.containers(all=True))

    assert master.stop(timeout=30), "the master did not stop within 30s"
    wait_for(lambda: only_instance(cloud)["State"]["Name"] == "terminated", 30,
             "the master's instance to be terminated when it stops")
    wait_for(lambda: not containers_of(engine, instance_ids(cloud)), 30,
             "no container to be left behind")


def test_without_isolation_leftovers_are_visible(make_master, cloud, worker_image):
    """The control: the same probe does see the first build's leftovers without isolation."""
    master = make_master(master_cfg(image=worker_image, command=LEFTOVERS, build_wait_timeout=60))
    first, second = run_two_builds(master)
    assert second["container"] == first["container"]
    assert (second["workspace"], second["process"]) == ("yes", "yes")


#: t3.micro at 3.6 USD an hour (a tenth of a cent a second), for the builds' costs.
PRICED = """
from buildbot_dockerami import FleetSettings
c['services'] = [FleetSettings(prices={'t3.micro': 3.6})]
"""


def test_two_slots_build_concurrently_in_two_containers_on_one_instance(
        make_master, cloud, engine, worker_image):
    master = make_master(master_cfg(
        image=worker_image, command=f"{LEFTOVERS}\nsleep 4", build_wait_timeout=60,
        pool="'pool', slots=2", plugins={"dockerami": {}}) + PRICED)
    requests = [master.force(), master.force()]
    builds = [master.wait_request(brid, 180) for brid in requests]
    assert [b["results"] for b in builds] == [SUCCESS, SUCCESS], master.log()[-3000:]
    a, b = (facts(master, build) for build in builds)
    assert a["instance"] == b["instance"] and a["container"] != b["container"]
    assert builds[0]["started_at"] < builds[1]["complete_at"]
    assert builds[1]["started_at"] < builds[0]["complete_at"]  # they overlapped
    assert len(cloud.client().describe_instances()["Reservations"]) == 1
    workers = {w["workerid"]: w["name"] for w in master.get("workers")}
    assert {workers[b["workerid"]] for b in builds} == {"pool-1-1", "pool-1-2"}
    # They shared the instance: while both ran each paid half of it
    # (docs/web-ui-and-metrics.md#costs), at least its 4 s sleep at half.
    costs = [wait_for(lambda b=b: master.get(f"builds/{b['buildid']}/properties")[0]
                      .get("dockerami_cost_usd", [None])[0], 20, "the build's cost")
             for b in builds]
    assert all(cost >= 0.001 * 4 / 2 for cost in costs), costs
    for row in master.fleet()["workers"]:
        last = row["last_build_cost"]
        assert last["usd"] in costs and last["share_seconds"] < last["ran_seconds"], last
        assert last["usd"] == pytest.approx(0.001 * last["share_seconds"], abs=1e-4)


def test_a_container_killed_mid_build_retries_the_build_in_a_fresh_one(
        make_master, cloud, engine, worker_image):
    master = make_master(master_cfg(
        image=worker_image, command=f"{LEFTOVERS}\nsleep 6", build_wait_timeout=60,
        worker_extra="isolation='container',"))
    brid = master.force()
    wait_for(lambda: master.builds_for(brid), 120, "the build to start")
    first_build = master.builds_for(brid)[0]
    wait_for(lambda: "leftovers:" in master.step_log(first_build["buildid"]), 60,
             "the build to be running")
    killed = facts(master, first_build)["container"]
    engine.containers.get(killed).kill()

    final = master.wait_request(brid, 180)
    assert final["results"] == SUCCESS
    assert master.builds_for(brid)[0]["results"] == RETRY
    rerun = facts(master, final)
    assert rerun["container"] != killed and rerun["workspace"] == "no"
    assert_no_container_turned_away(master)
    assert master.stop(timeout=30), "the master did not stop within 30s"
    wait_for(lambda: not containers_of(engine, instance_ids(cloud)), 30,
             "no container to be left behind")


def test_idle_timeout_still_terminates_the_instance(make_master, cloud, engine, worker_image):
    master = make_master(master_cfg(image=worker_image, command="true", build_wait_timeout=3,
                                    worker_extra="isolation='container',"))
    assert master.wait_request(master.force(), 180)["results"] == SUCCESS
    finished = time.monotonic()
    wait_for(lambda: only_instance(cloud)["State"]["Name"] == "terminated", 60,
             "the idle instance to be terminated")
    assert time.monotonic() - finished >= 2
    wait_for(lambda: not containers_of(engine, instance_ids(cloud)), 30,
             "its containers to be gone")
