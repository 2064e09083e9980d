"""Launch templates (``launch_template=``): the base of every RunInstances, with the
plugin's own parts on top (fleet/templates.py, fleet/launch.py). On the in-memory
FakeEc2, then with moto's launch templates in the local cloud on a real master."""

from __future__ import annotations

import base64
import dataclasses
from types import SimpleNamespace
from typing import Any

import pytest

from buildbot_dockerami.cloud.ec2 import DEFAULT_METADATA_OPTIONS, AsyncEc2
from buildbot_dockerami.cloud.instances import WORKER_TAG
from buildbot_dockerami.cloud.testing import FakeEc2
from buildbot_dockerami.config import checks
from buildbot_dockerami.fleet import templates
from buildbot_dockerami.fleet.launch import (
    LaunchFailed,
    LaunchRefused,
    launch_spec,
    plan_launch,
)
from buildbot_dockerami.protocol import userdata
from tests.harness import EXCEPTION, SUCCESS, master_cfg
from tests.helpers import instances, run

REF = {"LaunchTemplateName": "ci-workers", "Version": "$Latest"}
VALUES = {"image": "org/w:1", "instance_type": ["c7g.large", "c6i.large"], "ami": None,
          "setup_repo": None, "setup_branch": None}
TEMPLATE_TAGS = [{"ResourceType": "instance", "Tags": [{"Key": "cost-centre", "Value": "42"},
                                                       {"Key": "team", "Value": "infra"}]},
                 {"ResourceType": "network-interface",
                  "Tags": [{"Key": "eni", "Value": "1"}]}]






def worker(**changes: Any) -> SimpleNamespace:
    """What plan_launch and launch_spec read of a worker."""
    values = dict(ami_filters=None, ami_owners=None, launch_template=REF, subnet_id=None,
                  security_group_ids=None, idle_action="terminate", tags={"team": "ci"},
                  keypair_name=None, instance_profile=None, block_device_mappings=None,
                  metadata_options=None)
    return SimpleNamespace(**{**values, **changes})


def plan(client: AsyncEc2, settings: SimpleNamespace, now: float = 0.0, **values: Any) -> Any:
    return run(plan_launch(client, {**VALUES, **values}, settings, now))


def test_the_template_image_and_tags_with_the_plugins_parts(fake: FakeEc2,
                                                             client: AsyncEc2) -> None:
    arm = fake.register_image("base-arm", architecture="arm64")
    fake.add_launch_template("ci-workers", {
        "ImageId": arm, "KeyName": "ops", "TagSpecifications": TEMPLATE_TAGS,
        "MetadataOptions": {"HttpTokens": "required", "HttpPutResponseHopLimit": 1}})
    settings = worker()
    the_plan, found = plan(client, settings)
    assert the_plan.amis == {"c7g.large": ""}  # "": RunInstances takes the template's
    assert "c6i.large" in the_plan.skipped
    spec = launch_spec("", "w0 pw 127.0.0.1:9989\norg/w:1", settings, found)
    args = spec.run_instances_args()
    assert args["LaunchTemplate"] == {"LaunchTemplateName": "ci-workers", "Version": "$Latest"}
    assert "ImageId" not in args and "KeyName" not in args
    assert "MetadataOptions" not in args  # the template's IMDS policy holds
    tags = {s["ResourceType"]: {t["Key"]: t["Value"] for t in s["Tags"]}
            for s in args["TagSpecifications"]}
    assert tags["instance"] == {"cost-centre": "42", "team": "ci"}  # ours over the template's
    assert tags["volume"] == {"team": "ci"}
    assert set(tags) == {"instance", "volume"}  # other resource types: left to the template
    assert args["UserData"] == "w0 pw 127.0.0.1:9989\norg/w:1"


def test_metadata_options(fake: FakeEc2, client: AsyncEc2) -> None:
    assert templates.metadata_options(None, None) == DEFAULT_METADATA_OPTIONS
    assert templates.metadata_options({"KeyName": "x"}, None) == DEFAULT_METADATA_OPTIONS
    assert templates.metadata_options({"MetadataOptions": {"HttpTokens": "required"}},
                                      None) == {}
    mine = {"HttpTokens": "optional"}
    assert templates.metadata_options({"MetadataOptions": {"HttpTokens": "required"}},
                                      mine) == mine


