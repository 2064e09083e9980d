from __future__ import annotations

import pytest
from buildbot.process.properties import Interpolate, Property

from buildbot_dockerami.cloud import instances
from buildbot_dockerami.cloud.instances import InstanceStatus
from buildbot_dockerami.config import checks, validators
from buildbot_dockerami.fleet import boot, termination
from buildbot_dockerami.protocol import userdata
from buildbot_dockerami.protocol.userdata import UserData, UserDataError
from buildbot_dockerami.worker.latent import DockerAMILatentWorker
from buildbot_dockerami.worker.launching import pb_port


def test_master_id_is_stable_short_and_distinct() -> None:
    a = instances.master_id("ci1:/srv/buildbot/master")
    assert a == instances.master_id("ci1:/srv/buildbot/master")
    assert a.startswith("ci1-") and len(a) <= 256
    assert a != instances.master_id("ci1:/srv/buildbot/other")


def test_tags_include_ownership_and_user_tags_at_launch() -> None:
    tags = instances.instance_tags("linux-1", "m-1", {"team": "ci"})
    assert tags == {"team": "ci", "Name": "buildbot-linux-1", "buildbot:worker": "linux-1",
                    "buildbot:master": "m-1"}
    specs = instances.tag_specifications(tags)
    assert {s["ResourceType"] for s in specs} == {"instance", "volume"}


@pytest.mark.parametrize(("status", "age", "ok"), [
    (InstanceStatus("i-1", "pending"), 1, True),
    (InstanceStatus("i-1", "running"), 1, True),
    (None, 10, True),
    (None, 120, False),
    (InstanceStatus("i-1", "terminated", "Server.SpotInstanceTermination"), 1, False),
    (InstanceStatus("i-1", "stopped"), 1, False),
    (InstanceStatus("i-1", "shutting-down"), 1, False),
])
def test_boot_verdict(status: InstanceStatus | None, age: float, ok: bool) -> None:
    verdict, reason = boot.boot_verdict(status, age)
    assert verdict is ok
    if status is not None and not ok:
        assert status.state in reason and status.reason in reason


def test_retry_delays_back_off_and_end() -> None:
    assert list(termination.retry_delays(1, 2, 5, 6)) == [1, 2, 4, 5, 5]


@pytest.mark.parametrize(("setting", "fn", "value"), [
    ("ami", validators.check_ami_id, "ami-123"),
    ("instance_type", validators.check_instance_type, "T3.large"),
    ("subnet_id", validators.check_subnet_id, "sub-1"),
    ("security_group_ids", validators.check_security_group_ids, "sg-12345678"),
    ("tags", validators.check_tags, {"k": 1}),
    ("tags", validators.check_tags, {f"k{i}": "v" for i in range(48)}),
    ("metadata_options", validators.check_metadata_options, {"Bogus": 1}),
    ("block_device_mappings", validators.check_block_device_mappings, [{"Ebs": {}}]),
])
def test_settings_errors_name_the_setting(setting: str, fn, value) -> None:
    with pytest.raises(validators.SettingError) as info:
        fn(value)
    assert info.value.setting == setting


def test_valid_settings_pass() -> None:
    validators.check_ami_id("ami-0123456789abcdef0")
    validators.check_ami_id("ami-12345678")
    validators.check_instance_type("c5.2xlarge")
    validators.check_security_group_ids(["sg-0123456789abcdef0"])
    validators.check_tags({"team": "ci"})
    validators.check_ami_filters([{"Name": "name", "Values": ["x-*"]}], ["self"])
    validators.check_metadata_options(validators.DEFAULT_METADATA_OPTIONS)


@pytest.mark.parametrize(("setting", "port"), [
    (9989, 9989), ("9989", 9989), ("tcp:9989", 9989), ("tcp:9989:interface=127.0.0.1", 9989),
    ("tcp:port=9989", 9989), (None, None),
])
def test_pb_port(setting, port) -> None:
    assert pb_port(setting) == port


