"""Graviton and mixed architectures: each instance type of a launch gets the AMI of its
architecture (fleet/architecture.py), pure and on the in-memory FakeEc2 with a real
Fleet on a fake clock, then against the local cloud's moto (which knows every instance
type's architecture) on a real master."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet import task
from twisted.python import log

from buildbot_dockerami.cloud.ec2 import AsyncEc2, LaunchSpec
from buildbot_dockerami.cloud.testing import FakeEc2
from buildbot_dockerami.config import checks
from buildbot_dockerami.fleet import architecture, fallback
from buildbot_dockerami.fleet.architecture import Images, Plan
from buildbot_dockerami.fleet.launch import Launcher
from buildbot_dockerami.fleet.service import Fleet
from tests.harness import EXCEPTION, REPO, SUCCESS, master_cfg
from tests.helpers import instances, run

MIXED = ["c7g.large", "c6i.large"]
BY_NAME = [{"Name": "name", "Values": ["dockerami-base-*"]}]






def resolve(client: AsyncEc2, types: Any = MIXED, ami: Any = None, filters: Any = None,
            template_image: str | None = None) -> Plan:
    return run(architecture.resolve(client, types, ami, filters, None,
                                    template_image=template_image))


# -- the name's guess (checkconfig), held to every type EC2 has -------------------------


def test_the_guess_from_a_name_agrees_with_every_type_moto_knows() -> None:
    from moto.ec2.models.instance_types import INSTANCE_TYPES

    guessed = 0
    for itype, info in INSTANCE_TYPES.items():
        arch = architecture.guess(itype)
        if arch is not None:
            guessed += 1
            assert arch in info["ProcessorInfo"]["SupportedArchitectures"], itype
    assert guessed > 0.95 * len(INSTANCE_TYPES)
    assert [architecture.guess(t) for t in ("c7g.large", "t4g.nano", "a1.large", "c6gn.xl",
                                            "c6i.large", "t3.micro", "mac2.metal")] == [
        "arm64", "arm64", "arm64", "arm64", "x86_64", "x86_64", None]


# -- choose: pure ------------------------------------------------------------------------


def test_each_type_gets_the_ami_of_its_architecture() -> None:
    images = Images(by_arch={"arm64": "ami-arm", "x86_64": "ami-x86"})
    archs = {"c7g.large": ("arm64",), "c6i.large": ("x86_64",), "t2.micro": ("i386", "x86_64")}
    plan = architecture.choose([*MIXED, "t2.micro"], archs, images)
    assert plan.amis == {"c7g.large": "ami-arm", "c6i.large": "ami-x86", "t2.micro": "ami-x86"}
    assert plan.skipped == {}


def test_a_type_without_an_ami_of_its_architecture_is_skipped_with_why() -> None:
    images = Images(by_arch={"x86_64": "ami-x86"}, missing={"arm64": "no arm64 AMI here"})
    plan = architecture.choose(MIXED, {"c7g.large": ("arm64",), "c6i.large": ("x86_64",)},
                               images)
    assert plan.amis == {"c6i.large": "ami-x86"}
    assert plan.skipped == {"c7g.large": "it is arm64: no arm64 AMI here"}
    options = fallback.options(MIXED, ["subnet-1", "subnet-2"], "on-demand")
    assert [o.instance_type for o in plan.usable(options)] == ["c6i.large", "c6i.large"]


def test_an_unknown_architecture_gets_the_one_image_or_is_skipped() -> None:
    unknown = {"c7g.large": "DescribeInstanceTypes: UnauthorizedOperation: no"}
    as_before = architecture.choose(["c7g.large"], {}, Images(unknown_type="ami-any"), unknown)
    assert as_before.amis == {"c7g.large": "ami-any"}
    assert as_before.unchecked == unknown
    strict = architecture.choose(["c7g.large"], {}, Images(by_arch={"arm64": "ami-arm"}),
                                 unknown)
    assert strict.amis == {}
    assert strict.skipped["c7g.large"] == (
        "its architecture is unknown (DescribeInstanceTypes: UnauthorizedOperation: no), "
        "and no AMI of ami (arm64) can be chosen for it")
    anywhere = architecture.choose(MIXED, {"c6i.large": ("x86_64",)}, Images(any_arch="ami-1"))
    assert anywhere.amis == {"c7g.large": "ami-1", "c6i.large": "ami-1"}


# -- resolve on the FakeEc2 ---------------------------------------------------------------


def test_one_ami_per_architecture(fake: FakeEc2, client: AsyncEc2) -> None:
    plan = resolve(client, ami={"arm64": "ami-arm", "x86_64": "ami-x86"})
    assert plan.amis == {"c7g.large": "ami-arm", "c6i.large": "ami-x86"}
    only_arm = resolve(client, ami={"arm64": "ami-arm"})
    assert only_arm.amis == {"c7g.large": "ami-arm"}
    assert only_arm.skipped == {
        "c6i.large": "it is x86_64: ami has no AMI for x86_64 (it has arm64)"}
    # DescribeInstanceTypes once per type and client: architectures never change.
    assert fake.requests("DescribeInstanceTypes") == [MIXED]
    resolve(client, ["c7g.large", "t3.micro"], ami={"arm64": "ami-arm", "x86_64": "ami-x86"})
    assert fake.requests("DescribeInstanceTypes") == [MIXED, ["t3.micro"]]


def test_filters_resolve_per_architecture(fake: FakeEc2, client: AsyncEc2) -> None:
    x86 = fake.register_image("dockerami-base-amd64-1", "2026-12-01T00:00:00.000Z")
    arm = fake.register_image("dockerami-base-arm64-1", "2026-11-01T00:00:00.000Z", "arm64")
    plan = resolve(client, filters=BY_NAME)
    assert plan.amis == {"c7g.large": arm, "c6i.large": x86}  # not the newest of all
    assert [r[2] for r in fake.requests("DescribeImages")] == ["arm64", "x86_64"]
    # A type running two architectures (i386, x86_64) asks for the best one first, and
    # stops at the first with an image.
    assert resolve(client, ["t2.micro"], filters=BY_NAME).amis == {"t2.micro": x86}
    assert [r[2] for r in fake.requests("DescribeImages")][2:] == ["x86_64"]


def test_filters_with_no_image_of_one_architecture_skip_its_types(
        fake: FakeEc2, client: AsyncEc2) -> None:
    x86 = fake.register_image("dockerami-base-amd64-1")
    plan = resolve(client, filters=BY_NAME)
    assert plan.amis == {"c6i.large": x86}
    assert plan.skipped == {"c7g.large": "it is arm64: no available AMI for arm64 matches "
                                         f"ami_filters={BY_NAME!r} ami_owners=None"}


def test_one_fixed_ami_runs_only_on_types_of_its_architecture(
        fake: FakeEc2, client: AsyncEc2) -> None:
    x86 = fake.register_image("base")
    plan = resolve(client, ami=x86)
    assert plan.amis == {"c6i.large": x86}
    assert plan.skipped == {"c7g.large": f"it is arm64: ami {x86} is x86_64"}
    resolve(client, ami=x86)
    assert fake.requests("DescribeImages") == [[x86]]  # once: it never changes
    # An image EC2 does not describe (e.g. another account's, not shared): as before.
    assert resolve(client, ami="ami-0123456789abcdef0").amis == {
        "c7g.large": "ami-0123456789abcdef0", "c6i.large": "ami-0123456789abcdef0"}


def test_the_template_image_is_checked_and_left_to_the_template(
        fake: FakeEc2, client: AsyncEc2) -> None:
    arm = fake.register_image("base-arm", architecture="arm64")
    plan = resolve(client, template_image=arm)
    assert plan.amis == {"c7g.large": ""} and plan.template_image == arm
    assert plan.skipped == {
        "c6i.large": f"it is x86_64: the launch template's ImageId {arm} is arm64"}
    ssm = resolve(client, template_image="resolve:ssm:/ci/base-ami")
    assert ssm.amis == {"c7g.large": "", "c6i.large": ""}


def test_types_ec2_does_not_describe(fake: FakeEc2, client: AsyncEc2) -> None:
    fake.inject("DescribeInstanceTypes", "UnauthorizedOperation", "not allowed")
    x86 = fake.register_image("dockerami-base-amd64-1")
    plan = resolve(client, filters=BY_NAME)
    assert plan.amis == {"c7g.large": x86, "c6i.large": x86}  # as before the check
    assert fake.requests("DescribeImages") == [(BY_NAME, None, None)]
    # Not kept: the next launch asks again, and then knows.
    plan = resolve(client, filters=BY_NAME)
    assert plan.amis == {"c6i.large": x86} and "c7g.large" in plan.skipped
    # An unknown type: one call per type finds which; the known one is resolved.
    plan = resolve(client, ["c7g.large", "z9.huge"], ami={"arm64": "ami-arm"})
    assert plan.amis == {"c7g.large": "ami-arm"}
    assert plan.skipped["z9.huge"].startswith(
        "its architecture is unknown (DescribeInstanceTypes: InvalidInstanceType: ")
    calls = fake.count("DescribeInstanceTypes")
    resolve(client, ["z9.huge"], ami={"arm64": "ami-arm"})
    assert fake.count("DescribeInstanceTypes") == calls  # EC2's "no such type" is kept


# -- a launch over the plan: the capacity fallback changes the AMI with the type ----------


def launch_mixed(fleet: Fleet, client: AsyncEc2, plan: Any) -> tuple[Any, dict[str, float]]:
    """One launch of MIXED with ``plan``, and the timeline it noted."""
    timeline: dict[str, float] = {}
    launcher = Launcher(fleet, "w0", "<worker 'w0'>", timeline.__setitem__)
    spec = LaunchSpec(ami="", instance_type="", user_data="w0 pw 127.0.0.1:9989\nimg",
                      tags={"team": "ci"})
    instance = run(launcher.launch(client, spec, fallback.options(MIXED, None, "on-demand"),
                                   image="img", key="k", serves=["w0"], reuse=False,
                                   plan=plan))
    return instance, timeline


def test_capacity_fallback_from_graviton_launches_the_amd64_ami(
        fake: FakeEc2, client: AsyncEc2) -> None:
    clock = task.Clock()
    clock.advance(1000)
    fleet = Fleet(clock, "master-a")
    x86 = fake.register_image("dockerami-base-amd64-1")
    arm = fake.register_image("dockerami-base-arm64-1", architecture="arm64")
    plan = resolve(client, filters=BY_NAME)
    fake.inject("RunInstances", "InsufficientInstanceCapacity", "no c7g.large")
    instance, timeline = launch_mixed(fleet, client, plan)
    tried = [(s.instance_type, s.ami) for s in fake.requests("RunInstances")]
    assert tried == [("c7g.large", arm), ("c6i.large", x86)]
    assert (instance.instance_type, instance.ami) == ("c6i.large", x86)
    assert fake.instances[instance.instance_id].ami == x86
    assert list(timeline) == ["fallback 1: c7g.large (on-demand): InsufficientInstanceCapacity"]


def test_a_skipped_type_is_noted_and_never_tried(fake: FakeEc2, client: AsyncEc2) -> None:
    fleet = Fleet(task.Clock(), "master-a")
    x86 = fake.register_image("base")
    plan = resolve(client, ami=x86)
    instance, timeline = launch_mixed(fleet, client, plan)
    assert [s.instance_type for s in fake.requests("RunInstances")] == ["c6i.large"]
    assert instance.ami == x86
    assert list(timeline) == [f"skipped c7g.large: it is arm64: ami {x86} is x86_64"]


# -- checkconfig: what the names tell without EC2 ----------------------------------------


def _problems(**values: Any) -> list[str]:
    base = {"image": "org/w:1", "instance_type": MIXED, "region": "us-east-1"}
    return checks.config_problems("w", None, **{**base, **values})


def test_checkconfig_refuses_a_type_whose_architecture_has_no_ami() -> None:
    assert _problems(ami={"arm64": "ami-0123456789abcdef0",
                          "x86_64": "ami-0123456789abcdef1"}) == []
    assert _problems(ami={"arm64": "ami-0123456789abcdef0"}) == [
        "ami: has no AMI for x86_64, the architecture of instance_type 'c6i.large' "
        "(ami has arm64)"]
    assert _problems(ami={"aarch64": "ami-0123456789abcdef0"}) == [
        "ami: 'aarch64' is not an EC2 architecture (x86_64, arm64, i386, x86_64_mac, "
        "arm64_mac)"]
    assert _problems(ami={"arm64": "ami-nope"}, instance_type="c7g.large") == [
        "ami: 'ami-nope' is not an AMI id (ami- followed by 8 or 17 hex digits)"]
    assert _problems(ami={}) == [
        "ami: an AMI per architecture names at least one, e.g. "
        "{'arm64': 'ami-...', 'x86_64': 'ami-...'}"]
    # A name that does not tell (mac2.metal) is left to the launch.
    assert _problems(ami={"arm64": "ami-0123456789abcdef0"}, instance_type="mac2.metal") == []


def test_rendered_per_architecture_amis_are_checked_without_quoting_them() -> None:
    problems = checks.rendered_problems({
        "image": "org/w:1", "instance_type": "c7g.large", "ami": {"arm64": "ami-Zq9"},
        "setup_repo": None, "setup_branch": None})
    assert problems == ["rendered ami: the rendered value is not an AMI id "
                        "(ami- followed by 8 or 17 hex digits)"]


# -- on a real master, against the local cloud's moto -------------------------------------


@pytest.mark.integration
def test_graviton_first_and_amd64_after_a_capacity_fallback(make_master, cloud):
    """The local cloud has a base AMI per architecture, both named dockerami-base-*."""
    master = make_master(master_cfg(build_wait_timeout=0, instance_type=MIXED))
    assert master.wait_request(master.force(), 90)["results"] == SUCCESS
    (first,) = instances(cloud)
    assert (first["InstanceType"], first["ImageId"], first["Architecture"]) == (
        "c7g.large", cloud.base_ami_ids["arm64"], "arm64")
    cloud.faults.inject("RunInstances", "InsufficientInstanceCapacity",
                        "We currently do not have sufficient c7g.large capacity.", count=1)
    assert master.wait_request(master.force(), 90)["results"] == SUCCESS
    second = max(instances(cloud), key=lambda i: i["LaunchTime"])
    assert second["InstanceId"] != first["InstanceId"]
    assert (second["InstanceType"], second["ImageId"], second["Architecture"]) == (
        "c6i.large", cloud.base_ami_ids["x86_64"], "x86_64")
    assert ("RunInstances for c7g.large (on-demand) failed (InsufficientInstanceCapacity); "
            "trying c6i.large (on-demand)") in master.log()
    assert cloud.faults.count("RunInstances") == 3
    assert cloud.faults.count("DescribeInstanceTypes") == 1  # kept by the master's client


@pytest.mark.integration
def test_an_ami_no_listed_type_can_boot_fails_the_build_clearly(make_master, cloud):
    arm = cloud.base_ami_ids["arm64"]
    master = make_master(master_cfg(
        build_wait_timeout=0, instance_type="c6i.large", plugins={"dockerami": {}},
        settings={"ami_filters": None, "ami": repr(arm)}))
    assert master.wait_request(master.force(), 90)["results"] == EXCEPTION
    reason = f"no instance type has an AMI it can boot: c6i.large: it is x86_64: ami {arm} is arm64"
    assert master.fleet()["workers"][0]["last_failure"] == reason
    assert reason in master.log()
    assert cloud.faults.count("RunInstances") == 0
    assert 'dockerami_launch_failures_total{reason="no_ami"} 1.0' in master.metrics().text


# -- the instance side: both AMIs, images for the engine's architecture -------------------


def test_the_packer_template_builds_an_ami_per_architecture() -> None:
    template = json.loads((REPO / "ami" / "packer" / "base-ami.json").read_text())
    builders = {b["name"]: b for b in template["builders"]}
    assert sorted(builders) == ["amd64", "arm64"]
    variables = template["variables"]
    for name, arch, itype in (("amd64", "x86_64", "t3.small"), ("arm64", "arm64", "t4g.small")):
        builder = builders[name]
        filters = builder["source_ami_filter"]["filters"]
        assert filters["architecture"] == arch
        source = filters["name"].replace("{{user `", "").replace("`}}", "")
        assert variables[source] == f"debian-12-{name}-*"
        assert variables[builder["instance_type"].split("`")[1]] == itype
        assert architecture.guess(itype) == arch
        # Both are found by the documented filter dockerami-base-*, per architecture.
        assert builder["ami_name"].startswith("{{user `ami_name_prefix`}}-")
        assert builder["tags"]["dockerami:arch"] == arch
    assert builders["amd64"]["ami_name"] != builders["arm64"]["ami_name"]


def test_wheels_are_fetched_for_the_engines_architecture(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from buildbot_dockerami.cli import images

    assert images.engine_architecture(SimpleNamespace(version=lambda: {"Arch": "arm64"})) == (
        "arm64")
    commands: list[list[str]] = []
    monkeypatch.setattr(images.subprocess, "run",
                        lambda command, check: commands.append(command))
    for arch, machine in (("arm64", "aarch64"), ("amd64", "x86_64")):
        images.fetch_wheels(tmp_path, "buildbot-worker==4.3.*", architecture=arch,
                            out=lambda _: None)
        assert commands[-1][commands[-1].index("--platform") + 1] == f"manylinux2014_{machine}"


def test_a_launch_without_the_check_says_so(fake: FakeEc2, client: AsyncEc2) -> None:
    fake.inject("DescribeInstanceTypes", "UnauthorizedOperation", "not allowed")
    x86 = fake.register_image("dockerami-base-amd64-1")
    plan = resolve(client, ["c6i.large"], filters=BY_NAME)
    assert plan.unchecked == {"c6i.large": "DescribeInstanceTypes: UnauthorizedOperation: "
                                           "not allowed"}
    lines: list[str] = []
    observer = lambda event: lines.append(" ".join(map(str, event.get("message", ()))))  # noqa: E731
    log.addObserver(observer)
    try:
        launcher = Launcher(Fleet(task.Clock(), "master-a"), "w0", "<worker 'w0'>",
                            lambda *_: None)
        spec = LaunchSpec(ami="", instance_type="", user_data="w0 pw 127.0.0.1:9989\nimg",
                          tags={"team": "ci"})
        instance = run(launcher.launch(client, spec, fallback.options("c6i.large", None,
                                                                      "on-demand"),
                                       image="img", key="k", serves=["w0"], reuse=False,
                                       plan=plan))
    finally:
        log.removeObserver(observer)
    assert instance.ami == x86
    assert ("<worker 'w0'>: architecture of c6i.large unknown (DescribeInstanceTypes: "
            "UnauthorizedOperation: not allowed); its AMI is chosen without the architecture "
            "check") in lines
