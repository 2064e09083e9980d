"""FakeEc2 held to the local cloud's EC2: every test here runs twice, against the fake
and against the real ``Ec2`` talking to a moto server on 127.0.0.1 (the local cloud's,
which adds EC2's ClientToken rule to moto and injects the faults), with the same test
function. The local cloud's hypervisor runs with a runtime that boots nothing.

The real client's retries are turned off (MAX_ATTEMPTS=0), as the fake's faults are
what Ec2 raises once its retries are spent: one injected fault, one raised error."""

from __future__ import annotations

import base64
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from botocore.exceptions import BotoCoreError, ClientError

from buildbot_dockerami.cloud import ec2 as ec2_module
from buildbot_dockerami.cloud.ec2 import CloudError, Credentials, Ec2, LaunchSpec
from buildbot_dockerami.cloud.instances import LAUNCH_TAG, MASTER_TAG, WORKER_TAG
from buildbot_dockerami.cloud.testing import ACTIONS, SPOT_RECLAIMED, USER_SHUTDOWN, FakeEc2
from buildbot_dockerami.localcloud import BASE_AMI_NAME, LocalCloud
from buildbot_dockerami.localcloud.hypervisor import Booting
from tests.harness import wait_for

ACCESS_KEY = "AKIDCONFORMANCE"


class NoMachines:
    """A hypervisor runtime that boots nothing and prints what the test says."""

    def __init__(self) -> None:
        self.consoles: dict[str, str] = {}

    def start(self, booting: Booting) -> None:
        pass

    def stop(self, instance_id: str) -> None:
        pass

    def running(self) -> list[str]:
        return []

    def console(self, instance_id: str) -> str | None:
        return self.consoles.get(instance_id)

    def poweroff_requested(self, instance_id: str) -> bool:
        return False

    def spot_notice(self, instance_id: str) -> None:
        pass


class Side:
    """One EC2 under test: ``ec2`` has Ec2's methods; the rest is what the test does to
    EC2 from elsewhere (set-up, faults, other users, EC2's own doings)."""

    def __init__(self, ec2: Any, ami: str) -> None:
        self.ec2, self.ami = ec2, ami

    @staticmethod
    def token(name: str) -> str:
        """A ClientToken no earlier test used."""
        return f"{name}-{uuid.uuid4().hex[:8]}"

    def register_image(self, name: str, creation_date: str,
                       architecture: str = "x86_64") -> str: ...
    def add_subnet(self, zone: str) -> str: ...
    def security_group(self) -> str: ...
    def add_launch_template(self, name: str, data: dict[str, Any]) -> str: ...
    def add_template_version(self, template_id: str, data: dict[str, Any]) -> None: ...
    def launched(self, instance_id: str) -> dict[str, Any]:
        """What EC2 says of the instance beyond InstanceStatus: its image, key pair,
        security groups and tags."""
        ...
    def user_data(self, instance_id: str) -> str: ...
    def set_console(self, instance_id: str, text: str) -> None: ...
    def terminated_elsewhere(self, instance_id: str) -> None: ...
    def reclaim_spot(self, instance_id: str) -> None: ...
    def set_spot_price(self, instance_type: str, price: float,
                       zone: str | None = None) -> None: ...
    def inject(self, action: str, code: str, message: str, count: int = 1) -> None: ...
    def throttle(self, action: str) -> None: ...
    def drop(self, action: str) -> None: ...
    def hang(self, action: str) -> None: ...
    def clear(self) -> None: ...
    def count(self, action: str) -> int: ...


