"""Fixtures' helpers for the tests that need a real Docker engine and a loopback registry."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from pathlib import Path

import docker
import pytest
import requests
from docker.errors import DockerException, ImageNotFound, NotFound

from buildbot_dockerami.localcloud import LocalCloud
from tests.harness import BIN, Master, free_port, wait_for

BASE_IMAGE = os.environ.get("DOCKERAMI_BASE_IMAGE", "dockerami/base:bookworm")
SKIPPED_FOR_DOCKER: list[str] = []


def require(condition: bool, why: str) -> None:
    """Skip loudly without an engine; under CI a missing engine is a failure."""
    if condition:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {why}; run dev/engine first")
    SKIPPED_FOR_DOCKER.append(why)
    pytest.skip(f"NO DOCKER ENGINE: {why} (run dev/engine as root to enable these tests)")


def docker_client() -> docker.DockerClient:
    try:
        client = docker.from_env()
        client.ping()
    except DockerException as e:
        require(False, f"no Docker engine reachable ({e.__class__.__name__})")
        raise
    try:
        client.images.get(BASE_IMAGE)
    except ImageNotFound:
        require(False, f"base image {BASE_IMAGE} is missing")
    return client


class Registry:
    """Debian's docker-registry on 127.0.0.1 with storage in a temp dir; restartable.
    With ``users`` (name -> password) it wants HTTP basic auth (an htpasswd file)."""

    def __init__(self, root: Path, users: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        root.mkdir(parents=True, exist_ok=True)
        self.config = root / "config.yml"
        auth = ""
        if users:
            import bcrypt  # the registry's htpasswd takes bcrypt hashes only

            htpasswd = root / "htpasswd"
            htpasswd.write_text("".join(
                f"{name}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()}\n"
                for name, password in users.items()))
            auth = f"auth:\n  htpasswd:\n    realm: test\n    path: {htpasswd}\n"
        self.config.write_text(
            "version: 0.1\n"
            "log:\n  level: warn\n"
            f"storage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n"
            f"http:\n  addr: {self.address}\n" + auth
        )
        self.log = root / "registry.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> Registry:
        self.process = subprocess.Popen(
            ["docker-registry", "serve", str(self.config)],
            stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,  # noqa: SIM115
        )
        wait_for(self.up, 20, "the registry to answer")
        return self

    def up(self) -> bool:
        try:
            return requests.get(f"http://{self.address}/v2/", timeout=1).status_code in (200, 401)
        except requests.ConnectionError:
            return False

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=20)
            self.process = None
            wait_for(lambda: not self.up(), 10, "the registry to stop answering")


def refresh_checks(registry: Registry, path: str) -> int:
    """The master's registry checks of ``path`` (its access log shows each request)."""
    from buildbot_dockerami.cloud.image_digests import USER_AGENT

    return sum(1 for line in registry.log.read_text().splitlines()
               if f'"HEAD {path} ' in line and USER_AGENT in line)


def container_names(client: docker.DockerClient, prefix: str = "dockerami-") -> list[str]:
    """One listing call: docker-py's ``containers.list`` inspects each container after
    listing them, and fails on one removed in between (another test's, or a slot's)."""
    names = [name.lstrip("/") for c in client.api.containers(all=True)
             for name in c.get("Names") or ()]
    return [name for name in names if name.startswith(prefix)]


def instance_ids(cloud: LocalCloud) -> list[str]:
    return [i["InstanceId"] for r in cloud.client().describe_instances()["Reservations"]
            for i in r["Instances"]]


def containers_of(client: docker.DockerClient, ids: list[str]) -> list[str]:
    """The containers of these instances (one, or one per slot): the engine may also run
    another test run's."""
    return sorted(name for name in container_names(client)
                  if any(name.startswith(f"dockerami-{iid}") for iid in ids))


def images_of(client: docker.DockerClient, prefix: str) -> list[str]:
    """Tags on the engine that start with ``prefix`` (e.g. a throwaway registry's address)."""
    return [tag for image in client.images.list() for tag in image.tags if tag.startswith(prefix)]


def remove_repository(client: docker.DockerClient, prefix: str) -> None:
    """Remove the containers started from, and the images tagged with, ``prefix``."""
    tags = images_of(client, prefix)
    for container in client.api.containers(all=True):
        if container.get("Image") in tags:
            with contextlib.suppress(NotFound):
                client.api.remove_container(container["Id"], force=True)
    for tag in tags:
        with contextlib.suppress(ImageNotFound):
            client.images.remove(tag, force=True)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "buildbot-dockerami"), *args], capture_output=True,
                          text=True, timeout=900, check=False)


def only_instance(cloud: LocalCloud) -> dict:
    (reservation,) = cloud.client().describe_instances()["Reservations"]
    (instance,) = reservation["Instances"]
    return instance


# Reports what a build can see of earlier builds, then leaves all of that behind. The
# marker process is found through /proc (no procps in the image); the pattern and the
# name are spelled so that neither this script nor grep matches itself.
LEFTOVERS = (
    "echo container=$(grep -o 'containers/[0-9a-f]*' /proc/self/mountinfo | head -n 1 "
    "| cut -d/ -f2) instance=$DOCKERAMI_INSTANCE_ID; "
    "seen() { if [ -e \"$1\" ]; then echo yes; else echo no; fi; }; "
    "echo leftovers: workspace=$(seen marker-ws) home=$(seen $HOME/marker-home) "
    "tmp=$(seen /tmp/marker-tmp) process=$(grep -las 'leftover-sleepe[r]' /proc/[0-9]*/cmdline "
    ">/dev/null && echo yes || echo no); "
    "touch marker-ws $HOME/marker-home /tmp/marker-tmp; "
    "m=leftover; setsid nohup sh -c \"sleep 1000 # $m-sleeper\" >/dev/null 2>&1 &"
)


def facts(master: Master, build: dict) -> dict[str, str]:
    text = master.step_log(build["buildid"])
    found = dict(re.findall(r"\b(container|instance|workspace|home|tmp|process)=(\S*)", text))
    assert found.get("container") and found.get("instance"), text
    return found
