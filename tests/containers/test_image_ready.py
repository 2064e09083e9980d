"""On a real Docker engine: the real bootstrap says on the console whether the image was
already present (baked into the AMI) or how long its pull took, the reference image
passes that on as worker info, and the master's Fleet API shows an "image ready" step
between the launch and the connection. Under the seed's crontab line nothing is
reported: the worker works the same, without the step."""

from __future__ import annotations

import contextlib
import re

import pytest
from docker.errors import ImageNotFound

from buildbot_dockerami.localcloud.containers import LegacyCrontabRuntime
from tests.docker_support import only_instance
from tests.harness import SUCCESS, master_cfg, wait_for

pytestmark = pytest.mark.integration


def connected_row(make_master, worker_image: str, worker_extra: str = "") -> tuple[dict, object]:
    """Runs one build and returns the worker's Fleet API row once it is connected."""
    master = make_master(master_cfg(image=worker_image, command="true", build_wait_timeout=600,
                                    plugins={"dockerami": {}}, worker_extra=worker_extra))
    build = master.wait_request(master.force(), 180)
    assert build["results"] == SUCCESS, master.log()[-3000:]
    row = wait_for(lambda: next((w for w in master.fleet()["workers"]
                                 if "connected" in w["timeline"]), None),
                   30, "the worker's timeline")
    return row, master


def assert_step_between_launch_and_connection(row: dict) -> None:
    timeline, launched = row["timeline"], row["instance"]["launched_at"]
    # Strictly inside: the reported time, not a clamp to either end (same clock here).
    assert launched < timeline["image_ready"] < timeline["connected"], (launched, timeline)
    assert row["image_ready"]["at"] == timeline["image_ready"]


def test_image_already_present_is_said_on_the_console_and_shown_as_image_ready(
        make_master, cloud, engine, worker_image):
    # As if baked into the AMI: on the engine before the instance boots.
    engine.images.pull(worker_image)
    row, _ = connected_row(make_master, worker_image)
    console = cloud.runtime.console(only_instance(cloud)["InstanceId"])
    assert re.search(rf"^dockerami-bootstrap: image {re.escape(worker_image)} already present "
                     r"\(registry checked in \d+\.\d s\)$", console, re.M), console
    assert "dockerami-bootstrap: pulled" not in console
    assert_step_between_launch_and_connection(row)
    assert row["image_ready"]["already_present"] is True
    assert row["image_ready"]["pull_seconds"] is None


def test_pulled_image_says_how_long_the_pull_took(make_master, cloud, engine, worker_image):
    with contextlib.suppress(ImageNotFound):
        engine.images.remove(worker_image)
    row, _ = connected_row(make_master, worker_image)
    console = cloud.runtime.console(only_instance(cloud)["InstanceId"])
    pulled = re.search(rf"^dockerami-bootstrap: pulled {re.escape(worker_image)} "
                       r"in (\d+\.\d) s$", console, re.M)
    assert pulled, console
    assert "already present" not in console
    assert_step_between_launch_and_connection(row)
    assert row["image_ready"]["already_present"] is False
    assert row["image_ready"]["pull_seconds"] == float(pulled.group(1))


@pytest.mark.parametrize("runtime", [LegacyCrontabRuntime])
def test_without_a_report_there_is_no_image_ready_step_and_nothing_breaks(
        make_master, cloud, worker_image):
    """The seed's crontab line passes nothing to the image (as a seed image would report
    nothing): the worker connects and builds, the timeline has no "image ready" step."""
    row, master = connected_row(  # the seed's curl reads the user data without a token
        make_master, worker_image,
        "metadata_options={'HttpTokens': 'optional', 'HttpEndpoint': 'enabled'},")
    assert "image_ready" not in row["timeline"]
    assert row["image_ready"] is None
    assert "Traceback" not in master.log()
