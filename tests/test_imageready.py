"""The "image ready" step: what the image reports at connect, placed on the master's clock,
and shown by the Fleet API (real master, process runtime of the local cloud)."""

from __future__ import annotations

import pytest

from buildbot_dockerami.localcloud.timing import BootClock, Delays
from buildbot_dockerami.protocol import imageready
from buildbot_dockerami.protocol.imageready import ImageReady, from_info
from tests.harness import SUCCESS, master_cfg, wait_for

LAUNCHED, REQUESTED, CONNECTED = 100.0, 90.0, 160.0


def test_reported_time_between_launch_and_connection_is_kept() -> None:
    info = {"image_ready": "130.25\n", "image_pull": "41.3"}
    assert from_info(info, LAUNCHED, REQUESTED, CONNECTED) == ImageReady(130.25, False, 41.3)


def test_already_present_has_no_pull_seconds() -> None:
    info = {"image_ready": "120", "image_pull": "present"}
    assert from_info(info, LAUNCHED, REQUESTED, CONNECTED) == ImageReady(120.0, True, None)


@pytest.mark.parametrize(("reported", "placed"), [
    ("40.0", LAUNCHED),    # the instance's clock is behind the master's
    ("999.0", CONNECTED),  # ... or ahead
])
def test_skewed_instance_clock_is_clamped(reported: str, placed: float) -> None:
    ready = from_info({"image_ready": reported, "image_pull": "present"},
                      LAUNCHED, REQUESTED, CONNECTED)
    assert ready is not None and ready.at == placed


@pytest.mark.parametrize("info", [
    {},  # a seed image reports nothing
    {"image_pull": "present"},
    {"image_ready": ""},
    {"image_ready": "soon"},
    {"image_ready": "nan"},
    {"image_ready": "-5"},
])
def test_no_usable_report_no_step(info: dict) -> None:
    assert from_info(info, LAUNCHED, REQUESTED, CONNECTED) is None


def test_unreadable_pull_keeps_the_step_without_its_duration() -> None:
    ready = from_info({"image_ready": "130", "image_pull": "a while"},
                      LAUNCHED, REQUESTED, CONNECTED)
    assert ready == ImageReady(130.0, False, None)


def test_instance_not_launched_for_this_request_has_no_step() -> None:
    """A shared instance already up readied its image for an earlier request."""
    assert from_info({"image_ready": "50", "image_pull": "present"},
                     launched_at=40.0, requested_at=REQUESTED, connected_at=CONNECTED) is None


def test_api_row_only_while_the_timeline_has_the_step() -> None:
    ready = ImageReady(130.0, False, 41.3)
    assert imageready.row({"requested": 90.0, "image_ready": 130.0}, ready) == {
        "at": 130.0, "already_present": False, "pull_seconds": 41.3}
    # A new request reset the timeline; the last connection's report is stale.
    assert imageready.row({"requested": 200.0}, ready) is None
    assert imageready.row({"requested": 90.0}, None) is None


def test_local_cloud_pull_the_process_runtime_reports() -> None:
    """0 means the image was on the disk: baked in (no pull delay) or kept by a stop."""
    clock = BootClock(Delays(boot=20, pull={"big": {"m": 40, "*": 60}}), clock=lambda: 100.0)
    clock.launched(["i-1"], "big", "m")
    clock.launched(["i-2"], "baked", "m")
    assert [clock.pull_seconds(i) for i in ("i-1", "i-2", "i-unknown")] == [40, 0, 0]
    clock.started(["i-1"])
    assert clock.pull_seconds("i-1") == 0


@pytest.mark.integration
@pytest.mark.parametrize("pull", [0.0, 1.5])
def test_fleet_api_shows_image_ready_between_launch_and_connection(make_master, cloud, pull):
    """The process runtime reports the emulated pull as the image would (0: baked in)."""
    image = "localhost/dockerami/worker:test"
    cloud.delays.boot = 0.5
    cloud.delays.pull = {image: pull}
    master = make_master(master_cfg(image=image, build_wait_timeout=600,
                                    plugins={"dockerami": {}}))
    assert master.wait_request(master.force(), 90)["results"] == SUCCESS
    row = wait_for(lambda: next((w for w in master.fleet()["workers"]
                                 if "connected" in w["timeline"]), None),
                   30, "the worker's timeline")
    timeline, launched = row["timeline"], row["instance"]["launched_at"]
    assert launched < timeline["image_ready"] <= timeline["connected"], (launched, timeline)
    # Ready at the end of the emulated boot + pull, not merely clamped to the launch.
    assert timeline["image_ready"] - launched >= 0.5 + pull - 0.3, (launched, timeline)
    assert row["image_ready"] == {
        "at": timeline["image_ready"], "already_present": pull == 0,
        "pull_seconds": None if pull == 0 else pull}
