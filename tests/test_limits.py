"""Per-container resource limits (container_limits): the setting's checks, its user-data
extensions, the container's report, and the real bootstrap turning them into
`docker run` options (with a stand-in `docker` that records them; the engine test in
tests/containers/test_limits.py runs them for real)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from buildbot_dockerami.config import checks
from buildbot_dockerami.fleet.launch import Slot, slot_user_data
from buildbot_dockerami.localcloud.containers import MetadataService
from buildbot_dockerami.localcloud.hypervisor import Booting
from buildbot_dockerami.protocol import limits, userdata
from tests.harness import REPO, wait_for

GIB = 1024**3
MIB = 1024**2


@pytest.mark.parametrize(("value", "expected"), [
    ({"memory": "6g", "pids": 4096, "cpus": 2}, {"memory": 6 * GIB, "pids": 4096, "cpus": 2.0}),
    ({"memory": 268435456}, {"memory": 256 * MIB}),
    ({"memory": "512m"}, {"memory": 512 * MIB}),
    ({"memory": "1.5G"}, {"memory": 3 * GIB // 2}),
    ({"memory": "2GiB"}, {"memory": 2 * GIB}),
    ({"memory": "2gb"}, {"memory": 2 * GIB}),
    ({"cpus": 0.5}, {"cpus": 0.5}),
    ({"memory": None, "pids": None}, {"memory": None, "pids": None}),
    ({}, {}),
])
def test_legal_limits_are_normalized(value, expected) -> None:
    assert limits.normalize(value) == expected
    assert limits.problems(value) == []


@pytest.mark.parametrize(("value", "fragment"), [
    ("6g", "must be a dict such as {'memory': '6g', 'pids': 4096, 'cpus': 2}"),
    ({"memroy": "6g"}, "unknown key 'memroy' (known: memory, pids, cpus)"),
    ({"memory": "6 gigs"}, "memory: '6 gigs' is not a size"),
    ({"memory": "lots"}, "memory: 'lots' is not a size"),
    ({"memory": "-1g"}, "memory: '-1g' is not a size"),
    ({"memory": 0}, "memory: 0 must be positive"),
    ({"memory": -5}, "memory: -5 must be positive"),
    ({"memory": "6"}, "memory: '6' is less than 64 MiB"),
    ({"memory": 6.5}, "memory: 6.5 must be bytes"),
    ({"memory": True}, "memory: True must be bytes"),
    ({"pids": 0}, "pids: 0 must be positive"),
    ({"pids": -1}, "pids: -1 must be positive"),
    ({"pids": 4.5}, "pids: 4.5 must be a whole number"),
    ({"pids": "4096"}, "pids: '4096' must be a whole number"),
    ({"pids": 8}, "pids: 8 is less than 32"),
    ({"cpus": 0}, "cpus: 0 must be positive"),
    ({"cpus": -2}, "cpus: -2 must be positive"),
    ({"cpus": 0.001}, "cpus: 0.001 is less than 0.01"),
    ({"cpus": float("inf")}, "cpus: inf must be a number"),
    ({"cpus": "2"}, "cpus: '2' must be a number"),
])
def test_bad_limits_are_named(value, fragment) -> None:
    (problem,) = limits.problems(value)
    assert problem.startswith("container_limits: "), problem
    assert fragment in problem, problem


def test_checkconfig_problems_name_the_setting() -> None:
    base = dict(image="org/w:1", ami_filters=[{"Name": "name", "Values": ["x"]}],
                instance_type="t3.micro", region="us-east-1")
    assert checks.config_problems("w", None, **base, container_limits={"pids": 64}) == []
    assert checks.config_problems("w", None, **base, container_limits={"pids": 0}) == [
        "container_limits: pids: 0 must be positive"]
    from buildbot.process.properties import Property
    assert checks.config_problems("w", None, **base, container_limits=Property("x")) == [
        "container_limits: cannot be a renderable (it is not rendered per build)"]


def test_extensions_carry_the_given_limits_only() -> None:
    assert limits.extensions(None) == {}
    given = {"memory": "6g", "pids": 4096, "cpus": 1.5}
    assert limits.extensions(given) == {
        "limits.memory": str(6 * GIB), "limits.pids": "4096", "limits.cpus": "1.5"}
    assert limits.extensions({"memory": None, "cpus": 2}) == {
        "limits.memory": "none", "limits.cpus": "2"}
    assert limits.extensions({"cpus": 0.25}) == {"limits.cpus": "0.25"}
    assert limits.from_extensions(limits.extensions(given)) == limits.normalize(given)


VALUES = {"image": "org/w:1", "setup_repo": None, "setup_branch": None}


def test_user_data_without_limits_is_unchanged_and_with_them_has_extension_lines() -> None:
    slots = [Slot("w-1", "p1", "a" * 64), Slot("w-2", "p2", "b" * 64)]
    plain = slot_user_data(slots, "m:9989", VALUES, isolated=True, tls_fingerprint=None)
    assert "limits." not in plain
    assert slot_user_data(slots, "m:9989", VALUES, isolated=True, tls_fingerprint=None,
                          container_limits=None) == plain
    text = slot_user_data(slots, "m:9989", VALUES, isolated=True, tls_fingerprint=None,
                          container_limits={"memory": "256m", "pids": 100})
    assert text.startswith(plain + "\n")  # the seed's lines 1-4 and the others as before
    assert text.split("\n")[len(plain.split("\n")):] == [
        f"limits.memory={256 * MIB}", "limits.pids=100"]
    assert limits.from_extensions(userdata.parse(text).extensions) == {
        "memory": 256 * MIB, "pids": 100}


def test_seed_single_worker_user_data_is_byte_compatible() -> None:
    text = slot_user_data([Slot("linux-1", "pw")], "master.example.com:9989",
                          {"image": "alexcrichton/rust-slave-linux:2015-10-15",
                           "setup_repo": "https://github.com/rust-lang/rust-buildbot",
                           "setup_branch": "master"}, isolated=False, tls_fingerprint=None)
    assert text == ("linux-1 pw master.example.com:9989\n"
                    "alexcrichton/rust-slave-linux:2015-10-15\n"
                    "https://github.com/rust-lang/rust-buildbot\n"
                    "master")


@pytest.mark.parametrize(("info", "expected"), [
    ({"container_limits": "memory=268435456 pids=100 cpus=1.00"},
     {"memory": 268435456, "pids": 100, "cpus": 1.0}),
    ({"container_limits": "memory=max pids=max cpus=max\n"},
     {"memory": None, "pids": None, "cpus": None}),
    ({"container_limits": "memory=junk pids=0 cpus=nan other=1"}, None),
    ({"container_limits": ""}, None),
    ({}, None),
])
def test_what_the_container_reports(info, expected) -> None:
    assert limits.from_info(info) == expected


def test_fleet_api_row() -> None:
    reported = {"memory": 256 * MIB, "pids": 100, "cpus": None}
    assert limits.row({"memory": "256m", "pids": 100}, reported) == {
        "configured": {"memory": 256 * MIB, "pids": 100}, "applied": reported}
    assert limits.row(None, None) == {"configured": {}, "applied": None}


# -- the real bootstrap, with a stand-in docker that records its `run` options ----------

FAKE_DOCKER = """#!/bin/sh
case $1 in
    run) printf '%s\\n' "$*" >> "$RUNS"; exec sleep 600 ;;
    container) exit 1 ;;
    *) exit 0 ;;