class FakeSide(Side):
    def __init__(self) -> None:
        fake = FakeEc2()
        super().__init__(fake, fake.register_image(BASE_AMI_NAME))
        self.fake = fake

    def register_image(self, name: str, creation_date: str,
                       architecture: str = "x86_64") -> str:
        return self.fake.register_image(name, creation_date, architecture)

    def add_subnet(self, zone: str) -> str:
        return self.fake.add_subnet(zone)

    def security_group(self) -> str:
        return "sg-" + uuid.uuid4().hex[:17]  # taken as given

    def add_launch_template(self, name: str, data: dict[str, Any]) -> str:
        return self.fake.add_launch_template(name, data)

    def add_template_version(self, template_id: str, data: dict[str, Any]) -> None:
        self.fake.add_template_version(template_id, data)

    def launched(self, instance_id: str) -> dict[str, Any]:
        instance = self.fake.instances[instance_id]
        return {"ami": instance.ami, "key_name": instance.key_name,
                "security_groups": list(instance.security_group_ids), "tags": instance.tags}

    def user_data(self, instance_id: str) -> str:
        return self.fake.instances[instance_id].user_data

    def set_console(self, instance_id: str, text: str) -> None:
        self.fake.set_console(instance_id, text)

    def terminated_elsewhere(self, instance_id: str) -> None:
        self.fake.terminated_elsewhere([instance_id])

    def reclaim_spot(self, instance_id: str) -> None:
        self.fake.reclaim_spot(instance_id)

    def set_spot_price(self, instance_type: str, price: float, zone: str | None = None) -> None:
        self.fake.set_spot_price(instance_type, price, zone)

    def inject(self, action: str, code: str, message: str, count: int = 1) -> None:
        self.fake.inject(action, code, message, count)

    def throttle(self, action: str) -> None:
        self.fake.throttle(action)

    def drop(self, action: str) -> None:
        self.fake.drop(action)

    def hang(self, action: str) -> None:
        self.fake.hang(action)

    def clear(self) -> None:
        self.fake.clear()

    def count(self, action: str) -> int:
        return self.fake.count(action)


class MotoSide(Side):
    def __init__(self, cloud: LocalCloud, runtime: NoMachines) -> None:
        # An answer lost or never given costs one read timeout: a short one.
        ec2 = Ec2(cloud.region, cloud.endpoint_url, timeout=1,
                  credentials=Credentials(ACCESS_KEY, "local"))
        super().__init__(ec2, cloud.base_ami_id)
        self.cloud, self.runtime, self.other = cloud, runtime, cloud.client()
        self.counted: dict[str, int] = {}

    def reset(self) -> None:
        """An empty cloud again: moto's state, faults, consoles and counts (the server's
        memory of ClientTokens stays: ``Side.token`` makes each test's its own)."""
        urllib.request.urlopen(urllib.request.Request(
            f"{self.cloud.endpoint_url}/moto-api/reset", method="POST"), timeout=10).close()
        self.ami = self.other.register_image(Name=BASE_AMI_NAME)["ImageId"]
        self.cloud.faults.clear()
        self.cloud.faults.spot_prices.clear()
        self.runtime.consoles.clear()
        self.counted = {action: self.cloud.faults.count(action, ACCESS_KEY)
                        for action in ACTIONS.values()}

    def register_image(self, name: str, creation_date: str,
                       architecture: str = "x86_64") -> str:
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.ec2.models import ec2_backends

        image_id = self.cloud.register_image(name, architecture)
        # RegisterImage dates an image to the second: set it, as EC2 keeps the real one.
        ec2_backends[DEFAULT_ACCOUNT_ID][self.cloud.region].amis[image_id].creation_date = (
            datetime.strptime(creation_date, "%Y-%m-%dT%H:%M:%S.000Z"))
        return image_id

    def security_group(self) -> str:
        return self.other.create_security_group(
            GroupName=self.token("sg"), Description="conformance")["GroupId"]

    def add_launch_template(self, name: str, data: dict[str, Any]) -> str:
        return self.other.create_launch_template(
            LaunchTemplateName=name, LaunchTemplateData=data)["LaunchTemplate"][
            "LaunchTemplateId"]

    def add_template_version(self, template_id: str, data: dict[str, Any]) -> None:
        self.other.create_launch_template_version(LaunchTemplateId=template_id,
                                                  LaunchTemplateData=data)

    def launched(self, instance_id: str) -> dict[str, Any]:
        (reservation,) = self.other.describe_instances(InstanceIds=[instance_id])[
            "Reservations"]
        (instance,) = reservation["Instances"]
        return {"ami": instance.get("ImageId"), "key_name": instance.get("KeyName"),
                "security_groups": [g["GroupId"] for g in instance.get("SecurityGroups", [])],
                "tags": {t["Key"]: t["Value"] for t in instance.get("Tags", [])}}

    def add_subnet(self, zone: str) -> str:
        vpc = self.other.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
        return self.other.create_subnet(VpcId=vpc, CidrBlock="10.0.1.0/24",
                                        AvailabilityZone=zone)["Subnet"]["SubnetId"]

    def user_data(self, instance_id: str) -> str:
        value = self.other.describe_instance_attribute(
            InstanceId=instance_id, Attribute="userData")["UserData"]["Value"]
        return base64.b64decode(value).decode()

    def set_console(self, instance_id: str, text: str) -> None:
        self.runtime.consoles[instance_id] = text

    def terminated_elsewhere(self, instance_id: str) -> None:
        self.other.terminate_instances(InstanceIds=[instance_id])

    def reclaim_spot(self, instance_id: str) -> None:
        self.cloud.hypervisor.interrupt(instance_id, notice=0)
        wait_for(lambda: self.ec2.describe([instance_id])[instance_id].reason == SPOT_RECLAIMED,
                 10, "the spot instance to be reclaimed")

    def set_spot_price(self, instance_type: str, price: float, zone: str | None = None) -> None:
        self.cloud.set_spot_price(instance_type, price, zone)

    def inject(self, action: str, code: str, message: str, count: int = 1) -> None:
        self.cloud.faults.inject(action, code, message, count)

    def throttle(self, action: str) -> None:
        self.cloud.faults.throttle(action)

    def drop(self, action: str) -> None:
        self.cloud.faults.drop(action, hold=0.1)

    def hang(self, action: str) -> None:
        self.cloud.faults.hang(action, hold=0.1)

    def clear(self) -> None:
        self.cloud.faults.clear()

    def count(self, action: str) -> int:
        return self.cloud.faults.count(action, ACCESS_KEY) - self.counted[action]


