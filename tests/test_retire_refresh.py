"""Instances the master drains (fleet/retirement.py, fleet/refresh.py) on a real master,
moto EC2 on loopback and the local cloud's worker processes: after max builds, and when
ami_filters pick a newer AMI registered mid-run (the idle instance ends at once, the busy
one only after its build; a busy worker is never killed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import SUCCESS, master_cfg, wait_for
from tests.helpers import instances, pools, state_of
from tests.test_cost import scrape

pytestmark = pytest.mark.integration

PLUGIN = {"dockerami": {}}

#: w0 builds 'quick' (echo), w1 builds 'slow' (waits for a file the test creates).
TWO_BUILDERS = """
slow = util.BuildFactory([steps.ShellCommand(name='run', command=[
    'sh', '-c', 'while [ ! -e {go} ]; do sleep 0.2; done'])])
c['builders'] = [util.BuilderConfig(name='quick', workernames=['w0'], factory=factory),
                 util.BuilderConfig(name='slow', workernames=['w1'], factory=slow)]
c['schedulers'] = [schedulers.ForceScheduler(name='force', builderNames=['quick']),
                   schedulers.ForceScheduler(name='force2', builderNames=['slow'])]
from buildbot_dockerami import FleetSettings
c['services'] = [FleetSettings(reconcile_interval=5, ami_refresh_interval=5)]
"""


def instance_row(master, worker: str) -> dict | None:
    row = next(r for r in master.fleet()["workers"] if r["name"] == worker)
    return row["instance"]


def test_an_instance_drains_after_max_builds_per_instance(make_master, cloud):
    master = make_master(master_cfg(build_wait_timeout=600, plugins=PLUGIN,
                                    worker_extra="max_builds_per_instance=2,"))
    for _ in range(2):
        assert master.wait_request(master.force(), 120)["results"] == SUCCESS
    (first,) = instances(cloud)
    # Its second build drained it: terminated (not kept for build_wait_timeout=600).
    wait_for(lambda: state_of(cloud, first["InstanceId"]) == "terminated", 30,
             "the drained instance to be terminated")
    assert (f"instance {first['InstanceId']} drains: max_builds: 2 builds started on it "
            "(max_builds_per_instance=2)") in master.log()
    assert master.wait_request(master.force(), 120)["results"] == SUCCESS
    assert len(instances(cloud)) == 2  # the third build got a new instance
    assert scrape(master)[("dockerami_retirements_total",
                           frozenset({("reason", "max_builds")}))] == 1


def test_a_newer_ami_drains_idle_instances_at_once_and_busy_ones_after_their_build(
        make_master, cloud, tmp_path: Path):
    go = tmp_path / "go"
    master = make_master(master_cfg(workers=2, build_wait_timeout=600, plugins=PLUGIN)
                         + TWO_BUILDERS.format(go=go))
    assert master.wait_request(master.force("quick"), 120)["results"] == SUCCESS
    slow = master.force("slow", "force2")
    wait_for(lambda: master.builds_for(slow), 120, "the slow build to start")
    idle, busy = (wait_for(lambda w=w: instance_row(master, w), 60, f"{w}'s instance")
                  for w in ("w0", "w1"))
    assert idle["ami"] == busy["ami"] == cloud.base_ami_id

    newer = cloud.register_image("dockerami-base-local-2", "x86_64", "a newer base AMI")
    wait_for(lambda: state_of(cloud, idle["id"]) == "terminated", 60,
             "the idle instance of the old AMI to be terminated")
    # The busy one drains: shown why, still running its build.
    row = wait_for(lambda: (instance_row(master, "w1") or {}).get("retired"), 30,
                   "the busy instance to show that it drains")
    assert row == f"refresh_ami: launched from {cloud.base_ami_id}; ami_filters now pick {newer}"
    assert state_of(cloud, busy["id"]) == "running"
    assert not master.get(f"buildrequests/{slow}")[0]["complete"]

    go.touch()
    assert master.wait_request(slow, 120)["results"] == SUCCESS  # never killed
    wait_for(lambda: state_of(cloud, busy["id"]) == "terminated", 30,
             "the drained busy instance to be terminated after its build")
    # The next build gets an instance of the newer AMI.
    assert master.wait_request(master.force("quick"), 120)["results"] == SUCCESS
    (fresh,) = [i for i in instances(cloud) if i["State"]["Name"] == "running"]
    assert fresh["ImageId"] == newer
    assert scrape(master)[("dockerami_retirements_total",
                           frozenset({("reason", "refresh_ami")}))] == 2
    assert f"drains: refresh_ami: launched from {cloud.base_ami_id}" in master.log()


FAST_REFRESH = """
from buildbot_dockerami import FleetSettings
c['services'] = [FleetSettings(reconcile_interval=5, ami_refresh_interval=5)]
"""


def test_a_warm_instance_of_an_old_ami_ends_only_once_its_replacement_is_ready(
        make_master, cloud):
    master = make_master(master_cfg(pool="'pool', count=2, min_warm=1", build_wait_timeout=600,
                                    plugins=PLUGIN) + FAST_REFRESH)
    wait_for(lambda: pools(master)["pool"]["idle"] == 1, 120, "the warm minimum to be idle")
    (old,) = instances(cloud)
    newer = cloud.register_image("dockerami-base-local-2", "x86_64", "a newer base AMI")

    # Held (draining, no build) while the keeper launches its replacement, then ended.
    wait_for(lambda: state_of(cloud, old["InstanceId"]) in ("shutting-down", "terminated"),
             120, "the warm instance of the old AMI to end")
    assert pools(master)["pool"]["idle"] == 1, "the replacement was ready before it ended"
    (fresh,) = [i for i in instances(cloud) if i["State"]["Name"] == "running"]
    assert fresh["ImageId"] == newer
    assert "warm minimum has its replacement" in master.log()
    assert "its replacement is ready" in master.log()
