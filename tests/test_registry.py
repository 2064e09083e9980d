"""Registry credentials without secrets in the user data: which registry an image is
pulled from, the registry_credentials setting, what checkconfig says, and what the
user data carries (protocol/registry.py, config/checks.py, fleet/launch.py)."""

from __future__ import annotations

import pytest

from buildbot_dockerami.config.checks import config_problems, settings_warnings
from buildbot_dockerami.config.model import WorkerSettings
from buildbot_dockerami.fleet.launch import Slot, slot_user_data
from buildbot_dockerami.protocol import registry, userdata

ECR_IMAGE = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/ci/linux:2026-12-01"
BASE = dict(ami="ami-0123456789abcdef0", instance_type="t3.micro", region="us-east-1")


@pytest.mark.parametrize(("image", "host"), [
    ("org/worker-linux:1", "docker.io"),
    ("ubuntu", "docker.io"),
    ("ubuntu@sha256:" + "a" * 64, "docker.io"),
    ("registry.example.com/org/w:1", "registry.example.com"),
    ("127.0.0.1:5000/org/w:1", "127.0.0.1:5000"),
    ("localhost/org/w", "localhost"),
    (ECR_IMAGE, "123456789012.dkr.ecr.eu-west-1.amazonaws.com"),
])
def test_registry_host_is_read_as_docker_reads_it(image: str, host: str) -> None:
    assert registry.registry_host(image) == host


@pytest.mark.parametrize(("image", "ecr"), [
    (ECR_IMAGE, True),
    ("123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn/ci/w:1", True),
    ("123456789012.dkr.ecr-fips.us-east-1.amazonaws.com/ci/w:1", True),
    ("public.ecr.aws/org/w:1", False),           # public: no credentials needed
    ("12345.dkr.ecr.eu-west-1.amazonaws.com/ci/w:1", False),  # not an account id
    ("123456789012.dkr.ecr.eu-west-1.amazonaws.com.evil.example/ci/w:1", False),
    ("org/w:1", False),
])
def test_ecr_hosts(image: str, ecr: bool) -> None:
    assert registry.is_ecr(image) is ecr


@pytest.mark.parametrize("value", [
    "ssm:/ci/registry", "ssm:ci-registry", "ssm:/a/b.c/d_e-f",
    "ssm:arn:aws:ssm:eu-west-1:123456789012:parameter/ci/registry",
    "secretsmanager:ci/registry", "secretsmanager:ci+registry=x@y.z",
    "secretsmanager:arn:aws:secretsmanager:eu-west-1:123456789012:secret:ci/registry-AbCdEf",
])
def test_good_registry_credentials(value: str) -> None:
    assert registry.check_registry_credentials(value) is None
    assert config_problems("w", None, image="org/w:1", registry_credentials=value,
                           **BASE) == []


@pytest.mark.parametrize(("value", "fragment"), [
    ("vault:ci/registry", "'vault' is not a known scheme; use one of: 'ssm:...'"),
    ("ci/registry", "'ci/registry' is not a known scheme"),
    ("SSM:/ci/registry", "'SSM' is not a known scheme"),
    ("ssm:", "'' is not a valid ssm name"),
    ("ssm:/ci/reg istry", "is not a valid ssm name"),
    ("ssm:/ci//registry", "is not a valid ssm name"),
    ("secretsmanager:ci$(id)", "is not a valid secretsmanager name"),
    ("secretsmanager:ci\nregistry", "is not a valid secretsmanager name"),
    (5, "must be a string such as 'ssm:/ci/registry', not int"),
    ({"username": "u", "password": "p"}, "must be a string"),
])
def test_bad_registry_credentials_are_named(value: object, fragment: str) -> None:
    problems = config_problems("w", None, image="org/w:1", registry_credentials=value, **BASE)
    assert len(problems) == 1, problems
    assert problems[0].startswith("registry_credentials: ")
    assert fragment in problems[0]


def test_a_dict_of_credentials_is_never_quoted() -> None:
    """Someone pastes the credentials themselves: the error does not repeat them."""
    (problem,) = config_problems("w", None, image="org/w:1", **BASE,
                                 registry_credentials={"username": "u", "password": "hunter2"})
    assert "hunter2" not in problem


def test_registry_credentials_cannot_be_a_renderable() -> None:
    from buildbot.process.properties import Property
    (problem,) = config_problems("w", None, image="org/w:1", **BASE,
                                 registry_credentials=Property("x"))
    assert problem.startswith("registry_credentials: cannot be a renderable")


@pytest.mark.parametrize(("settings", "expected"), [
    ({"image": ECR_IMAGE}, ["instance_profile: image '1234"]),
    ({"image": ECR_IMAGE, "instance_profile": "ci-role"}, []),
    ({"image": "registry.example.com/w:1", "registry_credentials": "ssm:/ci/r"},
     ["instance_profile: registry_credentials are read at boot with the instance's role"]),
    ({"image": "registry.example.com/w:1", "registry_credentials": "ssm:/ci/r",
      "instance_profile": "ci-role"}, []),
    ({"image": ECR_IMAGE, "registry_credentials": "ssm:/ci/r", "instance_profile": "ci-role"},
     ["registry_credentials: not used for an ECR image"]),
    ({"image": "org/w:1"}, []),
])
def test_checkconfig_warns_about_how_the_image_will_be_pulled(
        settings: dict, expected: list[str]) -> None:
    warnings = settings_warnings(WorkerSettings(**settings))
    assert len(warnings) == len(expected), warnings
    for warning, start in zip(warnings, expected, strict=True):
        assert warning.startswith(start), warning


def test_an_ecr_warning_names_the_permissions() -> None:
    (warning,) = settings_warnings(WorkerSettings(image=ECR_IMAGE))
    assert "set instance_profile" in warning and "ecr:BatchGetImage" in warning


def test_user_data_names_where_the_credentials_live_as_an_extension() -> None:
    slots = [Slot("w", "pw")]
    values = {"image": "127.0.0.1:5000/org/w:1", "setup_repo": None, "setup_branch": None}
    plain = slot_user_data(slots, "m.example:9989", values, isolated=False,
                           tls_fingerprint=None)
    named = slot_user_data(slots, "m.example:9989", values, isolated=False,
                           tls_fingerprint=None, registry_credentials="ssm:/ci/registry")
    # Without the setting, the seed's two lines, byte for byte.
    assert plain == "w pw m.example:9989\n127.0.0.1:5000/org/w:1"
    assert named == plain + "\n\n\nregistry.credentials=ssm:/ci/registry"
    parsed = userdata.parse(named)
    assert parsed.extensions == {registry.EXTENSION: "ssm:/ci/registry"}
    assert parsed.image == values["image"]