IMAGE = {"ImageId": "ami-0123456789abcdef0"}


@pytest.mark.parametrize(("data", "settings", "fragment"), [
    ({**IMAGE, "UserData": "IyEvYmluL3No"}, {},
     "sets UserData; the plugin's user data names the image"),
    ({**IMAGE, "InstanceMarketOptions": {"MarketType": "spot"}}, {},
     "sets InstanceMarketOptions; the plugin's market= chooses spot or on-demand"),
    ({**IMAGE, "DisableApiTermination": True}, {}, "sets DisableApiTermination"),
    ({**IMAGE, "DisableApiStop": True}, {"idle_action": "stop"}, "sets DisableApiStop"),
    ({**IMAGE, "NetworkInterfaces": [{"DeviceIndex": 0, "SubnetId": "subnet-1"}]},
     {"subnet_id": "subnet-0123456789abcdef0"}, "sets NetworkInterfaces, which EC2 does not "
     "take together with subnet_id"),
    ({"KeyName": "ops"}, {}, "has no ImageId, and neither ami= nor ami_filters= is given"),
])
def test_a_template_that_would_break_the_plugin_is_refused(
        fake: FakeEc2, client: AsyncEc2, data: dict, settings: dict, fragment: str) -> None:
    fake.add_launch_template("ci-workers", data)
    with pytest.raises(LaunchRefused) as info:
        plan(client, worker(**settings))
    assert info.value.reason == "launch_template"
    assert info.value.message.startswith(
        "launch_template: template 'ci-workers' version $Latest ")
    assert fragment in info.value.message
    assert fake.count("RunInstances") == 0


def test_what_the_plugin_does_not_need_passes(fake: FakeEc2, client: AsyncEc2) -> None:
    fake.add_launch_template("ci-workers", {
        **IMAGE, "DisableApiStop": True, "NetworkInterfaces": [{"DeviceIndex": 0}]})
    the_plan, _ = plan(client, worker(), instance_type="c6i.large")
    assert the_plan.amis == {"c6i.large": ""}


def test_a_template_ec2_does_not_have_fails_the_launch(client: AsyncEc2) -> None:
    with pytest.raises(LaunchFailed) as info:
        plan(client, worker())
    assert not isinstance(info.value, LaunchRefused)  # it may yet be created: retried
    assert info.value.message == (
        "launch_template: DescribeLaunchTemplateVersions failed: "
        "InvalidLaunchTemplateName.NotFoundException: The specified launch template, "
        "with template name ci-workers, does not exist.")


def test_the_template_is_read_again_after_a_while(fake: FakeEc2, client: AsyncEc2) -> None:
    template_id = fake.add_launch_template("ci-workers", {"ImageId": "ami-0123456789abcdef0"})
    settings = worker(ami={"x86_64": "ami-0123456789abcdef1"})
    plan(client, settings, now=100, ami={"x86_64": "ami-0123456789abcdef1"})
    plan(client, settings, now=100 + templates.TTL - 1, ami={"x86_64": "ami-0123456789abcdef1"})
    assert fake.count("DescribeLaunchTemplateVersions") == 1
    fake.add_template_version(template_id, {"UserData": "eA=="})  # the new $Latest
    with pytest.raises(LaunchRefused, match="sets UserData"):
        plan(client, settings, now=100 + templates.TTL, ami={"x86_64": "ami-0123456789abcdef1"})
    assert fake.count("DescribeLaunchTemplateVersions") == 2