@pytest.fixture(scope="module")
def moto_cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoSide]:
    """One local cloud for the module (each test starts from an empty one, see ``side``)."""
    runtime = NoMachines()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ec2_module, "MAX_ATTEMPTS", 0)
        with LocalCloud(state_dir=tmp_path_factory.mktemp("cloud"), runtime=runtime) as cloud:
            yield MotoSide(cloud, runtime)


@pytest.fixture(params=["fake", "moto"])
def side(request: pytest.FixtureRequest) -> Side:
    if request.param == "fake":
        return FakeSide()
    moto: MotoSide = request.getfixturevalue("moto_cloud")
    moto.reset()
    return moto


def spec(side: Side, token: str = "", **changes: Any) -> LaunchSpec:
    tags = {"team": "ci", WORKER_TAG: "w0", MASTER_TAG: "m-1"}
    if token:
        tags[LAUNCH_TAG] = token
    values: dict[str, Any] = {"ami": side.ami, "instance_type": "t3.micro",
                              "user_data": "w0 pw 127.0.0.1:9989\norg/img:1", "tags": tags,
                              "client_token": token, **changes}
    return LaunchSpec(**values)


def error_code(info: pytest.ExceptionInfo) -> tuple[str, str]:
    return info.value.response["Error"]["Code"], info.value.operation_name


def test_a_launch_answers_pending_then_describes_running(side: Side) -> None:
    token = side.token("launch")
    answer = side.ec2.run_instance(spec(side, token))
    assert answer.instance_id.startswith("i-") and answer.state == "pending"
    assert (answer.instance_type, answer.availability_zone, answer.market) == (
        "t3.micro", "us-east-1a", "on-demand")
    assert (answer.worker, answer.master, answer.launch_token) == ("w0", "m-1", token)
    assert answer.launched_at > 0 and answer.reason == ""
    described = side.ec2.describe([answer.instance_id])[answer.instance_id]
    assert described.state == "running"
    assert described == type(answer)(**{**answer.__dict__, "state": "running"})
    assert side.user_data(answer.instance_id) == "w0 pw 127.0.0.1:9989\norg/img:1"