def test_last_console_words_prefers_the_bootstrap_fatal_line() -> None:
    console = "boot\ndockerami-bootstrap: FATAL: cannot pull image x\npowering off\n\n"
    assert (boot.last_console_words(console)
            == "dockerami-bootstrap: FATAL: cannot pull image x")
    assert boot.last_console_words("a\nb\n") == "b"
    assert boot.last_console_words("") == ""


# -- issue 9: every setting type- and range-checked, no secret in any message ----------

@pytest.mark.parametrize(("setting", "fn", "value", "fragment"), [
    ("region", validators.check_region, 5, "not int"),
    ("region", validators.check_region, "US East 1", "not a region name"),
    ("keypair_name", validators.check_keypair_name, 5, "not int"),
    ("keypair_name", validators.check_keypair_name, "k\x00", "printable ASCII"),
    ("instance_profile", validators.check_instance_profile, 5, "not int"),
    ("instance_profile", validators.check_instance_profile, "arn:aws:iam::1:role/x",
     "instance-profile/"),
    ("endpoint_url", validators.check_endpoint_url, 5, "not int"),
    ("endpoint_url", validators.check_endpoint_url, "127.0.0.1:5000", "http(s)://"),
    ("endpoint_url", validators.check_endpoint_url, "http://[::1", "is not a URL"),
    ("session", validators.check_session, "x", "not str"),
    ("metadata_options", validators.check_metadata_options,
     {"HttpPutResponseHopLimit": "two"}, "HttpPutResponseHopLimit"),
    ("metadata_options", validators.check_metadata_options,
     {"HttpPutResponseHopLimit": 65}, "1-64"),
    ("metadata_options", validators.check_metadata_options,
     {"HttpPutResponseHopLimit": True}, "not True"),
    ("metadata_options", validators.check_metadata_options, {"HttpEndpoint": "on"}, "HttpEndpoint"),
    ("metadata_options", validators.check_metadata_options,
     {"HttpProtocolIpv6": ["enabled"]}, "HttpProtocolIpv6"),
    ("metadata_options", validators.check_metadata_options, "required", "must be a dict"),
    ("max_builds", validators.check_max_builds, 0, "not 0"),
    ("max_builds", validators.check_max_builds, "x", "not str"),
    ("max_builds", validators.check_max_builds, 1.5, "not 1.5"),
])
def test_typed_settings_are_refused_with_their_name(setting, fn, value, fragment) -> None:
    with pytest.raises(validators.SettingError) as info:
        fn(value)
    assert info.value.setting == setting
    assert fragment in info.value.message


@pytest.mark.parametrize(("key", "value", "ok"), [
    ("build_wait_timeout", 0, True), ("build_wait_timeout", -1, True),
    ("build_wait_timeout", 600, True), ("build_wait_timeout", -2, False),
    ("build_wait_timeout", "ten", False), ("build_wait_timeout", None, False),
    ("build_wait_timeout", float("inf"), False), ("build_wait_timeout", float("nan"), False),
    ("build_wait_timeout", True, False),
    ("missing_timeout", 0, False), ("missing_timeout", 1, True), ("missing_timeout", -1, False),
    ("missing_timeout", "x", False),
    ("check_instance_interval", 0, False), ("check_instance_interval", 0.5, False),
    ("check_instance_interval", 1, True), ("check_instance_interval", "x", False),
    ("max_builds", None, True), ("max_builds", 1, True), ("max_builds", 0, False),
    ("keepalive_interval", None, True), ("keepalive_interval", 0, False),
    ("properties", {"a": 1}, True), ("properties", ["a"], False),
    ("defaultProperties", "x", False),
    ("locks", [], True), ("notify_on_missing", "a@b", True),
])
def test_buildbot_latent_settings(key, value, ok) -> None:
    accepted = checks.accepted_keywords(DockerAMILatentWorker)
    problems, usable = checks.buildbot_settings({key: value}, accepted)
    assert (not problems) is ok, problems
    assert (key in usable) is ok  # a bad value never reaches buildbot's own checkConfig
    if not ok:
        assert problems[0].startswith(f"{key}: ")


