"""End to end: a real master, moto EC2 on loopback, the local cloud's hypervisor and
real buildbot-worker processes booted from our user data."""

from __future__ import annotations

import time

import pytest

from tests.harness import RETRY, SUCCESS, master_cfg, wait_for
from tests.helpers import instances, state_of, user_data_of

pytestmark = pytest.mark.integration


def test_forced_build_runs_on_a_booted_instance_which_is_terminated_when_idle(
        make_master, cloud):
    master = make_master(master_cfg(build_wait_timeout=2, command="echo built-on-$PPID"))
    brid = master.force()
    build = master.wait_request(brid, 90)
    assert build["results"] == SUCCESS, master.log()[-4000:]
    assert "built-on-" in master.step_log(build["buildid"])

    (instance,) = instances(cloud)
    tags = {t["Key"]: t["Value"] for t in instance["Tags"]}
    assert tags["Name"] == "buildbot-w0"
    assert tags["buildbot:worker"] == "w0"
    assert tags["buildbot:master"].startswith(master.basedir.name[:0])
    assert tags["buildbot:master"]
    assert tags["team"] == "ci"
    assert instance["InstanceType"] == "t3.micro"
    assert instance["MetadataOptions"]["HttpTokens"] == "required"

    text = user_data_of(cloud, instance["InstanceId"])
    lines = text.split("\n")
    assert len(lines) == 2 and not text.endswith("\n")
    name, password, address = lines[0].split(" ")
    assert (name, address) == ("w0", f"127.0.0.1:{master.pb_port}")
    assert lines[1] == "localhost/dockerami/worker:test"
    assert password not in master.log(), "the worker password must never be logged"

    wait_for(lambda: state_of(cloud, instance["InstanceId"]) == "terminated", 30,
             "the idle instance to be terminated")
    wait_for(lambda: not cloud.hypervisor.runtime.running(), 15, "the worker process to end")


def test_each_instance_gets_a_fresh_password(make_master, cloud):
    master = make_master(master_cfg(build_wait_timeout=0))
    for _ in range(2):
        assert master.wait_request(master.force(), 90)["results"] == SUCCESS
    passwords = {user_data_of(cloud, i["InstanceId"]).split(" ")[1] for i in instances(cloud)}
    assert len(passwords) == 2


def test_instance_terminated_before_its_worker_connects_fails_fast_and_build_is_retried(
        make_master, cloud):
    cloud.hypervisor.boot_delay = 3600  # the worker never comes up on its own
    master = make_master(master_cfg(check_interval=1, missing_timeout=600))
    brid = master.force()
    (instance,) = wait_for(lambda: instances(cloud), 30, "an instance to be launched")
    cloud.client().terminate_instances(InstanceIds=[instance["InstanceId"]])
    terminated_at = time.monotonic()

    wait_for(lambda: "latent worker crashed before connecting" in master.log(), 15,
             "the substantiation to fail")
    failed_after = time.monotonic() - terminated_at
    assert failed_after < 30, f"took {failed_after:.1f}s to notice (missing_timeout is 600s)"
    log = master.log()
    assert f"instance {instance['InstanceId']} is terminated" in log
    assert "User initiated" in log  # EC2's state reason reaches the operator

    # The request is not lost: once instances boot again, the retry succeeds.
    cloud.hypervisor.boot_delay = 0
    final = master.wait_request(brid, 120)
    assert final["results"] == SUCCESS
    assert RETRY in [b["results"] for b in master.builds_for(brid)]


def test_workers_booting_together_share_one_describe_per_interval(make_master, cloud):
    workers, boot_delay, interval = 4, 5.0, 1.0
    cloud.hypervisor.boot_delay = boot_delay
    master = make_master(master_cfg(workers=workers, check_interval=interval,
                                    build_wait_timeout=60))
    started = time.monotonic()
    requests = [master.force() for _ in range(workers)]
    builds = [master.wait_request(brid, 120) for brid in requests]
    booting = time.monotonic() - started  # an upper bound on how long anything booted
    assert [b["results"] for b in builds] == [SUCCESS] * workers
    assert len({b["workerid"] for b in builds}) == workers
    describes = cloud.faults.count("DescribeInstances")
    # Batched: at most one call per 0.8 interval for the whole master while anything
    # boots. Unbatched, each of the four workers would poll that often.
    assert describes <= booting / (0.8 * interval) + 2, (describes, booting)
    assert describes < workers * (boot_delay / interval), describes


