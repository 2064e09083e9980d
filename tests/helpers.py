"""What many tests ask of the local cloud (instances as EC2's API lists them, the most
running at once) and of a master's pools: one copy each, for every test module."""

from __future__ import annotations

import base64
import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import requests

from buildbot_dockerami.localcloud import LocalCloud
from tests.harness import REPO, Master, master_cfg

#: Debian's chromium, which Playwright drives (no browser download): dev/browser.
CHROMIUM = os.environ.get("DOCKERAMI_CHROMIUM", "/usr/bin/chromium")
#: Where browser tests leave their screenshots.
ARTIFACTS = REPO / "test-artifacts"
VIEWPORT = {"width": 1280, "height": 800}

#: Instances that are booting or up: what a cap counts.
RUNNING = ("pending", "running")
#: Instances not (being) terminated: what a master must not leave behind.
NOT_ENDED = ("pending", "running", "stopping", "stopped")


def instances(cloud: LocalCloud, **filters: str) -> list[dict]:
    """Every instance, as DescribeInstances lists it; ``filters`` are EC2's
    (e.g. **{"tag:buildbot:master": tag})."""
    ec2 = cloud.client()
    flt = [{"Name": k, "Values": [v]} for k, v in filters.items()]
    pages = ec2.get_paginator("describe_instances").paginate(Filters=flt)
    return [i for page in pages for r in page["Reservations"] for i in r["Instances"]]


def state_of(cloud: LocalCloud, instance_id: str) -> str:
    return instances(cloud, **{"instance-id": instance_id})[0]["State"]["Name"]


def user_data_of(cloud: LocalCloud, instance_id: str) -> str:
    value = cloud.client().describe_instance_attribute(
        InstanceId=instance_id, Attribute="userData")["UserData"]["Value"]
    return base64.b64decode(value).decode()


def live(cloud: LocalCloud, states: tuple[str, ...] = RUNNING, **filters: str) -> list[dict]:
    """The instances in ``states`` (booting or up, by default)."""
    return [i for i in instances(cloud, **filters) if i["State"]["Name"] in states]


def ids(found: list[dict]) -> list[str]:
    return [i["InstanceId"] for i in found]


@contextlib.contextmanager
def peak_of_live(cloud: LocalCloud, interval: float = 0.05) -> Iterator[list[int]]:
    """The most instances pending or running at once while the block runs (peak[0]),
    sampled every ``interval`` seconds."""
    peak, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], len(live(cloud)))
            stop.wait(interval)  # sampling: the block's own waits are what end it

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        stop.set()
        sampler.join()


def pool_master(make_master: Callable[..., Master], count: int, **kwargs: Any) -> Master:
    """A master with ``worker_pool('pool', count=count)``, whose controls anyone may use."""
    return make_master(master_cfg(pool=f"'pool', count={count}",
                                  plugins={"dockerami": {"anonymous_control": True}}, **kwargs))


def set_pool(master: Master, **body: Any) -> requests.Response:
    return master.control(action="set_pool", pool="pool", **body)


def pools(master: Master) -> dict:
    return master.fleet()["pools"]