def test_the_same_client_token_is_the_same_instance(side: Side) -> None:
    token = side.token("launch")
    first = side.ec2.run_instance(spec(side, token))
    again = side.ec2.run_instance(spec(side, token, instance_type="c5.large"))
    assert again == first  # the first call's answer, launch state included
    other = side.ec2.run_instance(spec(side, side.token("other")))
    assert other.instance_id != first.instance_id
    assert list(side.ec2.describe_tagged(LAUNCH_TAG, token)) == [first.instance_id]
    assert side.count("RunInstances") == 3


def test_a_launch_without_tags_is_refused(side: Side) -> None:
    with pytest.raises(ClientError) as info:
        side.ec2.run_instance(spec(side, tags={}))
    assert error_code(info) == ("InvalidParameterValue", "RunInstances")
    assert not side.ec2.describe_tagged(WORKER_TAG, "w0")


def test_spot_and_subnets(side: Side) -> None:
    subnet = side.add_subnet("us-east-1c")
    answer = side.ec2.run_instance(spec(side, market="spot", subnet_id=subnet))
    assert (answer.market, answer.availability_zone) == ("spot", "us-east-1c")
    assert side.ec2.describe([answer.instance_id])[answer.instance_id].market == "spot"
    with pytest.raises(ClientError) as info:
        side.ec2.run_instance(spec(side, subnet_id="subnet-0123456789abcdef0"))
    assert error_code(info) == ("InvalidSubnetID.NotFound", "RunInstances")


def test_describe_leaves_unknown_ids_out(side: Side) -> None:
    a, b = (side.ec2.run_instance(spec(side)).instance_id for _ in range(2))
    found = side.ec2.describe([a, "i-0123456789abcdef0", b])
    assert sorted(found) == sorted([a, b])
    assert side.ec2.describe([]) == {}
    assert side.count("DescribeInstances") == 1  # none for no ids


def test_describe_tagged_finds_ended_instances_too(side: Side) -> None:
    mine = side.ec2.run_instance(spec(side)).instance_id
    other = side.ec2.run_instance(spec(side, tags={WORKER_TAG: "w1"})).instance_id
    side.ec2.terminate([mine])
    found = side.ec2.describe_tagged(WORKER_TAG, "w0")
    assert list(found) == [mine] and found[mine].state == "terminated"
    assert list(side.ec2.describe_tagged(WORKER_TAG, "w1")) == [other]
    assert side.ec2.describe_tagged(WORKER_TAG, "nobody") == {}


def test_terminate_answers_shutting_down_and_describes_terminated(side: Side) -> None:
    a, b = (side.ec2.run_instance(spec(side)).instance_id for _ in range(2))
    assert side.ec2.terminate([a, b]) == {a: "shutting-down", b: "shutting-down"}
    status = side.ec2.describe([a])[a]
    assert (status.state, status.reason) == ("terminated", USER_SHUTDOWN)
    assert side.ec2.terminate([a]) == {a: "shutting-down"}  # again: no error


def test_terminate_of_an_unknown_id_fails_the_whole_call(side: Side) -> None:
    known = side.ec2.run_instance(spec(side)).instance_id
    for ids in (["i-0123456789abcdef0"], ["i-1"], [known, "i-0123456789abcdef0"]):
        with pytest.raises(ClientError) as info:
            side.ec2.terminate(ids)
        assert error_code(info) == ("InvalidInstanceID.NotFound", "TerminateInstances")
    assert side.ec2.describe([known])[known].state == "running"


