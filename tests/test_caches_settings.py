"""The settings ``caches`` and ``disk_floor``: checked at checkconfig, carried as user-data
extensions the seed's readers ignore."""

from __future__ import annotations

import pytest
from buildbot.process.properties import Property

from buildbot_dockerami.config import checks
from buildbot_dockerami.config.model import WorkerSettings
from buildbot_dockerami.fleet.launch import Slot, slot_user_data
from buildbot_dockerami.protocol import caches, userdata

CCACHE = {"ccache": "/home/builder/.ccache", "cargo": "/home/builder/.cargo/registry"}


def test_good_caches_pass_and_travel_as_extension_lines():
    assert caches.cache_problems(CCACHE) == []
    assert caches.extensions(CCACHE, None) == {
        "cache.ccache": "/home/builder/.ccache", "cache.cargo": "/home/builder/.cargo/registry"}


@pytest.mark.parametrize(("value", "fragment"), [
    ("ccache", "must be a dict of cache name to path"),
    ({}, "give at least one cache"),
    ({"CC": "/c"}, "name 'CC' must be 1-32 characters"),
    ({"c": "relative/dir"}, "must be an absolute, normalised path"),
    ({"c": "/a/../b"}, "must be an absolute, normalised path"),
    ({"c": "/a/b/"}, "must be an absolute, normalised path"),
    ({"c": "/with space"}, "may only have letters"),
    ({"c": "/a,readonly"}, "may only have letters"),
    ({"c": "/a;rm"}, "may only have letters"),
    ({"c": 5}, "the path must be a string, not int"),
    ({"c": "/usr"}, "would hide the image's own files"),
    ({"c": "/"}, "would hide the image's own files"),
    ({"c": "/run/dockerami/host"}, "would hide the image's own files"),
    ({"a": "/cache/a", "b": "/cache/a/b"}, "overlap"),
    ({"a": "/cache/a", "b": "/cache/a"}, "overlap"),
    ({f"c{i}": f"/cache/{i}" for i in range(17)}, "at most 16 caches"),
])
def test_bad_caches_are_refused_naming_the_setting(value, fragment):
    problems = caches.cache_problems(value)
    assert problems and all(p.startswith("caches: ") for p in problems)
    assert fragment in " ".join(problems), problems


@pytest.mark.parametrize(("value", "line"), [
    ("10%", "10%"), (" 25 % ", "25%"), ("20G", "20480M"), ("512M", "512M"), ("1.5GiB", "1536M"),
    (20, "20480M"), (0.05, "52M"),
])
def test_disk_floor_spellings(value, line):
    assert caches.disk_floor_problems(value) == []
    assert caches.extensions(None, value) == {"disk.floor": line}


@pytest.mark.parametrize("value", ["0%", "91%", "10.5%", "-1G", "0", 0, -2, True, "lots",
                                   float("inf"), [10]])
def test_bad_disk_floors_are_refused(value):
    (problem,) = caches.disk_floor_problems(value)
    assert problem.startswith("disk_floor: must be a percentage of the disk like '10%'")


def test_checks_refuse_renderables_and_caches_without_a_kept_instance():
    def problems(**values):
        return checks.disk_problems(WorkerSettings(**values))

    assert problems(caches=CCACHE, disk_floor="5%") == []
    assert problems(caches=Property("c")) == [
        "caches: cannot be a renderable (it is not rendered per build)"]
    assert problems(disk_floor=Property("f")) == [
        "disk_floor: cannot be a renderable (it is not rendered per build)"]
    assert problems(caches=CCACHE, isolation="instance") == [
        "caches: not with isolation='instance' (each build's instance is terminated with "
        "its disk; use isolation='container')"]


@pytest.mark.parametrize(("isolation", "max_builds", "refused"), [
    ("container", None, False), ("none", 1, False), ("none", None, True), ("none", 2, True)])
def test_caches_without_isolation_need_one_build_at_a_time(isolation, max_builds, refused):
    settings = WorkerSettings(caches=CCACHE, isolation=isolation)
    problems = checks.cache_builds_problems(settings, max_builds)
    assert bool(problems) == refused
    assert all(p.startswith("caches: with isolation='none' needs max_builds=1") for p in problems)
    assert checks.cache_builds_problems(WorkerSettings(isolation=isolation), max_builds) == []


def test_user_data_keeps_the_seed_lines_and_adds_the_extensions():
    values = {"image": "org/w:1", "setup_repo": None, "setup_branch": None}
    plain = slot_user_data([Slot("w", "pw", None)], "m:9989", values, isolated=False,
                           tls_fingerprint=None)
    assert plain == "w pw m:9989\norg/w:1"  # nothing set: nothing added
    text = slot_user_data([Slot("w", "pw", None)], "m:9989", values, isolated=True,
                          tls_fingerprint=None, disk=caches.extensions(CCACHE, "15%"))
    assert text.split("\n")[:4] == ["w pw m:9989", "org/w:1", "", ""]
    assert text.split("\n")[4:] == ["isolation=container", "cache.ccache=/home/builder/.ccache",
                                    "cache.cargo=/home/builder/.cargo/registry",
                                    "disk.floor=15%"]
    assert userdata.parse(text).extensions["cache.cargo"] == "/home/builder/.cargo/registry"
