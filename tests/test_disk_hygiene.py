"""The bootstrap's disk hygiene, its own shell functions run by sh on a small tmpfs: what
is pruned, in which order, down to the floor, and the retirement when nothing is left.

The Docker engine is a stand-in here (a script that keeps "images" and "volumes" as files
on the tmpfs, so removing one frees its space); tests/containers/test_caches.py drives
the same functions with the real engine and the real bootstrap.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import REPO
from tests.helpers import tmpfs

SECTION = re.compile(r"^# --- caches and disk hygiene -+\n.*?^# --- end of caches and disk "
                     r"hygiene -+\n", re.M | re.S)

FAKE_DOCKER = r"""#!/bin/sh
D=$FAKE_DISK
echo "$*" >> "$FAKE_CALLS"
case "$1 $2" in
    "image ls")
        for f in "$D"/images/*; do
            [ -e "$f" ] && echo "sha256:${f##*/} repo/${f##*/}:1"
        done ;;
    "image rm")
        n=${3#repo/}; n=${n%:1}
        [ "$n" != current ] || { echo "image is in use" >&2; exit 1; }
        rm -f "$D/images/$n" ;;
    "volume prune") rm -f "$D"/anon/* ;;
    "builder prune") rm -f "$D/buildcache" ;;
    "volume ls") ls "$D/caches" ;;
    "volume inspect") for last; do :; done; echo "$D/caches/$last" ;;
    "volume rm") rm -rf "$D/caches/$3" ;;
esac
"""


def run(env: dict[str, str], body: str) -> subprocess.CompletedProcess:
    """The bootstrap's caches-and-disk functions, with the globals the bootstrap sets."""
    script = (REPO / "ami" / "dockerami-bootstrap.sh").read_text()
    section = SECTION.search(script)
    assert section, "the caches and disk hygiene section is not in the bootstrap"
    prelude = (
        "set -eu\n"
        'log() { echo "dockerami-bootstrap: $*"; }\n'
        'slot_container() { echo "worker-$1"; }\n'
        "slots=2 isolation=container image_id=sha256:current caches= PRUNE_FILTER=\n"
        ": \"${STATE_DIR:=/nonexistent}\"\n"
        "VOLUME_PREFIX=dockerami\n"
    )
    return subprocess.run(["sh", "-c", prelude + section.group(0) + body], env=env,
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs: the instance's disk."""
    with tmpfs(tmp_path / "disk") as point:
        for part in ("images", "anon", "caches"):
            (point / part).mkdir()
        yield point


def fill(path: Path, mib: int) -> None:
    path.write_bytes(b"\1" * (mib << 20))


@pytest.fixture
def env(tmp_path: Path, disk: Path) -> dict[str, str]:
    docker = tmp_path / "docker"
    docker.write_text(FAKE_DOCKER)
    docker.chmod(0o755)
    state = tmp_path / "state"
    (state / "slot.0" / "host").mkdir(parents=True)
    (state / "slot.1").mkdir(parents=True)
    return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DOCKER": str(docker),
            "STATE_DIR": str(state), "FAKE_DISK": str(disk),
            "FAKE_CALLS": str(tmp_path / "calls"),
            "disk_path": str(disk)}


def calls(env: dict[str, str]) -> list[str]:
    path = Path(env["FAKE_CALLS"])
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.parametrize(("spec", "total", "floor"), [
    ("10%", 1000000, 100000), ("90%", 1000, 900), ("512M", 5, 524288), ("1M", 0, 1024)])
def test_the_floor_in_kib(spec, total, floor):
    result = run({}, f'disk_floor_kib "{spec}" {total}')
    assert result.stdout.strip() == str(floor), result.stderr


@pytest.mark.parametrize("spec", ["", "%", "ten%", "10", "5G", "-1M", "1.5M"])
def test_a_bad_floor_is_refused(spec):
    assert run({}, f'disk_floor_kib "{spec}" 1000').returncode == 1


def test_above_the_floor_nothing_is_pruned(env, disk):
    fill(disk / "images" / "old", 2)
    result = run(env, 'disk_floor_spec=4M\nkeep_disk && echo kept')
    assert result.stdout.strip() == "kept", result.stderr
    assert calls(env) == [] and (disk / "images" / "old").exists()


def test_old_images_go_first_and_pruning_stops_at_the_floor(env, disk):
    fill(disk / "images" / "current", 2)
    fill(disk / "images" / "old", 6)
    fill(disk / "anon" / "v", 2)
    (disk / "caches" / "dockerami-cache-a").mkdir()
    fill(disk / "caches" / "dockerami-cache-a" / "objects", 2)
    result = run(env, 'disk_floor_spec=8M\nkeep_disk && echo kept')
    assert result.stdout.strip().splitlines()[-1] == "kept", result.stdout + result.stderr
    assert "below the floor (8M: 8 MiB); pruning" in result.stdout
    assert "removed image repo/old:1" in result.stdout
    assert not (disk / "images" / "old").exists()
    assert (disk / "images" / "current").exists()  # line 2's image stays
    assert (disk / "anon" / "v").exists() and (disk / "caches" / "dockerami-cache-a").exists()
    assert not any(c.startswith(("volume prune", "volume rm")) for c in calls(env))


def test_caches_go_last_least_recently_used_first_and_never_an_attached_one(env, disk):
    fill(disk / "images" / "current", 2)
    fill(disk / "images" / "old", 2)
    fill(disk / "anon" / "v", 2)
    fill(disk / "buildcache", 1)
    for name, stamp in (("oldest", "2020-01-01"), ("newer", "2024-01-01"),
                        ("attached", "2019-01-01"), ("other-instance", "2018-01-01")):
        volume = disk / "caches" / (name if name == "other-instance"
                                    else f"dockerami-cache-{name}")
        volume.mkdir()
        fill(volume / "objects", 2 if name != "other-instance" else 1)
        subprocess.run(["touch", "-d", stamp, str(volume)], check=True)
    (Path(env["STATE_DIR"]) / "slot.1" / "attached").write_text("dockerami-cache-attached\n")
    # 16 MiB, 14 used: old image, unused volumes and build cache, then the oldest cache
    # and the newer one are needed to get 11 free; the attached one is never removed.
    result = run(env, 'disk_floor_spec=11M\nkeep_disk && echo kept')
    assert result.stdout.strip().splitlines()[-1] == "kept", result.stdout + result.stderr
    removed = [c for c in calls(env) if c.startswith(("image rm", "volume prune",
                                                       "builder prune", "volume rm"))]
    assert removed[0] == "image rm repo/old:1"
    assert removed[1].startswith("volume prune -f --filter label!=dockerami.cache")
    assert removed[2:] == ["builder prune -a -f", "volume rm dockerami-cache-oldest",
                           "volume rm dockerami-cache-newer"]
    assert (disk / "caches" / "dockerami-cache-attached").exists()
    assert (disk / "caches" / "other-instance").exists()  # not this instance's prefix
    assert "free after pruning" in result.stdout
    assert not (Path(env["STATE_DIR"]) / "retired").exists()


def test_too_full_after_everything_the_instance_retires_once(env, disk):
    fill(disk / "images" / "current", 4)
    (disk / "caches" / "dockerami-cache-attached").mkdir()
    fill(disk / "caches" / "dockerami-cache-attached" / "objects", 4)
    (Path(env["STATE_DIR"]) / "slot.0" / "attached").write_text("dockerami-cache-attached\n")
    result = run(env, 'disk_floor_spec=12M\nkeep_disk || echo "retired: $?"')
    assert result.stdout.strip().splitlines()[-1] == "retired: 1", result.stdout + result.stderr
    state = Path(env["STATE_DIR"])
    reason = (state / "retired").read_text()
    assert reason.startswith("disk_full: ") and "below the floor (12M: 12 MiB)" in reason
    assert (state / "slot.0" / "host" / "retired").read_text() == reason
    assert [c for c in calls(env) if c.startswith("kill")] == [
        "kill --signal HUP worker-0", "kill --signal HUP worker-1"]
    assert "RETIRING: disk_full: " in result.stdout
    assert (disk / "caches" / "dockerami-cache-attached").exists()

    before = len(calls(env))
    again = run(env, 'disk_floor_spec=12M\nkeep_disk || echo "retired: $?"')
    assert again.stdout.strip() == "retired: 1" and len(calls(env)) == before


def test_on_a_shared_engine_pruning_keeps_to_its_filter(env, disk):
    fill(disk / "images" / "current", 2)
    fill(disk / "images" / "old", 12)
    result = run({**env}, 'PRUNE_FILTER=label=mine\ndisk_floor_spec=15M\n'
                 'keep_disk || echo retired')
    assert "image ls --no-trunc --format {{.ID}} {{.Repository}}:{{.Tag}} --filter label=mine" \
        in calls(env), calls(env)
    assert any(c.startswith("volume prune") and c.endswith("--filter label=mine")
               for c in calls(env))
    assert not any(c.startswith("builder prune") for c in calls(env))  # cannot be filtered
    assert result.stdout.strip().endswith("retired")
