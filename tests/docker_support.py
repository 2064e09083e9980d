"""Fixtures' helpers for the tests that need a real Docker engine and a loopback registry."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path

import docker
import pytest
import requests
from docker.errors import DockerException, ImageNotFound

from tests.harness import free_port, wait_for

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
    """Debian's docker-registry on 127.0.0.1 with storage in a temp dir; restartable."""

    def __init__(self, root: Path) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        root.mkdir(parents=True, exist_ok=True)
        self.config = root / "config.yml"
        self.config.write_text(
            "version: 0.1\n"
            "log:\n  level: warn\n"
            f"storage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n"
            f"http:\n  addr: {self.address}\n"
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
            return requests.get(f"http://{self.address}/v2/", timeout=1).status_code == 200
        except requests.ConnectionError:
            return False

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=20)
            self.process = None
            time.sleep(0.2)


def container_names(client: docker.DockerClient, prefix: str = "dockerami-") -> list[str]:
    return [c.name for c in client.containers.list(all=True) if c.name.startswith(prefix)]


def images_of(client: docker.DockerClient, prefix: str) -> list[str]:
    """Tags on the engine that start with ``prefix`` (e.g. a throwaway registry's address)."""
    return [tag for image in client.images.list() for tag in image.tags if tag.startswith(prefix)]


def remove_repository(client: docker.DockerClient, prefix: str) -> None:
    """Remove the containers started from, and the images tagged with, ``prefix``."""
    tags = images_of(client, prefix)
    for container in client.containers.list(all=True):
        if any(tag in container.image.tags for tag in tags):
            container.remove(force=True)
    for tag in tags:
        with contextlib.suppress(ImageNotFound):
            client.images.remove(tag, force=True)
