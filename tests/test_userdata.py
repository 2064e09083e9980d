from __future__ import annotations

import subprocess

import pytest

from buildbot_dockerami.protocol import userdata
from buildbot_dockerami.protocol.userdata import UserData, UserDataError
from tests.harness import REPO


def test_render_is_byte_compatible_with_the_seed() -> None:
    text = userdata.render(UserData("linux-1", "pw", "master.example.com:9989",
                                    "alexcrichton/rust-slave-linux:2015-10-15",
                                    "https://github.com/rust-lang/rust-buildbot", "master"))
    assert text == (
        "linux-1 pw master.example.com:9989\n"
        "alexcrichton/rust-slave-linux:2015-10-15\n"
        "https://github.com/rust-lang/rust-buildbot\n"
        "master"
    )


def test_render_minimal_has_two_lines_and_no_trailing_newline() -> None:
    assert userdata.render(UserData("w", "p", "10.0.0.1:9989", "img")) == "w p 10.0.0.1:9989\nimg"


def test_extensions_go_on_line_five_keeping_lines_three_and_four() -> None:
    text = userdata.render(UserData("w", "p", "h:1", "img", extensions={"isolation": "container"}))
    assert text.split("\n") == ["w p h:1", "img", "", "", "isolation=container"]
    assert userdata.parse(text).extensions == {"isolation": "container"}
    assert userdata.parse(text).setup_repo is None


def test_parse_roundtrip() -> None:
    data = UserData("w", "p", "[::1]:9989", "reg.example:5000/org/img@sha256:" + "a" * 64,
                    "https://x/y.git", "dev")
    assert userdata.parse(userdata.render(data)) == data
    assert userdata.parse(userdata.render(data) + "\n") == data


@pytest.mark.parametrize("image", [
    "ubuntu", "org/worker-linux:2015-10-19b", "localhost:5000/a/b:c",
    "127.0.0.1:5000/dockerami/worker:2026-11-27", "a__b/c--d:TAG_1.x",
    "img@sha256:" + "0" * 64,
])
def test_valid_images(image: str) -> None:
    userdata.check_image(image)


@pytest.mark.parametrize(("image", "fragment"), [
    ("org/img;reboot", "shell-active"),
    ("$(curl evil)", "shell-active"),
    ("img `id`", "shell-active"),
    ("--privileged img", "shell-active"),
    ("img*", "shell-active"),
    ("Org/Img", "not a valid Docker image reference"),
    ("img:", "not a valid Docker image reference"),
    ("-img", "not a valid Docker image reference"),
    ("", "must not be empty"),
])
def test_invalid_images(image: str, fragment: str) -> None:
    with pytest.raises(UserDataError, match="image") as info:
        userdata.check_image(image)
    assert fragment in str(info.value)


@pytest.mark.parametrize(("field", "kwargs"), [
    ("name", {"worker_name": "two words"}),
    ("password", {"password": "a\nb"}),
    ("password", {"password": ""}),
    ("master_address", {"master": "host"}),
    ("master_address", {"master": "host:0"}),
    ("master_address", {"master": "bad_host!:9989"}),
    ("setup_repo", {"setup_repo": "https://x/ y"}),
    ("setup_branch", {"setup_branch": "b"}),
])
def test_render_rejects_values_that_break_the_format(field: str, kwargs: dict) -> None:
    base = {"worker_name": "w", "password": "p", "master": "h:1", "image": "img"}
    with pytest.raises(UserDataError) as info:
        userdata.render(UserData(**{**base, **kwargs}))
    assert info.value.setting == field


def test_size_limit() -> None:
    repo = "https://example.com/" + "a" * (userdata.MAX_USER_DATA_BYTES)
    with pytest.raises(UserDataError, match="16384"):
        userdata.render(UserData("w", "p", "h:1", "img", repo))


def test_redaction() -> None:
    text = userdata.render(UserData("w", "hunter2", "h:1", "img"))
    assert "hunter2" not in userdata.redacted_user_data(text)
    assert userdata.redact("console: hunter2 ok", "hunter2") == "console: ******** ok"
    assert userdata.redact("x", None) == "x"


def test_dockerfile_base_images_resolve_args() -> None:
    from buildbot_dockerami.cli.images import base_images

    dockerfile = (REPO / "images" / "worker-linux" / "Dockerfile").read_text()
    assert base_images(dockerfile, {}) == ["debian:bookworm-slim"]
    assert base_images(dockerfile, {"BASE": "dockerami/base:bookworm"}) == [
        "dockerami/base:bookworm"]
    multi = "ARG V=1\nFROM --platform=x a/b:${V} AS build\nFROM build\nFROM scratch\n"
    assert base_images(multi, {}) == ["a/b:1"]


def test_user_data_boots_on_a_seed_style_reader(tmp_path):
    """The seed's base AMI takes line 2 with `tail -n +2 | head -n 1` and word-splits it;
    its image reads line 1 with `read NAME PASSWORD MASTER`."""
    text = userdata.render(userdata.UserData(
        "linux-1", "s3cret", "master.example.com:9989", "org/worker-linux:2015-10-19b",
        "https://github.com/org/buildslaves", "main"))
    script = ('printf %s "$UD" | tail -n +2 | head -n 1 > image;'
              'printf %s "$UD" | head -n 1 | { read NAME PASSWORD MASTER;'
              ' echo "$NAME|$PASSWORD|$MASTER"; }; set -- $(cat image); echo "$#:$1"')
    out = subprocess.run(["sh", "-c", script], env={"UD": text, "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert out.splitlines() == [
        "linux-1|s3cret|master.example.com:9989", "1:org/worker-linux:2015-10-19b"]