def test_no_ami_for_any_type(fake: FakeEc2, client: AsyncEc2) -> None:
    arm = fake.register_image("dockerami-base-arm64-1", architecture="arm64")
    settings = worker(launch_template=None)
    with pytest.raises(LaunchRefused) as info:  # fixed AMIs: never
        plan(client, settings, ami=arm, instance_type="c6i.large")
    assert info.value.message == (
        f"no instance type has an AMI it can boot: c6i.large: it is x86_64: ami {arm} is arm64")
    filters = [{"Name": "name", "Values": ["dockerami-base-*"]}]
    with pytest.raises(LaunchFailed) as info:  # filters: a new image may come
        plan(client, worker(launch_template=None, ami_filters=filters),
             instance_type="c6i.large")
    assert not isinstance(info.value, LaunchRefused)
    assert info.value.reason == "no_ami"


def test_a_launch_through_the_template_on_the_fake(fake: FakeEc2, client: AsyncEc2) -> None:
    x86 = fake.register_image("base")
    fake.add_launch_template("ci-workers", {"ImageId": x86, "KeyName": "ops",
                                            "SecurityGroupIds": ["sg-0123456789abcdef0"],
                                            "TagSpecifications": TEMPLATE_TAGS})
    settings = worker()
    the_plan, found = plan(client, settings, instance_type="c6i.large")
    spec = launch_spec(the_plan.amis["c6i.large"], "w0 pw 127.0.0.1:9989\norg/w:1", settings,
                       found)
    spec = dataclasses.replace(spec, instance_type="c6i.large",
                               tags={**spec.tags, WORKER_TAG: "w0"})
    status = client.ec2.run_instance(spec)
    instance = fake.instances[status.instance_id]
    assert (instance.ami, instance.key_name, instance.security_group_ids) == (
        x86, "ops", ("sg-0123456789abcdef0",))
    assert instance.tags["cost-centre"] == "42" and instance.tags["team"] == "ci"
    assert instance.user_data == "w0 pw 127.0.0.1:9989\norg/w:1"


# -- checkconfig: the setting's shape ----------------------------------------------------


def _problems(**values: Any) -> list[str]:
    base = {"image": "org/w:1", "instance_type": "t3.micro", "region": "us-east-1"}
    return checks.config_problems("w", None, **{**base, **values})


@pytest.mark.parametrize("value", [
    {"LaunchTemplateName": "ci-workers"}, {"LaunchTemplateName": "ci-workers", "Version": 3},
    {"LaunchTemplateId": "lt-0123456789abcdef0", "Version": "$Default"},
    {"LaunchTemplateName": "team/ci_workers.v2", "Version": "12"},
])
def test_a_launch_template_alone_may_give_the_ami(value: dict) -> None:
    assert _problems(launch_template=value) == []
    assert _problems(launch_template=value, ami="ami-0123456789abcdef0") == []


@pytest.mark.parametrize(("value", "message"), [
    ("ci-workers", "must be a dict like {'LaunchTemplateName': 'ci-workers', 'Version': "
                   "'$Latest'}, not str"),
    ({"LaunchTemplateName": "ci", "LaunchTemplateId": "lt-0123456789abcdef0"},
     "give exactly one of LaunchTemplateName and LaunchTemplateId"),
    ({"Version": 1}, "give exactly one of LaunchTemplateName and LaunchTemplateId"),
    ({"LaunchTemplateName": "ci-workers", "UserData": "x"},
     "unknown keys ['UserData']; allowed: LaunchTemplateName, LaunchTemplateId, Version"),
    ({"LaunchTemplateId": "ci-workers"}, "LaunchTemplateId 'ci-workers' is not a launch "
                                         "template id (lt- followed by 8 or 17 hex digits)"),
    ({"LaunchTemplateName": "a b"}, "is not a launch template name"),
    ({"LaunchTemplateName": "ci-workers", "Version": "latest"},
     "Version must be a version number (1, 2, ...), '$Latest' or '$Default', not 'latest'"),
    ({"LaunchTemplateName": "ci-workers", "Version": 0}, "not 0"),
    ({"LaunchTemplateName": "ci-workers", "Version": True}, "not True"),
])
def test_the_launch_template_setting_is_checked(value: Any, message: str) -> None:
    problems = _problems(launch_template=value, ami="ami-0123456789abcdef0")
    assert len(problems) == 1 and problems[0].startswith("launch_template: "), problems
    assert message in problems[0]


