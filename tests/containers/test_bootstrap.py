"""On a real Docker engine: the worker image, the ami/ bootstrap and a loopback registry.

Full path: `image build` -> `image push` to 127.0.0.1 -> an instance boots -> the
bootstrap reads user data with IMDSv2 and pulls line 2 -> the container's worker
connects -> the build runs inside the container.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from buildbot_dockerami.localcloud.containers import ContainerRuntime, LegacyCrontabRuntime
from tests.docker_support import Registry, cli, containers_of, instance_ids, only_instance
from tests.harness import RETRY, SUCCESS, master_cfg, wait_for

pytestmark = pytest.mark.integration

WHOAMI = "echo build-user=$(id -un) in-container=$(test -f /.dockerenv && echo yes)"


def test_build_runs_in_the_pulled_container_and_idle_instance_takes_it_away(
        make_master, cloud, engine, worker_image):
    master = make_master(master_cfg(image=worker_image, command=WHOAMI, build_wait_timeout=4))
    build = master.wait_request(master.force(), 180)
    assert build["results"] == SUCCESS, master.log()[-3000:]
    output = master.step_log(build["buildid"])
    assert "build-user=builder in-container=yes" in output  # never true on the host

    instance_id = only_instance(cloud)["InstanceId"]
    assert containers_of(engine, instance_ids(cloud)) == [f"dockerami-{instance_id}"]
    console = cloud.runtime.console(instance_id)
    assert f"pulling {worker_image}" in console
    # The bootstrap read the user data with an IMDSv2 token.
    assert ("GET", "/latest/user-data", True) in cloud.runtime.metadata_requests(instance_id)
    assert "WORKERPASS" not in str(engine.containers.get(f"dockerami-{instance_id}").attrs)

    wait_for(lambda: only_instance(cloud)["State"]["Name"] == "terminated", 60,
             "the idle instance to be terminated")
    wait_for(lambda: not containers_of(engine, [instance_id]), 30, "its container to be gone")


@pytest.fixture
def registry_down_for_boot(registry: Registry) -> Iterator[Registry]:
    registry.stop()
    yield registry
    if not registry.up():
        registry.start()


def test_bootstrap_retries_the_pull_while_the_registry_is_unreachable(
        make_master, cloud, worker_image, registry_down_for_boot):
    master = make_master(master_cfg(image=worker_image, command=WHOAMI))
    brid = master.force()
    wait_for(cloud.runtime.running, 30, "an instance to boot")
    instance_id = cloud.runtime.running()[0]
    wait_for(lambda: "retrying in" in (cloud.runtime.console(instance_id) or ""), 60,
             "a failed pull to be retried")
    registry_down_for_boot.start()
    build = master.wait_request(brid, 180)
    assert build["results"] == SUCCESS
    assert "build-user=builder" in master.step_log(build["buildid"])


@pytest.mark.parametrize("runtime", [LegacyCrontabRuntime])
def test_the_seeds_crontab_line_boots_our_user_data(make_master, cloud, worker_image):
    master = make_master(master_cfg(
        image=worker_image, command=WHOAMI,
        worker_extra="metadata_options={'HttpTokens': 'optional', 'HttpEndpoint': 'enabled'},"))
    build = master.wait_request(master.force(), 180)
    assert build["results"] == SUCCESS, master.log()[-3000:]
    assert "build-user=builder in-container=yes" in master.step_log(build["buildid"])
    instance_id = only_instance(cloud)["InstanceId"]
    reads = [r for r in cloud.runtime.metadata_requests(instance_id)
             if r[:2] == ("GET", "/latest/user-data")]
    assert len(reads) >= 2  # the crontab's curl, then the container itself


@pytest.mark.parametrize("runtime", [
    lambda d: ContainerRuntime(d, pull_attempts=2, pull_max_delay=1)])
def test_an_image_that_does_not_exist_fails_with_the_reason_and_is_terminated(
        make_master, cloud, registry):
    missing = f"{registry.address}/dockerami/no-such-image:1"
    master = make_master(master_cfg(image=missing, missing_timeout=600))
    brid = master.force()
    wait_for(lambda: "latent worker crashed before connecting" in master.log(), 60,
             "the substantiation to fail")
    failure = next(line for line in master.log().splitlines()
                   if "latent worker crashed before connecting" in line)
    assert f"FATAL: cannot pull image {missing}" in failure  # the reason, in one line
    wait_for(lambda: only_instance(cloud)["State"]["Name"] == "terminated", 30,
             "the instance to be terminated")
    wait_for(lambda: RETRY in [b["results"] for b in master.builds_for(brid)], 30,
             "the build to end as RETRY (its request stays queued)")


def test_worker_container_stops_fast(engine, worker_image, registry):
    engine.images.pull(worker_image)
    container = engine.containers.run(
        worker_image, detach=True, network_mode="host",
        environment={"WORKERNAME": "w", "WORKERPASS": "p", "BUILDMASTER": "127.0.0.1",
                     "BUILDMASTER_PORT": "9"},
    )
    try:
        wait_for(lambda: b"connecting to" in container.logs(), 30, "the worker to start")
        started = time.monotonic()
        container.stop(timeout=10)
        took = time.monotonic() - started
        assert took < 6, f"docker stop took {took:.1f}s: signals are not reaching the worker"
    finally:
        container.remove(force=True)
        engine.images.remove(worker_image)


def test_image_build_errors_are_clear(tmp_path, engine):
    (tmp_path / "Dockerfile").write_text("FROM dockerami/no-such-base:1\n")
    result = cli("image", "build", str(tmp_path), "--repo", "dockerami/broken")
    assert result.returncode == 1
    assert "base image 'dockerami/no-such-base:1' is not on this Docker engine" in result.stderr


@pytest.fixture
def setup_repo(tmp_path: Path) -> Iterator[str]:
    """A seed-style config repo served over git's dumb HTTP protocol on 127.0.0.1."""
    import functools
    import http.server
    import threading

    work, served = tmp_path / "work", tmp_path / "served"
    work.mkdir()
    (work / "setup-worker.sh").write_text(
        '#!/bin/sh\necho "setup ran in $(pwd) on branch $(git rev-parse --abbrev-ref HEAD)"'
        ' > "$HOME/setup-ran"\n')
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@localhost"]
    subprocess.run([*git, "init", "-q", "-b", "ci", str(work)], check=True)
    subprocess.run([*git, "-C", str(work), "add", "."], check=True)
    subprocess.run([*git, "-C", str(work), "commit", "-qm", "setup"], check=True)
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(served / "buildslaves.git")],
                   check=True)
    subprocess.run(["git", "-C", str(served / "buildslaves.git"), "update-server-info"],
                   check=True)
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/buildslaves.git"
    server.shutdown()


