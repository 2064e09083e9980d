"""The stopped warm pool: idle instances stopped instead of terminated and started
again, with a fresh credential, for the next build; stale ones replaced."""

from __future__ import annotations

import pytest

from buildbot_dockerami.fleet import stopped_pool
from buildbot_dockerami.localcloud.hypervisor import Booting
from tests.harness import SUCCESS, master_cfg, wait_for
from tests.helpers import (
    instances,
    peak_of_live,
    pool_master,
    set_pool,
    state_of,
    user_data_of,
)

STOP = "idle_action='stop', reconcile_interval=5,"


def entry(owner: str, stopped_at: float, key: str = "k") -> stopped_pool.StoppedInstance:
    return stopped_pool.StoppedInstance(owner, object(), key, stopped_at)


def test_reuse_needs_the_same_launch_key_and_a_young_enough_instance():
    assert stopped_pool.reusable(entry("w", 0), "k", now=10, max_age=60)
    assert not stopped_pool.reusable(entry("w", 0), "other", now=10, max_age=60)
    assert not stopped_pool.reusable(entry("w", 0), "k", now=61, max_age=60)
    assert not stopped_pool.reusable(None, "k", now=0, max_age=60)
    assert (stopped_pool.launch_key({"image": "a", "ami": "ami-1"})
            != stopped_pool.launch_key({"image": "b", "ami": "ami-1"}))


def test_retired_are_the_too_old_and_the_oldest_beyond_the_count():
    entries = [entry("a", 0), entry("b", 50), entry("c", 60), entry("d", 70)]
    retired = stopped_pool.to_retire(entries, now=100, max_count=2, max_age=90)
    assert sorted(e.owner for e in retired) == ["a", "b"]


@pytest.mark.integration
def test_second_build_starts_the_stopped_instance_with_a_fresh_credential(make_master, cloud):
    master = make_master(master_cfg(build_wait_timeout=2, command="pwd", worker_extra=STOP))
    first = master.wait_request(master.force(), 90)
    assert first["results"] == SUCCESS
    (instance,) = instances(cloud)
    instance_id = instance["InstanceId"]
    old_password = user_data_of(cloud, instance_id).split(" ")[1]
    wait_for(lambda: state_of(cloud, instance_id) == "stopped", 30, "the idle instance to stop")
    assert "stopped for reuse" in master.log()

    second = master.wait_request(master.force(), 90)
    assert second["results"] == SUCCESS
    assert [i["InstanceId"] for i in instances(cloud)] == [instance_id], "no new launch"
    assert instance_id in master.step_log(second["buildid"])
    assert f"started stopped instance {instance_id} with a fresh credential" in master.log()
    new_password = user_data_of(cloud, instance_id).split(" ")[1]
    assert new_password != old_password

    # A worker presenting the old credential is turned away.
    old = user_data_of(cloud, instance_id).replace(new_password, old_password)
    cloud.hypervisor.runtime.start(Booting("i-0123456789abcdef0", old, "optional"))
    try:
        wait_for(lambda: "invalid login from user 'w0'" in master.log(), 30,
                 "the old credential to be refused")
    finally:
        cloud.hypervisor.runtime.stop("i-0123456789abcdef0")
    assert old_password not in master.log() and new_password not in master.log()


@pytest.mark.integration
def test_a_stale_stopped_instance_is_terminated_and_a_new_one_launched(make_master, cloud):
    master = make_master(master_cfg(build_wait_timeout=2, worker_extra=STOP))
    assert master.wait_request(master.force(), 90)["results"] == SUCCESS
    (instance,) = instances(cloud)
    old = instance["InstanceId"]
    wait_for(lambda: state_of(cloud, old) == "stopped", 30, "the idle instance to stop")
    master.reconfig(master_cfg(build_wait_timeout=2, worker_extra=STOP,
                               image="localhost/dockerami/worker:newer"))
    assert master.wait_request(master.force(), 90)["results"] == SUCCESS
    assert state_of(cloud, old) in ("shutting-down", "terminated")
    assert f"terminating stopped instance {old}: stale" in master.log()
    assert len(instances(cloud)) == 2


@pytest.mark.integration
def test_max_stopped_zero_terminates_idle_instances(make_master, cloud):
    master = make_master(master_cfg(build_wait_timeout=1,
                                    worker_extra=STOP + " max_stopped=0,"))
    assert master.wait_request(master.force(), 90)["results"] == SUCCESS
    (instance,) = instances(cloud)
    wait_for(lambda: state_of(cloud, instance["InstanceId"]) == "terminated", 30, "termination")


@pytest.mark.integration
def test_a_cap_counts_stopped_instances_started_again(make_master, cloud):
    """Pool of three, cap 1, idle instances stopped and started again: a start counts
    against the cap like a launch, so two instances never run at once."""
    master = pool_master(make_master, count=3, build_wait_timeout=1, command="sleep 2",
                         worker_extra=STOP)
    assert set_pool(master, cap=1).status_code == 200
    results = []
    with peak_of_live(cloud) as peak:
        for _ in range(3):
            brids = [master.force() for _ in range(2)]
            results += [master.wait_request(brid, 180)["results"] for brid in brids]
            wait_for(lambda: any(i["State"]["Name"] == "stopped" for i in instances(cloud)),
                     60, "an idle instance to be stopped")
    assert results == [SUCCESS] * 6
    assert peak[0] == 1, f"{peak[0]} instances ran at once with a cap of 1"
    assert "stopped for reuse" in master.log()
    assert master.stop()