def test_reconfig_changes_instance_type_for_the_next_launch(make_master, cloud):
    master = make_master(master_cfg(instance_type="t3.micro", build_wait_timeout=0))
    assert master.wait_request(master.force(), 90)["results"] == SUCCESS
    master.reconfig(master_cfg(instance_type="c5.xlarge", build_wait_timeout=0))
    assert master.wait_request(master.force(), 90)["results"] == SUCCESS
    launched = sorted(instances(cloud), key=lambda i: i["LaunchTime"])
    assert [i["InstanceType"] for i in launched] == ["t3.micro", "c5.xlarge"]


def test_launch_throttled_then_capacity_error_is_retried_and_nothing_leaks(make_master, cloud):
    cloud.faults.throttle("RunInstances", count=2)  # boto3's retry absorbs these
    cloud.faults.inject("RunInstances", "InsufficientInstanceCapacity",
                        "We currently do not have sufficient t3.micro capacity.", count=2)
    master = make_master(master_cfg(build_wait_timeout=0))
    brid = master.force()
    wait_for(lambda: "InsufficientInstanceCapacity" in master.log(), 60, "the capacity error")
    assert master.wait_request(brid, 180)["results"] == SUCCESS
    wait_for(lambda: all(i["State"]["Name"] == "terminated" for i in instances(cloud)), 30,
             "every instance to be terminated")


def test_missing_timeout_logs_console_output_and_terminates(make_master, cloud):
    cloud.hypervisor.boot_delay = 3600  # running, but the worker never comes
    master = make_master(master_cfg(missing_timeout=4, check_interval=1))
    master.force()
    (instance,) = wait_for(lambda: instances(cloud), 30, "an instance to be launched")
    wait_for(lambda: "never connected; console output:" in master.log(), 30,
             "the console output to be logged")
    wait_for(lambda: state_of(cloud, instance["InstanceId"]) == "terminated", 30,
             "the instance to be terminated")
    assert cloud.faults.count("GetConsoleOutput") >= 1


def test_refused_terminations_are_retried_until_the_instance_is_gone(make_master, cloud):
    master = make_master(master_cfg(build_wait_timeout=0))
    cloud.faults.inject("TerminateInstances", "UnauthorizedOperation",
                        "You are not authorized to perform this operation.", count=2)
    assert master.wait_request(master.force(), 90)["results"] == SUCCESS
    (instance,) = instances(cloud)
    wait_for(lambda: state_of(cloud, instance["InstanceId"]) == "terminated", 30,
             "the instance to be terminated after two refusals")
    assert cloud.faults.count("TerminateInstances") == 3
    assert f"terminating {instance['InstanceId']} failed" in master.log()


RENDERED_BUILDERS = """
c['builders'] = [
    util.BuilderConfig(name=name, workernames=['w0'], factory=factory,
                       properties={'itype': itype})
    for name, itype in (('small', 't3.micro'), ('big', 'c5.large'))
]
c['schedulers'] = [schedulers.ForceScheduler(name='force', builderNames=['small', 'big'])]
"""


def test_renderable_instance_type_and_incompatible_builds(make_master, cloud):
    config = master_cfg(build_wait_timeout=2,
                        settings={"instance_type": "util.Property('itype')"})
    config += RENDERED_BUILDERS
    master = make_master(config)
    small = master.force("small")
    big = master.force("big")
    assert master.wait_request(small, 90)["results"] == SUCCESS
    assert master.wait_request(big, 90)["results"] == SUCCESS
    # One instance of each type: the build that needed the other type did not run on
    # the instance that was up (whichever builder went first).
    assert sorted(i["InstanceType"] for i in instances(cloud)) == ["c5.large", "t3.micro"]


def test_instance_isolation_gives_every_build_a_fresh_instance(make_master, cloud):
    master = make_master(master_cfg(build_wait_timeout=600, worker_extra="isolation='instance',"))
    for _ in range(2):
        assert master.wait_request(master.force(), 90)["results"] == SUCCESS
    launched = instances(cloud)
    assert len(launched) == 2  # despite build_wait_timeout=600
    wait_for(lambda: all(state_of(cloud, i["InstanceId"]) == "terminated" for i in launched),
             30, "both instances to be terminated after their build")