def test_unknown_keywords_are_named_with_a_suggestion() -> None:
    accepted = checks.accepted_keywords(DockerAMILatentWorker)
    # Ours and buildbot's (from every checkConfig in the MRO).
    assert {"image", "pool", "build_wait_timeout", "missing_timeout", "max_builds",
            "properties", "check_instance_interval"} <= accepted
    problems, usable = checks.buildbot_settings(
        {"imagee": "x", "instance_typ": "t3.micro", "qqq": 1, "max_builds": 2}, accepted)
    assert problems == ["imagee: unknown setting; did you mean 'image'?",
                        "instance_typ: unknown setting; did you mean 'instance_type'?",
                        "qqq: unknown setting"]
    assert usable == {"max_builds": 2}


def _config_problems(**overrides) -> list[str]:
    values = dict(
        image="org/w:1", ami=None, ami_filters=[{"Name": "name", "Values": ["x"]}],
        ami_owners=None, instance_type="t3.micro", region="us-east-1", master_address=None,
        setup_repo=None, setup_branch=None, subnet_id=None, security_group_ids=None, tags=None,
        block_device_mappings=None, metadata_options=None, session=None,
    )
    values.update(overrides)
    name = values.pop("name", "w")
    password = values.pop("password", None)
    return checks.config_problems(name, password, **values)


@pytest.mark.parametrize(("overrides", "expected"), [
    ({}, []),
    ({"name": 123}, ["name: must be a string, not int"]),
    ({"name": None}, ["name: is required (the worker's name, the first argument)"]),
    ({"setup_repo": "-u"}, ["setup_repo: must not start with '-' (git would take it as an "
                            "option)"]),
    ({"setup_repo": "https://x/r", "setup_branch": "--orphan"},
     ["setup_branch: must not start with '-' (git would take it as an option)"]),
    ({"session": "x"}, ["session: must be a boto3.session.Session, not str"]),
    ({"region": 5}, ["region: must be a string such as 'us-east-1', not int"]),
    ({"keypair_name": Property("kp")},
     ["keypair_name: cannot be a renderable (it is not rendered per build)"]),
    ({"endpoint_url": Interpolate("http://%(prop:h)s")},
     ["endpoint_url: cannot be a renderable (it is not rendered per build)"]),
    ({"pool": {}}, ["pool: {} must be a non-empty name"]),
])
def test_config_problems_table(overrides, expected) -> None:
    assert _config_problems(**overrides) == expected


@pytest.mark.parametrize("password", ["Bad Secret 7a6b", "Bad\tSecret7a6b", "BadSecret7a6b\x7f"])
def test_password_problems_never_quote_the_password(password) -> None:
    (problem,) = _config_problems(password=password)
    assert problem.startswith("password: the value contains ")
    assert "Secret" not in problem and "7a6b" not in problem
    with pytest.raises(UserDataError) as info:
        userdata.render(UserData("w", password, "127.0.0.1:9989", "org/w:1"))
    assert "Secret" not in str(info.value) and "7a6b" not in str(info.value)


def test_character_classes_are_named() -> None:
    for value, kind in (("a b", "whitespace"), ("a\x01b", "control characters"),
                        ("a\x01 b", "whitespace and control characters")):
        with pytest.raises(UserDataError) as info:
            userdata.check_secret_word("password", value)
        assert info.value.message == f"the value contains {kind}"


def test_rendered_values_are_never_quoted() -> None:
    secret = "https://tok3n-Zq9@example.com/r x"
    problems = checks.rendered_problems({
        "image": "Org/Secret-Zq9", "instance_type": "t3.micro", "ami": "ami-Zq9",
        "setup_repo": secret, "setup_branch": "-Zq9",
    })
    assert [p.split(":")[0] for p in problems] == [
        "rendered image", "rendered ami", "rendered setup_repo", "rendered setup_branch"]
    assert not any("Zq9" in p for p in problems), problems
    assert "rendered setup_repo: the value contains whitespace" in problems