def test_stop_and_start(side: Side) -> None:
    iid = side.ec2.run_instance(spec(side)).instance_id
    assert side.ec2.stop([iid]) == {iid: "stopping"}
    status = side.ec2.describe([iid])[iid]
    assert (status.state, status.reason) == ("stopped", USER_SHUTDOWN)
    side.ec2.set_user_data(iid, "w0 fresh 127.0.0.1:9989\norg/img:1")
    assert side.user_data(iid) == "w0 fresh 127.0.0.1:9989\norg/img:1"
    assert side.ec2.start([iid]) == {iid: "pending"}
    status = side.ec2.describe([iid])[iid]
    assert (status.state, status.reason) == ("running", "")
    for method, action in (("stop", "StopInstances"), ("start", "StartInstances")):
        with pytest.raises(ClientError) as info:
            getattr(side.ec2, method)(["i-0123456789abcdef0"])
        assert error_code(info) == ("InvalidInstanceID.NotFound", action)
    with pytest.raises(ClientError) as info:
        side.ec2.set_user_data("i-0123456789abcdef0", "x")
    assert error_code(info) == ("InvalidInstanceID.NotFound", "ModifyInstanceAttribute")


def test_console_output(side: Side) -> None:
    iid = side.ec2.run_instance(spec(side)).instance_id
    assert isinstance(side.ec2.console_output(iid), str)
    side.set_console(iid, "boot\ndockerami-bootstrap: FATAL: cannot pull image x\n")
    assert side.ec2.console_output(iid) == "boot\ndockerami-bootstrap: FATAL: cannot pull image x\n"
    side.set_console(iid, "x" * 70_000 + "end\n")
    assert side.ec2.console_output(iid) == ("x" * 70_000 + "end\n")[-64 * 1024:]
    with pytest.raises(ClientError) as info:
        side.ec2.console_output("i-0123456789abcdef0")
    assert error_code(info) == ("InvalidInstanceID.NotFound", "GetConsoleOutput")


def test_newest_image(side: Side) -> None:
    older = side.register_image("base-1", "2024-01-01T00:00:00.000Z")
    newer = side.register_image("base-2", "2024-06-01T00:00:00.000Z")
    side.register_image("other-3", "2025-01-01T00:00:00.000Z")
    by_name = [{"Name": "name", "Values": ["base-*"]}]
    assert side.ec2.newest_image(by_name, None) == newer
    assert side.ec2.newest_image(by_name, ["self"]) == newer
    assert side.ec2.newest_image([{"Name": "name", "Values": ["base-1"]}], None) == older
    for filters, owners in ((by_name, ["999999999999"]),
                            ([{"Name": "name", "Values": ["nothing-*"]}], None)):
        with pytest.raises(CloudError, match="no available AMI matches"):
            side.ec2.newest_image(filters, owners)


def test_an_injected_error_fails_the_next_calls_then_ec2_is_healthy(side: Side) -> None:
    side.inject("RunInstances", "InsufficientInstanceCapacity", "none left", count=2)
    for _ in range(2):
        with pytest.raises(ClientError) as info:
            side.ec2.run_instance(spec(side))
        assert error_code(info) == ("InsufficientInstanceCapacity", "RunInstances")
        assert info.value.response["Error"]["Message"] == "none left"
    assert not side.ec2.describe_tagged(WORKER_TAG, "w0"), "a refused launch launched"
    side.ec2.run_instance(spec(side))
    assert side.count("RunInstances") == 3
    side.inject("DescribeInstances", "UnauthorizedOperation", "no", count=5)
    side.clear()
    assert len(side.ec2.describe_tagged(WORKER_TAG, "w0")) == 1


def test_a_throttle(side: Side) -> None:
    iid = side.ec2.run_instance(spec(side)).instance_id
    side.throttle("TerminateInstances")
    with pytest.raises(ClientError) as info:
        side.ec2.terminate([iid])
    assert error_code(info) == ("RequestLimitExceeded", "TerminateInstances")
    assert side.ec2.describe([iid])[iid].state == "running"


