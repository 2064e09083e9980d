"""buildbot's worker actions (the Workers page buttons, POST /api/v2/workers/<id>) on
DockerAMILatentWorkers: a real master, the local cloud and real worker processes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.harness import RETRY, SUCCESS, control_worker, master_cfg, wait_for
from tests.helpers import ids, instances, live, state_of

pytestmark = pytest.mark.integration


def test_pause_stops_new_builds_but_idle_instance_still_ends_then_unpause_boots(
        make_master, cloud):
    master = make_master(master_cfg(build_wait_timeout=4))
    assert master.wait_request(master.force(), 90)["results"] == SUCCESS
    (first,) = ids(instances(cloud))
    control_worker(master, "w0", "pause")
    brid = master.force()
    wait_for(lambda: not live(cloud), 30, "the idle instance to be terminated while paused")
    assert not master.builds_for(brid), "a build started on a paused worker"
    assert len(instances(cloud)) == 1, "a paused worker launched an instance"
    unpaused = time.monotonic()
    control_worker(master, "w0", "unpause")
    assert master.wait_request(brid, 90)["results"] == SUCCESS
    assert len(instances(cloud)) == 2
    # Nothing the paused worker did was missed by sampling too early: the request had
    # one build, on the one instance launched since the first, and that launch reached
    # EC2 after the unpause.
    assert len(master.builds_for(brid)) == 1
    (second,) = set(ids(instances(cloud))) - {first}
    boot = cloud.faults.clock.boot(second)
    assert boot is not None and boot.at >= unpaused, "an instance was launched while paused"


def test_graceful_stop_lets_the_build_finish_then_terminates(make_master, cloud):
    master = make_master(master_cfg(build_wait_timeout=600, command="sleep 4; echo done"))
    brid = master.force()
    wait_for(lambda: master.builds_for(brid), 60, "the build to start")
    control_worker(master, "w0", "stop")
    assert master.wait_request(brid, 60)["results"] == SUCCESS
    (instance,) = instances(cloud)
    wait_for(lambda: state_of(cloud, instance["InstanceId"]) == "terminated", 15,
             "the instance to be terminated after the build (not after 600s idle)")
    # The worker is usable again: the next build boots a new instance.
    assert master.wait_request(master.force(), 90)["results"] == SUCCESS
    assert len(instances(cloud)) == 2


def test_force_shutdown_terminates_now_and_the_build_is_retried(make_master, cloud, tmp_path):
    marker = tmp_path / "first-attempt"
    master = make_master(master_cfg(
        build_wait_timeout=600,
        command=f"if [ -e {marker} ]; then echo rerun; else touch {marker}; sleep 60; fi"))
    brid = master.force()
    wait_for(lambda: Path(marker).exists(), 60, "the build to be running")
    (instance,) = instances(cloud)
    control_worker(master, "w0", "kill")
    wait_for(lambda: state_of(cloud, instance["InstanceId"]) == "terminated", 15,
             "the instance to be terminated now")
    final = master.wait_request(brid, 120)
    assert final["results"] == SUCCESS
    assert master.builds_for(brid)[0]["results"] == RETRY
    assert "rerun" in master.step_log(final["buildid"])
