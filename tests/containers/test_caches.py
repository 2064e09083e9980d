"""Caches that survive isolation, and disk hygiene, on a real Docker engine with the real
bootstrap and image: a builder's cache volume is attached to each of its fresh containers
and to no other builder's; it is kept across a stop and start; a small disk (a tmpfs)
is pruned, then the instance retires and is terminated after its running build."""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
from docker.errors import ImageNotFound

from buildbot_dockerami.localcloud.containers import ContainerRuntime, prune_label, volume_prefix
from tests.docker_support import BASE_IMAGE, facts, instance_ids, only_instance
from tests.harness import RETRY, SUCCESS, master_cfg, wait_for
from tests.helpers import state_of, tmpfs

pytestmark = pytest.mark.integration

CACHES = "caches={'ccache': '/home/builder/.ccache'},"
# What the build sees of its builder's cache and of earlier workspaces, then it leaves
# its builder's name (the build directory's) in the cache.
CACHE_PROBE = (
    "echo container=$(grep -o 'containers/[0-9a-f]*' /proc/self/mountinfo | head -n 1 "
    "| cut -d/ -f2) instance=$DOCKERAMI_INSTANCE_ID; "
    "echo cache=$(cat $HOME/.ccache/seen 2>/dev/null | tr '\\n' ,) "
    "workspace=$(test -e marker-ws && echo yes || echo no); "
    "touch marker-ws && basename $(dirname $PWD) >> $HOME/.ccache/seen"
)
SECOND_BUILDER = """
c['builders'].append(util.BuilderConfig(name='other', factory=factory,
                                        workernames=[w.name for w in c['workers']]))
c['schedulers'].append(schedulers.ForceScheduler(name='force-other', builderNames=['other']))
"""


def cache_volumes(engine: docker.DockerClient, instance_id: str) -> dict[str, str]:
    """An instance's cache volumes: name -> builder."""
    prefix = volume_prefix(instance_id) + "-cache-"
    return {v.name: v.attrs["Labels"]["dockerami.builder"] for v in engine.volumes.list()
            if v.name.startswith(prefix)}


def seen(master, build: dict) -> tuple[str, str]:
    found = facts(master, build)
    text = master.step_log(build["buildid"])
    match = re.search(r"cache=(\S*) workspace=(\S+)", text)
    assert match, text
    return found["container"], match.group(1), match.group(2)


def test_a_builders_cache_outlives_its_containers_and_no_other_builder_sees_it(
        make_master, cloud, engine, worker_image):
    master = make_master(master_cfg(image=worker_image, command=CACHE_PROBE,
                                    build_wait_timeout=60,
                                    worker_extra=f"isolation='container', {CACHES}")
                         + SECOND_BUILDER)
    results = []
    for builder, scheduler in (("runtests", "force"), ("runtests", "force"),
                               ("other", "force-other"), ("runtests", "force")):
        build = master.wait_request(master.force(builder, scheduler), 180)
        assert build["results"] == SUCCESS, master.step_log(build["buildid"])
        results.append(seen(master, build))
    assert len({container for container, _, _ in results}) == 4  # a fresh one every time
    assert [(cache, workspace) for _, cache, workspace in results] == [
        ("", "no"),                     # the first build of runtests: an empty cache
        ("runtests,", "no"),            # the next one sees it, not the workspace
        ("", "no"),                     # another builder: its own, empty cache
        ("runtests,runtests,", "no"),   # runtests again: its own, not other's
    ]
    instance_id = only_instance(cloud)["InstanceId"]
    assert sorted(cache_volumes(engine, instance_id).values()) == ["other", "runtests"]
    console = cloud.runtime.console(instance_id)
    assert "caches of builder 'other' attached" in console

    assert master.stop(timeout=30)
    wait_for(lambda: state_of(cloud, instance_id) == "terminated", 30, "the termination")
    wait_for(lambda: not cache_volumes(engine, instance_id), 30,
             "the terminated instance's volumes to go with its disk")


