"""Which AMI each instance type of a launch gets: the one built for its architecture.

A list like ``['c7g.large', 'c6i.large']`` mixes arm64 (Graviton) and x86_64 types; an
AMI boots only on its own architecture, so each type gets the AMI of its architecture,
and a type whose architecture has no AMI is skipped with a reason (the launch tries the
next one), never launched with an AMI that cannot boot on it.

The AMI comes from one of:
- ``ami={'arm64': 'ami-...', 'x86_64': 'ami-...'}``: one AMI per architecture;
- ``ami_filters``: the newest image matching them, per architecture (DescribeImages with
  an ``architecture`` filter added);
- ``ami='ami-...'``, or a launch template's ImageId: one image, launched only on types
  of its architecture (DescribeImages says which).

Each type's architectures come from DescribeInstanceTypes, asked once per client and
type (they never change; nor does an image's, asked once too). When EC2 does not say
(no ``ec2:DescribeInstanceTypes`` permission, a type it does not know), the launch
goes on as before this check: one image from ``ami`` or ``ami_filters`` (without the
architecture filter); only a per-architecture ``ami`` cannot choose, and skips that type.

``guess`` is the one answer known without EC2, from the type's name, for checkconfig.
``choose`` is pure; ``resolve`` asks EC2 for what ``choose`` needs.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from twisted.internet import defer

from buildbot_dockerami.cloud.ec2 import AsyncEc2, CloudError

#: EC2's architecture names (an image's Architecture, a type's SupportedArchitectures).
ARCHITECTURES = ("x86_64", "arm64", "i386", "x86_64_mac", "arm64_mac")
#: A type that runs several (e.g. t2.micro: i386 and x86_64) takes the first of these
#: that has an AMI.
PREFERENCE = {arch: rank for rank, arch in enumerate(ARCHITECTURES)}

#: Graviton families: a1, and those with a 'g' right after the generation (c7g, m6gd,
#: c6gn, t4g, x2gd, im4gn, is4gen, g5g, hpc7g, ...). mac, u-*, p6-* and other unusual
#: names are not guessed.
_ARM_FAMILY = re.compile(r"^(?:a1|[a-z]+\d+g[a-z]*)$")
_PLAIN_FAMILY = re.compile(r"^[a-z]+\d+[a-z]*(?:-[a-z]+)?$")
#: The memo keys (AsyncEc2.memo) of types' and images' architectures.
MEMO = "instance-architectures"
IMAGE_MEMO = "image-architectures"


def guess(instance_type: str) -> str | None:
    """The architecture EC2 gives ``instance_type``, from its name, or None when the
    name does not say. (Held to moto's table of every EC2 type by a test.)"""
    family = instance_type.split(".", 1)[0]
    if family.startswith("mac"):
        return None
    if _ARM_FAMILY.match(family):
        return "arm64"
    if _PLAIN_FAMILY.match(family):
        return "x86_64"
    return None


@dataclass(frozen=True)
class Images:
    """The AMIs a launch can use, as ``resolve`` found them."""

    #: Architecture -> AMI.
    by_arch: Mapping[str, str] = field(default_factory=dict)
    #: Architecture -> why it has no AMI.
    missing: Mapping[str, str] = field(default_factory=dict)
    #: An image whose architecture is not known: launched on any type.
    any_arch: str | None = None
    #: The AMI of a type whose architecture EC2 did not say (None: skip such a type).
    unknown_type: str | None = None
    #: Why unknown_type is None.
    unknown_type_reason: str = ""


@dataclass(frozen=True)
class Plan:
    """Instance type -> its AMI ("" = the launch template's ImageId), and the types
    skipped, with why."""

    amis: Mapping[str, str]
    skipped: Mapping[str, str]
    #: The launch template's ImageId, when the plan's "" stands for it (for the record).
    template_image: str = ""
    #: Types launched without the check, their architecture unknown: why.
    unchecked: Mapping[str, str] = field(default_factory=dict)

    def usable(self, options: Sequence[Any]) -> list[Any]:
        """The capacity options (fallback.Option) whose type has an AMI, in order."""
        return [o for o in options if o.instance_type in self.amis]


def choose(instance_types: Sequence[str], architectures: Mapping[str, tuple[str, ...]],
           images: Images, unknown: Mapping[str, str] | None = None) -> Plan:
    """Each type's AMI: that of the first of its ``architectures`` (best first) with
    one; ``unknown`` says why a type's architectures are not known."""
    amis: dict[str, str] = {}
    skipped: dict[str, str] = {}
    unchecked: dict[str, str] = {}
    for itype in dict.fromkeys(instance_types):
        if images.any_arch is not None:
            amis[itype] = images.any_arch
            continue
        archs = sorted(architectures.get(itype, ()), key=lambda a: PREFERENCE.get(a, 99))
        if not archs:
            why = (unknown or {}).get(itype, "EC2 did not say")
            if images.unknown_type is not None:
                amis[itype] = images.unknown_type
                unchecked[itype] = why
            else:
                skipped[itype] = f"its architecture is unknown ({why}), and " + (
                    images.unknown_type_reason
                    or f"no AMI of {_listed(images.by_arch)} can be chosen for it")
            continue
        ami = next((images.by_arch[a] for a in archs if a in images.by_arch), None)
        if ami is not None:
            amis[itype] = ami
        else:
            reasons = "; ".join(images.missing.get(a, f"no AMI for {a}") for a in archs)
            skipped[itype] = f"it is {'/'.join(archs)}: {reasons}"
    return Plan(amis, skipped, unchecked=unchecked)


def _listed(by_arch: Mapping[str, str]) -> str:
    return "ami (" + ", ".join(sorted(by_arch)) + ")" if by_arch else "ami"


def _error(e: Exception) -> str:
    if isinstance(e, ClientError):
        error = e.response.get("Error", {})
        return f"{error.get('Code', '')}: {error.get('Message', '')}"
    return str(e)


@defer.inlineCallbacks
def architectures(client: AsyncEc2, instance_types: Sequence[str]) -> Any:
    """(type -> its architectures, type -> why unknown): one DescribeInstanceTypes for the
    types not asked before on this client (one call per type if EC2 refuses the lot,
    to tell which it does not know). Answers, and types EC2 does not know, are kept."""
    memo = client.memo.setdefault(MEMO, {})
    wanted = [t for t in dict.fromkeys(instance_types) if t not in memo]
    unknown: dict[str, str] = {}
    groups = [wanted] if wanted else []
    while groups:
        group = groups.pop(0)
        try:
            found = yield client.instance_architectures(group)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code.startswith("InvalidInstanceType") and len(group) > 1:
                groups.extend([t] for t in group)
                continue
            for itype in group:
                unknown[itype] = f"DescribeInstanceTypes: {_error(e)}"
                if code.startswith("InvalidInstanceType"):
                    memo[itype] = ()  # EC2 does not know it: that does not change
            continue
        except (BotoCoreError, CloudError) as e:
            unknown.update(dict.fromkeys(group, f"DescribeInstanceTypes: {e}"))
            continue
        for itype in group:
            memo[itype] = tuple(found.get(itype, ()))
    known = {t: memo[t] for t in instance_types if memo.get(t)}
    for itype in instance_types:
        if itype not in known and itype not in unknown:
            unknown[itype] = "EC2 does not know this instance type"
    return known, unknown


@defer.inlineCallbacks
def resolve(client: AsyncEc2, instance_types: Sequence[str], ami: Any,
            ami_filters: Sequence[Mapping[str, Any]] | None,
            ami_owners: Sequence[str] | None, *, template_image: str | None = None) -> Any:
    """The Plan of one launch: ``ami`` (an id, or architecture -> id, rendered), else
    ``ami_filters`` / ``ami_owners``, else ``template_image`` (the launch template's
    ImageId; the plan's AMI is then "", RunInstances takes the template's)."""
    known, unknown = yield architectures(client, instance_types)
    if isinstance(ami, Mapping):
        images = Images(
            by_arch=dict(ami),
            missing={a: f"ami has no AMI for {a} (it has {', '.join(sorted(ami))})"
                     for a in ARCHITECTURES if a not in ami})
    elif ami is not None or ami_filters is None:
        images = yield _one_image(client, ami if ami is not None else template_image,
                                  ami is None)
    else:
        images = yield _newest_per_arch(client, known, bool(unknown), ami_filters, ami_owners)
    plan = choose(instance_types, known, images, unknown)
    if ami is None and ami_filters is None and template_image:
        plan = dataclasses.replace(plan, template_image=template_image)
    return plan


@defer.inlineCallbacks
def _one_image(client: AsyncEc2, image: str | None, from_template: bool) -> Any:
    """One AMI: on the types of its architecture, or on any if EC2 does not say it."""
    launched = "" if from_template else image
    if not image or not image.startswith("ami-"):
        # e.g. a template's resolve:ssm:... parameter: only EC2 knows, at launch.
        return Images(any_arch=launched)
    memo = client.memo.setdefault(IMAGE_MEMO, {})
    if image not in memo:
        try:
            found = yield client.image_architectures([image])
        except (ClientError, BotoCoreError, CloudError):
            found = {}
        if found.get(image):
            memo[image] = found[image]  # an image's architecture never changes
    arch = memo.get(image, "")
    if not arch:
        return Images(any_arch=launched)
    where = "the launch template's ImageId" if from_template else "ami"
    return Images(by_arch={arch: launched or ""},
                  missing={a: f"{where} {image} is {arch}" for a in ARCHITECTURES},
                  unknown_type=launched)


@defer.inlineCallbacks
def _newest_per_arch(client: AsyncEc2, known: Mapping[str, tuple[str, ...]], any_unknown: bool,
                     filters: Sequence[Mapping[str, Any]], owners: Sequence[str] | None) -> Any:
    """The newest image matching the filters for each architecture the types run (for a
    type running several, the best first until one is found); without the
    architecture filter for types EC2 said nothing of."""
    by_arch: dict[str, str] = {}
    missing: dict[str, str] = {}
    for archs in known.values():
        for arch in sorted(archs, key=lambda a: PREFERENCE.get(a, 99)):
            if arch in by_arch:
                break
            if arch in missing:
                continue
            try:
                by_arch[arch] = yield client.newest_image(filters, owners, arch)
                break
            except CloudError as e:
                missing[arch] = str(e)
    unknown_type, why = None, ""
    if any_unknown:
        try:
            unknown_type = yield client.newest_image(filters, owners)
        except CloudError as e:
            why = str(e)
    return Images(by_arch=by_arch, missing=missing, unknown_type=unknown_type,
                  unknown_type_reason=why)
