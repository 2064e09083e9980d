"""Fixtures for tests on a real Docker engine: engine, loopback registry, the worker
image (built and pushed with the CLI) and a local cloud with the container runtime."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import pytest

from buildbot_dockerami.localcloud import LocalCloud
from buildbot_dockerami.localcloud.containers import ContainerRuntime
from tests.docker_support import (
    BASE_IMAGE,
    Registry,
    cli,
    containers_of,
    docker_client,
    images_of,
    instance_ids,
    remove_repository,
)
from tests.harness import REPO


@pytest.fixture(scope="session")
def engine() -> docker.DockerClient:
    return docker_client()


@pytest.fixture(scope="session")
def registry(engine: docker.DockerClient,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    registry = Registry(tmp_path_factory.mktemp("registry")).start()
    yield registry
    registry.stop()


@pytest.fixture(scope="session")
def worker_image(engine: docker.DockerClient, registry: Registry) -> Iterator[str]:
    """The project's image, built and pushed with the CLI, then removed locally so that
    every boot really pulls it from the registry. At the end, whatever the tests pulled
    or started from it is removed from the engine (about 450 MB a run otherwise)."""
    repo = f"{registry.address}/dockerami/worker-linux"
    built = cli("image", "build", str(REPO / "images" / "worker-linux"), "--repo", repo,
                "--base", BASE_IMAGE, "--wheels")
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    tag = built.stdout.strip().splitlines()[-1]
    assert tag.startswith(f"{repo}:20"), tag  # dated tag, the seed's convention
    pushed = cli("image", "push", tag)
    assert pushed.returncode == 0, pushed.stdout[-3000:] + pushed.stderr[-3000:]
    assert f"pushed {tag}" in pushed.stdout
    engine.images.remove(tag)
    yield tag
    remove_repository(engine, f"{registry.address}/")
    assert not images_of(engine, f"{registry.address}/"), "test images left on the engine"


RuntimeFactory = Callable[[Path], ContainerRuntime]


@pytest.fixture
def runtime() -> RuntimeFactory:
    return lambda directory: ContainerRuntime(directory, pull_attempts=20, pull_max_delay=2)


@pytest.fixture
def cloud(tmp_path: Path, engine: docker.DockerClient,
          runtime: RuntimeFactory) -> Iterator[LocalCloud]:
    state = tmp_path / "cloud"
    with LocalCloud(state_dir=state, runtime=runtime(state / "instances")) as local_cloud:
        yield local_cloud
        launched = instance_ids(local_cloud)
    assert not containers_of(engine, launched), "containers left after the cloud stopped"