def test_caches_are_kept_across_a_stop_and_start(make_master, cloud, engine, worker_image):
    """Without isolation (max_builds=1): one container, re-pointed at each build's builder."""
    master = make_master(master_cfg(image=worker_image, command=CACHE_PROBE,
                                    build_wait_timeout=2,
                                    worker_extra=f"idle_action='stop', {CACHES}")
                         + SECOND_BUILDER)
    first = master.wait_request(master.force(), 180)
    assert first["results"] == SUCCESS
    instance_id = only_instance(cloud)["InstanceId"]
    wait_for(lambda: state_of(cloud, instance_id) == "stopped", 60, "the idle instance to stop")
    second = master.wait_request(master.force(), 180)
    assert second["results"] == SUCCESS
    assert instance_ids(cloud) == [instance_id], "\n".join(  # started again, not launched
        line for line in master.log().splitlines() if "dockerami" in line or "w0" in line)
    (old, cache1, _), (new, cache2, workspace) = seen(master, first), seen(master, second)
    assert new != old and workspace == "no"  # a new container: the workspace is new
    assert (cache1, cache2) == ("", "runtests,")

    other = master.wait_request(master.force("other", "force-other"), 180)
    third = master.wait_request(master.force(), 180)
    assert (other["results"], third["results"]) == (SUCCESS, SUCCESS)
    assert instance_ids(cloud) == [instance_id]
    (c1, other_cache, _), (c2, cache3, _) = seen(master, other), seen(master, third)
    assert c1 == c2 == new  # the same container, each time with its build's caches
    assert (other_cache, cache3) == ("", "runtests,runtests,")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs the bootstraps keep free space on (the engine's root cannot move)."""
    with tmpfs(tmp_path / "disk") as point:
        yield point


@pytest.fixture
def runtime(small_disk: Path):
    return lambda directory: ContainerRuntime(directory, pull_attempts=20, pull_max_delay=2,
                                              disk_path=str(small_disk), disk_poll=1)


@pytest.fixture
def prunable(engine: docker.DockerClient) -> Iterator[list[str]]:
    """Throwaway images an instance's bootstrap may prune (removed at the end if not)."""
    tags: list[str] = []
    yield tags
    for tag in tags:
        with contextlib.suppress(ImageNotFound):
            engine.images.remove(tag, force=True)


def make_prunable(engine: docker.DockerClient, instance_id: str, tags: list[str]) -> str:
    tag = f"dockerami-test/prunable:{instance_id}"
    dockerfile = f"FROM {BASE_IMAGE}\nLABEL {prune_label(instance_id)}\n"
    engine.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=tag, pull=False, rm=True)
    tags.append(tag)
    return tag


def fill(disk: Path, mib: int) -> Path:
    filler = disk / "filler"
    filler.write_bytes(b"\1" * (mib << 20))
    return filler


# Waits (at most two minutes) for its instance to retire, says what it was told, and
# goes on building a little (the Fleet page shows the retiring instance meanwhile).
WAIT_FOR_RETIREMENT = (
    "[ $(basename $(dirname $PWD)) = runtests ] || exit 0; "
    "echo started; n=0; until [ -e /run/dockerami/host/retired ] || [ $n -ge 600 ]; "
    "do sleep 0.2; n=$((n+1)); done; echo told: $(cat /run/dockerami/host/retired); sleep 10"
)