def test_a_dropped_launch_happened_and_is_found_by_its_token(side: Side) -> None:
    side.drop("RunInstances")
    token = side.token("launch")
    with pytest.raises(BotoCoreError):  # not a ClientError: no answer at all
        side.ec2.run_instance(spec(side, token))
    (found,) = side.ec2.describe_tagged(LAUNCH_TAG, token).values()
    # Asked again with its token: that instance, no second one.
    assert side.ec2.run_instance(spec(side, token)).instance_id == found.instance_id


def test_a_hung_launch_never_happened(side: Side) -> None:
    side.hang("RunInstances")
    token = side.token("launch")
    with pytest.raises(BotoCoreError):
        side.ec2.run_instance(spec(side, token))
    assert side.ec2.describe_tagged(LAUNCH_TAG, token) == {}
    assert side.count("RunInstances") == 1


def test_terminated_elsewhere_and_spot_reclaims(side: Side) -> None:
    iid = side.ec2.run_instance(spec(side)).instance_id
    spot = side.ec2.run_instance(spec(side, market="spot")).instance_id
    side.terminated_elsewhere(iid)
    side.reclaim_spot(spot)
    assert side.count("TerminateInstances") == 0  # not this client's calls
    found = side.ec2.describe([iid, spot])
    assert (found[iid].state, found[iid].reason) == ("terminated", USER_SHUTDOWN)
    assert (found[spot].state, found[spot].reason, found[spot].market) == (
        "terminated", SPOT_RECLAIMED, "spot")


def test_instance_types_and_their_architectures(side: Side) -> None:
    assert side.ec2.instance_architectures(["c7g.large", "c6i.large", "t2.micro"]) == {
        "c7g.large": ("arm64",), "c6i.large": ("x86_64",), "t2.micro": ("i386", "x86_64")}
    with pytest.raises(ClientError) as info:
        side.ec2.instance_architectures(["c7g.large", "c9z.huge"])
    assert error_code(info) == ("InvalidInstanceType", "DescribeInstanceTypes")
    assert "c9z.huge" in info.value.response["Error"]["Message"]
    assert side.count("DescribeInstanceTypes") == 2


def test_every_instance_type_the_fake_knows_is_as_ec2_says(side: Side) -> None:
    from buildbot_dockerami.cloud.testing import INSTANCE_TYPES

    assert side.ec2.instance_architectures(list(INSTANCE_TYPES)) == dict(INSTANCE_TYPES)


def test_newest_image_of_an_architecture(side: Side) -> None:
    x86 = side.register_image("base-amd64", "2024-01-01T00:00:00.000Z")
    arm = side.register_image("base-arm64", "2024-02-01T00:00:00.000Z", "arm64")
    old_arm = side.register_image("base-arm64-old", "2023-01-01T00:00:00.000Z", "arm64")
    by_name = [{"Name": "name", "Values": ["base-*"]}]
    assert side.ec2.newest_image(by_name, None) == arm
    assert side.ec2.newest_image(by_name, None, "x86_64") == x86
    assert side.ec2.newest_image(by_name, ["self"], "arm64") == arm
    with pytest.raises(CloudError, match="no available AMI for i386 matches"):
        side.ec2.newest_image(by_name, None, "i386")
    unknown = "ami-0123456789abcdef0"
    assert side.ec2.image_architectures([x86, old_arm, unknown]) == {
        x86: "x86_64", old_arm: "arm64"}