esac
"""


def bootstrap_runs(tmp_path: Path, extensions: dict[str, str], slots: int,
                   run_options: str = "") -> list[str]:
    """The `docker run` command lines of the bootstrap for user data with these
    extensions and slots, one per slot."""
    if slots > 1:
        extensions = {"isolation": "container", "slots": str(slots),
                      **{f"slot.{n}": f"w-{n} p{n}" for n in range(1, slots)}, **extensions}
    text = userdata.render(userdata.UserData("w-0", "p0", "127.0.0.1:9989", "org/w:1",
                                             extensions=extensions))
    tmp_path.mkdir(parents=True, exist_ok=True)
    metadata = MetadataService(Booting("i-0123456789abcdef0", text)).start()
    docker = tmp_path / "docker"
    docker.write_text(FAKE_DOCKER)
    docker.chmod(0o755)
    runs = tmp_path / "runs"
    env = {"PATH": os.environ["PATH"], "RUNS": str(runs), "DOCKER": str(docker),
           "DOCKERAMI_IMDS": metadata.url, "DOCKERAMI_STATE_DIR": str(tmp_path / "state"),
           "DOCKERAMI_BLOCK_METADATA": "no", "DOCKERAMI_POWEROFF": "true",
           "DOCKERAMI_SPOT_POLL": "600", "DOCKERAMI_RUN_OPTIONS": run_options}
    console = tmp_path / "console"
    with open(console, "wb") as out:
        process = subprocess.Popen(["sh", str(REPO / "ami" / "dockerami-bootstrap.sh")],
                                   env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        wait_for(lambda: (runs.exists() and len(runs.read_text().splitlines()) == slots)
                 or process.poll() is not None, 30, "every slot's docker run")
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        metadata.stop()
    assert runs.exists(), console.read_text()
    return runs.read_text().splitlines()


def option(run: str, name: str) -> str | None:
    words = run.split()
    return words[words.index(name) + 1] if name in words else None


def test_bootstrap_applies_the_given_limits_with_swap_equal_to_memory(tmp_path) -> None:
    runs = bootstrap_runs(tmp_path, {"limits.memory": str(256 * MIB), "limits.pids": "100",
                                     "limits.cpus": "0.5"}, slots=2)
    for run in runs:
        assert option(run, "--memory") == option(run, "--memory-swap") == str(256 * MIB)
        assert option(run, "--pids-limit") == "100"
        assert option(run, "--cpus") == "0.5"


def test_bootstrap_default_with_slots_is_an_equal_share(tmp_path) -> None:
    runs = bootstrap_runs(tmp_path, {}, slots=2)
    total = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                     if line.startswith("MemTotal:"))) * 1024
    keep = min(512 * MIB, total / 4)
    share = int((total - keep) / 2 / MIB) * MIB
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    for run in runs:
        assert option(run, "--memory") == option(run, "--memory-swap") == str(share)
        assert option(run, "--pids-limit") == str(min(limits.DEFAULT_PIDS, pid_max // 3))
        assert option(run, "--cpus") is None


def test_bootstrap_single_container_gets_no_default_and_none_means_no_limit(tmp_path) -> None:
    (single,) = bootstrap_runs(tmp_path / "single", {}, slots=1)
    assert not {"--memory", "--memory-swap", "--pids-limit", "--cpus"} & set(single.split())
    runs = bootstrap_runs(tmp_path / "none", {"limits.memory": "none", "limits.pids": "none"},
                          slots=2)
    for run in runs:
        assert not {"--memory", "--memory-swap", "--pids-limit"} & set(run.split())


def test_bootstrap_gives_no_more_cpus_than_the_host_has(tmp_path) -> None:
    (run,) = bootstrap_runs(tmp_path, {"limits.cpus": "100000"}, slots=1)
    assert option(run, "--cpus") == str(len(os.sched_getaffinity(0)))
    assert "using" in (tmp_path / "console").read_text()


def test_a_default_leaves_the_amis_own_run_option_alone_a_given_limit_wins(tmp_path) -> None:
    runs = bootstrap_runs(tmp_path / "default", {}, slots=2, run_options="--memory 1g")
    for run in runs:
        assert run.split().count("--memory") == 1 and option(run, "--memory") == "1g"
        assert option(run, "--pids-limit") is not None  # the other default still applies
    (run,) = bootstrap_runs(tmp_path / "given", {"limits.memory": str(256 * MIB)}, slots=1,
                            run_options="--memory 1g")
    words = run.split()
    assert words.index("--memory", words.index("--memory") + 1) > words.index("1g")
    assert option(run, "--memory-swap") == str(256 * MIB)  # the last --memory is docker's