def test_setup_repo_from_user_data_is_cloned_and_its_script_run(
        make_master, cloud, worker_image, setup_repo):
    master = make_master(master_cfg(
        image=worker_image, command="cat $HOME/setup-ran",
        worker_extra=f"setup_repo={setup_repo!r}, setup_branch='ci',"))
    build = master.wait_request(master.force(), 180)
    assert build["results"] == SUCCESS, master.log()[-3000:]
    assert "setup ran in /home/builder/setup on branch ci" in master.step_log(build["buildid"])


def test_spot_notice_seen_by_the_bootstrap_retries_the_build_and_worker_reports_its_instance(
        make_master, cloud, engine, worker_image):
    """The real image reports its instance id (the master checks it) and the real
    bootstrap answers a spot interruption notice by asking the worker to shut down."""
    master = make_master(master_cfg(
        image=worker_image, command="echo started; sleep 30", build_wait_timeout=600,
        worker_extra="market='spot',"))
    brid = master.force()
    build = wait_for(lambda: master.builds_for(brid), 120, "the build to start")[0]
    wait_for(lambda: "started" in master.step_log(build["buildid"]), 180, "the step to run")
    instance_id = only_instance(cloud)["InstanceId"]
    cloud.hypervisor.interrupt(instance_id, notice=20)
    wait_for(lambda: "spot interruption" in master.log(), 30, "the master to hear of it")
    console = cloud.runtime.console(instance_id)
    assert "spot interruption notice" in console
    assert master.builds_for(brid)[0]["results"] in (None, RETRY)
    final = master.wait_request(brid, 300)
    assert final["results"] == SUCCESS, master.log()[-3000:]
    assert master.builds_for(brid)[0]["results"] == RETRY
    assert "refusing a connection" not in master.log()  # the reported ids matched


def test_a_password_with_glob_characters_reaches_the_worker_unchanged(
        make_master, cloud, engine, worker_image):
    """Issue 9: the image split user-data line 1 with an unquoted ``set --``, so a
    password like ``.*`` was globbed against the working directory and never matched."""
    master = make_master(master_cfg(image=worker_image, command="true",
                                    worker_extra="password='.*',"))
    build = master.wait_request(master.force(), 180)
    assert build["results"] == SUCCESS, master.log()[-3000:]
    assert "invalid login" not in master.log()
