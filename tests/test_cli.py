"""The buildbot-dockerami command: help, user-data preview and its errors."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.harness import BIN, REPO

ENV = {"PATH": "/usr/bin:/bin", "AWS_DEFAULT_REGION": "us-east-1", "HOME": "/nonexistent"}


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "buildbot-dockerami"), *args], capture_output=True,
                          text=True, env=ENV, cwd=cwd, timeout=120, check=False)


@pytest.mark.parametrize("command", [
    [], ["local-cloud"], ["image"], ["image", "build"], ["image", "push"], ["userdata"],
    ["userdata", "show"],
])
def test_every_command_has_help(command: list[str]) -> None:
    result = run(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: buildbot-dockerami")


def test_missing_subcommand_is_a_usage_error() -> None:
    result = run("image")
    assert result.returncode == 2 and "usage:" in result.stderr


def test_userdata_show_prints_redacted_user_data(tmp_path: Path) -> None:
    shutil.copy(REPO / "master.cfg.example", tmp_path / "master.cfg")
    text = (tmp_path / "master.cfg").read_text().replace(
        "master_address=os.environ.get('DOCKERAMI_MASTER_ADDRESS')",
        "master_address='ci.example.com:9989', password='hunter2'")
    (tmp_path / "master.cfg").write_text(text)
    result = run("userdata", "show", "--config", str(tmp_path / "master.cfg"), "linux-2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "linux-2 ******** ci.example.com:9989",
        "localhost/dockerami/worker-linux:2026-11-27",
    ]
    assert "hunter2" not in result.stdout + result.stderr


def test_userdata_show_errors_name_the_problem(tmp_path: Path) -> None:
    shutil.copy(REPO / "master.cfg.example", tmp_path / "master.cfg")
    unknown = run("userdata", "show", "--config", str(tmp_path / "master.cfg"), "nope")
    assert unknown.returncode == 1
    assert "no worker 'nope'" in unknown.stderr and "linux-1, linux-2" in unknown.stderr
    missing = run("userdata", "show", "--config", str(tmp_path / "absent.cfg"), "x")
    assert missing.returncode == 1 and "no such file" in missing.stderr


def test_image_push_needs_a_tag() -> None:
    result = run("image", "push", "org/worker")
    assert result.returncode == 1 and "has no tag" in result.stderr


def test_image_build_wheels_that_pip_cannot_fetch_is_one_line(tmp_path: Path) -> None:
    # No index (PIP_NO_INDEX): pip download fails at once, without the network.
    result = subprocess.run(
        [str(BIN / "buildbot-dockerami"), "image", "build", str(tmp_path), "--wheels"],
        capture_output=True, text=True, timeout=120, check=False,
        env={**ENV, "PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": "/dev/null"})
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    *pip_said, line = result.stderr.splitlines()
    assert line.startswith("buildbot-dockerami: pip download of buildbot-worker=="), line
    assert any("Could not find" in said or "No matching" in said for said in pip_said)


def test_image_build_without_a_dockerfile_says_so(tmp_path: Path) -> None:
    # Checked before the engine is asked for: runs without Docker.
    missing = run("image", "build", str(tmp_path / "nowhere"))
    assert missing.returncode == 1 and "has no Dockerfile" in missing.stderr
