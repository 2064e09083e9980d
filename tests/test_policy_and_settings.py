from __future__ import annotations

import pytest

from buildbot_dockerami import policy, settings
from buildbot_dockerami.policy import InstanceStatus
from buildbot_dockerami.worker import pb_port


def test_master_id_is_stable_short_and_distinct() -> None:
    a = policy.master_id("ci1:/srv/buildbot/master")
    assert a == policy.master_id("ci1:/srv/buildbot/master")
    assert a.startswith("ci1-") and len(a) <= 256
    assert a != policy.master_id("ci1:/srv/buildbot/other")


def test_tags_include_ownership_and_user_tags_at_launch() -> None:
    tags = policy.instance_tags("linux-1", "m-1", {"team": "ci"})
    assert tags == {"team": "ci", "Name": "buildbot-linux-1", "buildbot:worker": "linux-1",
                    "buildbot:master": "m-1"}
    specs = policy.tag_specifications(tags)
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
    verdict, reason = policy.boot_verdict(status, age)
    assert verdict is ok
    if status is not None and not ok:
        assert status.state in reason and status.reason in reason


def test_retry_delays_back_off_and_end() -> None:
    assert list(policy.retry_delays(1, 2, 5, 6)) == [1, 2, 4, 5, 5]


@pytest.mark.parametrize(("setting", "fn", "value"), [
    ("ami", settings.check_ami_id, "ami-123"),
    ("instance_type", settings.check_instance_type, "T3.large"),
    ("subnet_id", settings.check_subnet_id, "sub-1"),
    ("security_group_ids", settings.check_security_group_ids, "sg-12345678"),
    ("tags", settings.check_tags, {"k": 1}),
    ("tags", settings.check_tags, {f"k{i}": "v" for i in range(48)}),
    ("metadata_options", settings.check_metadata_options, {"Bogus": 1}),
    ("block_device_mappings", settings.check_block_device_mappings, [{"Ebs": {}}]),
])
def test_settings_errors_name_the_setting(setting: str, fn, value) -> None:
    with pytest.raises(settings.SettingError) as info:
        fn(value)
    assert info.value.setting == setting


def test_valid_settings_pass() -> None:
    settings.check_ami_id("ami-0123456789abcdef0")
    settings.check_ami_id("ami-12345678")
    settings.check_instance_type("c5.2xlarge")
    settings.check_security_group_ids(["sg-0123456789abcdef0"])
    settings.check_tags({"team": "ci"})
    settings.check_ami_filters([{"Name": "name", "Values": ["x-*"]}], ["self"])
    settings.check_metadata_options(settings.DEFAULT_METADATA_OPTIONS)


@pytest.mark.parametrize(("setting", "port"), [
    (9989, 9989), ("9989", 9989), ("tcp:9989", 9989), ("tcp:9989:interface=127.0.0.1", 9989),
    ("tcp:port=9989", 9989), (None, None),
])
def test_pb_port(setting, port) -> None:
    assert pb_port(setting) == port


def test_last_console_words_prefers_the_bootstrap_fatal_line() -> None:
    console = "boot\ndockerami-bootstrap: FATAL: cannot pull image x\npowering off\n\n"
    assert policy.last_console_words(console) == "dockerami-bootstrap: FATAL: cannot pull image x"
    assert policy.last_console_words("a\nb\n") == "b"
    assert policy.last_console_words("") == ""