def test_launch_template_versions(side: Side) -> None:
    first = {"KeyName": "ci", "InstanceType": "t3.micro"}
    template_id = side.add_launch_template("workers", first)
    side.add_template_version(template_id, {"KeyName": "ci-2"})
    by_name = {"LaunchTemplateName": "workers"}
    assert side.ec2.launch_template_data(by_name) == first  # $Default: version 1
    assert side.ec2.launch_template_data({**by_name, "Version": "$Latest"}) == {
        "KeyName": "ci-2"}
    assert side.ec2.launch_template_data(
        {"LaunchTemplateId": template_id, "Version": 2}) == {"KeyName": "ci-2"}
    assert side.ec2.launch_template_data(
        {"LaunchTemplateId": template_id, "Version": "$Default"}) == first
    with pytest.raises(ClientError) as info:
        side.ec2.launch_template_data({"LaunchTemplateName": "nobody"})
    assert error_code(info) == ("InvalidLaunchTemplateName.NotFoundException",
                                "DescribeLaunchTemplateVersions")
    with pytest.raises(ClientError) as info:
        side.ec2.launch_template_data({**by_name, "Version": "7"})
    assert error_code(info) == ("InvalidLaunchTemplateId.VersionNotFound",
                                "DescribeLaunchTemplateVersions")
    assert side.count("DescribeLaunchTemplateVersions") == 6


def test_a_launch_through_a_template_takes_what_the_launch_does_not_say(side: Side) -> None:
    template_ami = side.register_image("from-template", "2024-01-01T00:00:00.000Z")
    group = side.security_group()
    template_id = side.add_launch_template("base", {
        "ImageId": template_ami, "KeyName": "ci", "SecurityGroupIds": [group],
        "TagSpecifications": [{"ResourceType": "instance",
                               "Tags": [{"Key": "cost-centre", "Value": "42"},
                                        {"Key": "team", "Value": "infra"}]}]})
    ref = {"LaunchTemplateName": "base", "Version": "$Latest"}
    answer = side.ec2.run_instance(spec(side, ami="", launch_template=ref))
    seen = side.launched(answer.instance_id)
    assert (seen["ami"], seen["key_name"], seen["security_groups"]) == (
        template_ami, "ci", [group])
    assert seen["tags"] == {"cost-centre": "42", "team": "ci", WORKER_TAG: "w0",
                            MASTER_TAG: "m-1", "aws:ec2launchtemplate:id": template_id,
                            "aws:ec2launchtemplate:version": "1"}
    # What the launch says wins over the template.
    answer = side.ec2.run_instance(spec(side, launch_template=ref, keypair_name="mine"))
    seen = side.launched(answer.instance_id)
    assert (seen["ami"], seen["key_name"]) == (side.ami, "mine")
    assert side.user_data(answer.instance_id) == "w0 pw 127.0.0.1:9989\norg/img:1"
    with pytest.raises(ClientError) as info:
        side.ec2.run_instance(spec(side, launch_template={"LaunchTemplateName": "nobody"}))
    assert error_code(info) == ("InvalidLaunchTemplateName.NotFoundException", "RunInstances")


def test_spot_prices_of_offered_types_and_zones(side: Side) -> None:
    found = side.ec2.spot_prices(["t3.micro", "x9.nothing"], ["us-east-1a", "us-east-1z"])
    assert list(found) == [("t3.micro", "us-east-1a")]  # nothing for unknown ones
    assert found["t3.micro", "us-east-1a"] > 0
    assert side.ec2.spot_prices([], ["us-east-1a"]) == {}
    assert side.ec2.spot_prices(["t3.micro"], []) == {}
    assert side.count("DescribeSpotPriceHistory") == 1  # none for nothing asked
    side.set_spot_price("t3.micro", 0.0031)
    side.set_spot_price("c5.large", 0.04, zone="us-east-1b")
    found = side.ec2.spot_prices(["t3.micro", "c5.large"], ["us-east-1a", "us-east-1b"])
    assert found["t3.micro", "us-east-1a"] == found["t3.micro", "us-east-1b"] == 0.0031
    assert found["c5.large", "us-east-1b"] == 0.04
    assert 0 < found["c5.large", "us-east-1a"] != 0.04  # set in one zone only
    side.throttle("DescribeSpotPriceHistory")
    with pytest.raises(ClientError) as info:
        side.ec2.spot_prices(["t3.micro"], ["us-east-1a"])
    assert error_code(info) == ("RequestLimitExceeded", "DescribeSpotPriceHistory")