def test_without_a_template_an_ami_is_still_needed() -> None:
    assert _problems() == ["ami: give exactly one of ami= or ami_filters= (with ami_owners=), "
                           "or a launch_template whose ImageId is used"]


# -- on a real master, with moto's launch templates ----------------------------------------


def _template(cloud: Any, name: str, **data: Any) -> str:
    """A launch template in the local cloud, as another team's Terraform would make it."""
    return cloud.client().create_launch_template(
        LaunchTemplateName=name, LaunchTemplateData=data)["LaunchTemplate"]["LaunchTemplateId"]


@pytest.mark.integration
def test_an_instance_gets_the_templates_settings_and_the_plugins_parts(make_master, cloud):
    ec2 = cloud.client()
    group = ec2.create_security_group(GroupName="ci-workers", Description="ci")["GroupId"]
    _template(cloud, "ci-workers", ImageId=cloud.base_ami_id, KeyName="ops",
              SecurityGroupIds=[group],
              BlockDeviceMappings=[{"DeviceName": "/dev/xvda",
                                    "Ebs": {"VolumeSize": 30, "Encrypted": True}}],
              MetadataOptions={"HttpTokens": "required", "HttpPutResponseHopLimit": 1},
              TagSpecifications=[{"ResourceType": "instance",
                                  "Tags": [{"Key": "cost-centre", "Value": "42"}]}])
    master = make_master(master_cfg(  # the instance stays up (its volume with it)
        build_wait_timeout=600, instance_type="c6i.large",
        settings={"ami_filters": None,
                  "launch_template": "{'LaunchTemplateName': 'ci-workers', "
                                     "'Version': '$Latest'}"}))
    assert master.wait_request(master.force(), 90)["results"] == SUCCESS
    (instance,) = instances(cloud)
    # The template's: image, key pair, security group, encrypted volume, its tag.
    assert (instance["ImageId"], instance["KeyName"]) == (cloud.base_ami_id, "ops")
    assert [g["GroupId"] for g in instance["SecurityGroups"]] == [group]
    tags = {t["Key"]: t["Value"] for t in instance["Tags"]}
    assert tags["cost-centre"] == "42"
    (volume,) = ec2.describe_volumes(Filters=[
        {"Name": "attachment.instance-id", "Values": [instance["InstanceId"]]},
        {"Name": "attachment.device", "Values": ["/dev/xvda"]}])["Volumes"]
    assert (volume["Size"], volume["Encrypted"]) == (30, True)
    # The plugin's: instance type, tags at launch, user data naming the image and worker.
    assert instance["InstanceType"] == "c6i.large"
    assert (tags["team"], tags["buildbot:worker"]) == ("ci", "w0")
    raw = ec2.describe_instance_attribute(InstanceId=instance["InstanceId"],
                                          Attribute="userData")["UserData"]["Value"]
    sent = userdata.parse(base64.b64decode(raw).decode())
    assert (sent.worker_name, sent.image) == ("w0", "localhost/dockerami/worker:test")
    # The template's image is named in the log (and on the Fleet page).
    assert f"launched {instance['InstanceId']} (c6i.large (on-demand), {cloud.base_ami_id})" \
        in master.log()


@pytest.mark.integration
def test_a_template_with_its_own_user_data_fails_the_launch_clearly(make_master, cloud):
    _template(cloud, "with-user-data", ImageId=cloud.base_ami_id,
              UserData="IyEvYmluL3NoCmVjaG8gaGk=")
    master = make_master(master_cfg(
        build_wait_timeout=0, plugins={"dockerami": {}},
        settings={"launch_template": "{'LaunchTemplateName': 'with-user-data'}"}))
    assert master.wait_request(master.force(), 90)["results"] == EXCEPTION
    failure = master.fleet()["workers"][0]["last_failure"]
    assert failure.startswith("launch_template: template 'with-user-data' version $Default "
                              "sets UserData; the plugin's user data names the image"), failure
    assert failure in master.log()
    assert cloud.faults.count("RunInstances") == 0
    assert cloud.faults.count("DescribeLaunchTemplateVersions") == 1