def test_a_full_disk_is_pruned_then_the_instance_retires_after_its_running_build(
        make_master, cloud, engine, worker_image, prunable):
    master = make_master(master_cfg(
        image=worker_image, command=WAIT_FOR_RETIREMENT, build_wait_timeout=60,
        worker_extra=f"isolation='container', disk_floor='8M', {CACHES}",
        plugins={"dockerami": {}}) + SECOND_BUILDER)
    # A cache no build holds: pruned before the instance gives up.
    other = master.wait_request(master.force("other", "force-other"), 180)
    assert other["results"] == SUCCESS
    instance_id = only_instance(cloud)["InstanceId"]
    tag = make_prunable(engine, instance_id, prunable)

    brid = master.force()
    wait_for(lambda: master.builds_for(brid), 60, "the build to start")
    build = master.builds_for(brid)[0]
    wait_for(lambda: "started" in master.step_log(build["buildid"]), 60, "the build to run")
    volumes = cache_volumes(engine, instance_id)
    assert sorted(volumes.values()) == ["other", "runtests"]
    filler = fill(Path(cloud.runtime.disk_path), 12)  # 4 MiB left: below the 8 MiB floor

    console = lambda: cloud.runtime.console(instance_id) or ""  # noqa: E731
    wait_for(lambda: "RETIRING: disk_full" in console(), 60, "the instance to retire")
    assert re.search(r"disk: \d+ MiB free on \S+, below the floor \(8M: 8 MiB\); pruning",
                     console())
    assert f"removed image {tag}" in console()
    with pytest.raises(ImageNotFound):
        engine.images.get(tag)
    removed = next(v for v, builder in volumes.items() if builder == "other")
    assert f"removed cache volume {removed}" in console()  # the one no build held
    assert list(cache_volumes(engine, instance_id).values()) == ["runtests"]
    retiring = wait_for(lambda: master.fleet()["workers"][0]["instance"]["retired"], 10,
                        "the Fleet API to show the instance retiring")
    assert retiring.startswith("disk_full: ")
    assert master.fleet()["workers"][0]["state"] == "building"

    # The running build is not interrupted: it finishes, then the instance is terminated.
    final = master.wait_request(brid, 120)
    assert final["results"] == SUCCESS and final["buildid"] == build["buildid"]
    assert "told: disk_full: " in master.step_log(build["buildid"])
    wait_for(lambda: state_of(cloud, instance_id) == "terminated", 60, "the termination")
    assert "stopped for reuse" not in master.log()
    (row,) = master.fleet()["workers"]
    assert row["last_failure"].startswith(
        f"instance {instance_id} retired itself: disk_full: "), "\n".join(
        line for line in master.log().splitlines()
        if re.search("retire|shut|terminat|never|w0", line))[-6000:] + console()
    assert 'dockerami_retirements_total{reason="disk_full"} 1.0' in master.metrics().text

    filler.unlink()
    again = master.wait_request(master.force("other", "force-other"), 180)
    assert again["results"] == SUCCESS
    ran_on = re.search(r"DOCKERAMI_INSTANCE_ID=(i-\w+)", master.step_log(again["buildid"]))
    assert ran_on and ran_on.group(1) != instance_id  # on a new instance


def test_an_instance_full_at_boot_says_so_and_the_build_is_retried_elsewhere(
        make_master, cloud, engine, worker_image, small_disk):
    filler = fill(small_disk, 12)
    master = make_master(master_cfg(
        image=worker_image, command=CACHE_PROBE, build_wait_timeout=60,
        worker_extra=f"isolation='container', disk_floor='8M', {CACHES}"))
    brid = master.force()
    wait_for(lambda: master.builds_for(brid) and master.builds_for(brid)[0]["complete"], 120,
             "the first attempt to end")
    first = master.builds_for(brid)[0]
    assert first["results"] == RETRY
    retired = instance_ids(cloud)[0]
    assert f"instance {retired} retired itself: disk_full" in master.log()
    wait_for(lambda: state_of(cloud, retired) == "terminated", 60, "the retired instance to end")
    filler.unlink()
    final = master.wait_request(brid, 180)
    assert final["results"] == SUCCESS
    assert facts(master, final)["instance"] != retired
    assert "never connected" not in master.log()


def test_without_isolation_a_retiring_instance_is_terminated_not_stopped(
        make_master, cloud, engine, worker_image):
    """One worker, one container for every build (isolation='none'), idle_action='stop':
    the build running when the disk fills finishes, then the instance is terminated,
    never stopped for reuse; the next build gets a new instance."""
    master = make_master(master_cfg(
        image=worker_image, command=WAIT_FOR_RETIREMENT, build_wait_timeout=60,
        worker_extra="idle_action='stop', disk_floor='8M',") + SECOND_BUILDER)
    brid = master.force()
    build = wait_for(lambda: master.builds_for(brid), 120, "the build to start")[0]
    wait_for(lambda: "started" in master.step_log(build["buildid"]), 60, "the build to run")
    instance_id = only_instance(cloud)["InstanceId"]
    filler = fill(Path(cloud.runtime.disk_path), 12)
    final = master.wait_request(brid, 120)
    assert final["results"] == SUCCESS and final["buildid"] == build["buildid"]
    assert "told: disk_full: " in master.step_log(build["buildid"])
    wait_for(lambda: state_of(cloud, instance_id) == "terminated", 60, "the termination")
    assert "stopped for reuse" not in master.log()
    assert f"instance {instance_id} retired itself: disk_full" in master.log()

    filler.unlink()
    again = master.wait_request(master.force("other", "force-other"), 180)
    assert again["results"] == SUCCESS
    assert len(instance_ids(cloud)) == 2
