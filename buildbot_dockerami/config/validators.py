"""Validation of the worker's EC2 settings. Pure: every check raises SettingError.

The worker turns these into ``config.error`` at ``buildbot checkconfig`` time
(for literal values) or into a failed substantiation (for values that are
only known once rendered for a build).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import boto3.session

from buildbot_dockerami.cloud import ec2
from buildbot_dockerami.fleet.architecture import ARCHITECTURES
from buildbot_dockerami.protocol.userdata import UserDataError

SettingError = UserDataError

_AMI_ID = re.compile(r"^ami-(?:[0-9a-f]{8}|[0-9a-f]{17})$")
_SUBNET_ID = re.compile(r"^subnet-(?:[0-9a-f]{8}|[0-9a-f]{17})$")
_SG_ID = re.compile(r"^sg-(?:[0-9a-f]{8}|[0-9a-f]{17})$")
_INSTANCE_TYPE = re.compile(r"^[a-z][a-z0-9-]*\.[a-z0-9-]+$")

#: Tags the plugin sets itself; a user tag may not change them.
RESERVED_TAGS = ("Name", "buildbot:worker", "buildbot:master", "buildbot:launch")

METADATA_OPTION_KEYS = {
    "HttpTokens",
    "HttpPutResponseHopLimit",
    "HttpEndpoint",
    "HttpProtocolIpv6",
    "InstanceMetadataTags",
}

#: IMDSv2 only (declared with the launch, which applies it when metadata_options is unset).
DEFAULT_METADATA_OPTIONS = ec2.DEFAULT_METADATA_OPTIONS


def check_ami_id(value: Any, setting: str = "ami") -> None:
    if not isinstance(value, str) or not _AMI_ID.match(value):
        raise SettingError(
            setting, f"{value!r} is not an AMI id (ami- followed by 8 or 17 hex digits)"
        )


def check_ami(value: Any, skip: Callable[[Any], bool] = lambda _: False) -> None:
    """An AMI id, or one per architecture ({'arm64': 'ami-...', 'x86_64': 'ami-...'});
    ids for which ``skip`` is true (renderables) are checked once rendered."""
    if not isinstance(value, Mapping):
        check_ami_id(value)
        return
    if not value:
        raise SettingError("ami", "an AMI per architecture names at least one, e.g. "
                           "{'arm64': 'ami-...', 'x86_64': 'ami-...'}")
    for arch, one in value.items():
        if arch not in ARCHITECTURES:
            raise SettingError("ami", f"{short(arch)} is not an EC2 architecture "
                               f"({', '.join(ARCHITECTURES)})")
        if not skip(one):
            check_ami_id(one)


_TEMPLATE_ID = re.compile(r"^lt-(?:[0-9a-f]{8}|[0-9a-f]{17})$")
_TEMPLATE_NAME = re.compile(r"^[A-Za-z0-9().\-/_]{3,128}$")
TEMPLATE_VERSIONS = ("$Latest", "$Default")


def check_launch_template(value: Any) -> None:
    """RunInstances' LaunchTemplate: exactly one of LaunchTemplateName and
    LaunchTemplateId, and optionally a Version (a number, '$Latest' or '$Default')."""
    example = "{'LaunchTemplateName': 'ci-workers', 'Version': '$Latest'}"
    if not isinstance(value, Mapping):
        raise SettingError("launch_template", f"must be a dict like {example}, "
                           f"not {_type_name(value)}")
    allowed = (*ec2.TEMPLATE_KEYS, "Version")
    unknown = [k for k in value if k not in allowed]
    if unknown:
        raise SettingError("launch_template", f"unknown keys {sorted(map(str, unknown))}; "
                           f"allowed: {', '.join(allowed)}")
    named = [k for k in ec2.TEMPLATE_KEYS if k in value]
    if len(named) != 1:
        raise SettingError("launch_template", "give exactly one of LaunchTemplateName and "
                           f"LaunchTemplateId, e.g. {example}")
    ref = value[named[0]]
    pattern = _TEMPLATE_ID if named[0] == "LaunchTemplateId" else _TEMPLATE_NAME
    if not isinstance(ref, str) or not pattern.match(ref):
        wanted = ("lt- followed by 8 or 17 hex digits" if named[0] == "LaunchTemplateId"
                  else "3-128 letters, digits and ( ) . - / _")
        raise SettingError("launch_template", f"{named[0]} {short(ref)} is not a launch "
                           f"template {'id' if 'Id' in named[0] else 'name'} ({wanted})")
    if "Version" in value:
        version = value["Version"]
        number = (version if isinstance(version, int) and not isinstance(version, bool)
                  else int(version) if isinstance(version, str) and version.isdigit() else 0)
        if version not in TEMPLATE_VERSIONS and number < 1:
            raise SettingError("launch_template", f"Version must be a version number "
                               f"(1, 2, ...), '$Latest' or '$Default', not {short(version)}")


def _one_or_list(value: Any) -> list[Any]:
    """Settings that take a value or, for capacity fallback, a non-empty list of them."""
    if isinstance(value, list | tuple):
        return list(value) or [None]
    return [value]


def check_instance_type(value: Any, setting: str = "instance_type") -> None:
    for one in _one_or_list(value):
        if not isinstance(one, str) or not _INSTANCE_TYPE.match(one):
            raise SettingError(
                setting, f"{one!r} is not an EC2 instance type such as 't3.large' "
                "(or a non-empty list of them)")


def check_subnet_id(value: Any) -> None:
    for one in _one_or_list(value):
        if not isinstance(one, str) or not _SUBNET_ID.match(one):
            raise SettingError(
                "subnet_id", f"{one!r} is not a subnet id (subnet-...) or a non-empty list of them")


def check_security_group_ids(value: Any) -> None:
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise SettingError("security_group_ids", "must be a list of sg-... ids")
    for sg in value:
        if not isinstance(sg, str) or not _SG_ID.match(sg):
            raise SettingError("security_group_ids", f"{sg!r} is not a security group id")


def check_tags(value: Any) -> None:
    """EC2's tag rules, checked here so a launch cannot fail on them later."""
    if not isinstance(value, Mapping):
        raise SettingError("tags", "must be a dict of tag name to value")
    for key, tag_value in value.items():
        if not isinstance(key, str) or not 1 <= len(key) <= 128:
            raise SettingError("tags", f"tag key {key!r} must be a string of 1-128 characters")
        if key.lower().startswith("aws:"):
            raise SettingError("tags", f"tag key {key!r}: the aws: prefix is reserved by AWS")
        if key in RESERVED_TAGS:
            raise SettingError("tags", f"tag key {key!r} is set by the plugin itself")
        if not isinstance(tag_value, str) or len(tag_value) > 256:
            raise SettingError(
                "tags", f"value of tag {key!r} must be a string of at most 256 characters"
            )
    if len(value) + len(RESERVED_TAGS) > 50:
        raise SettingError("tags", "EC2 allows at most 50 tags per resource")


def check_ami_filters(filters: Any, owners: Any) -> None:
    if not isinstance(filters, list | tuple) or not filters:
        raise SettingError(
            "ami_filters",
            "must be a non-empty list like [{'Name': 'name', 'Values': ['dockerami-base-*']}]",
        )
    for item in filters:
        if (
            not isinstance(item, Mapping)
            or set(item) != {"Name", "Values"}
            or not isinstance(item["Values"], list | tuple)
        ):
            raise SettingError(
                "ami_filters", f"{item!r} must be a dict with exactly 'Name' and 'Values' (a list)"
            )
    if owners is not None and (
        isinstance(owners, str) or not all(isinstance(o, str) for o in owners)
    ):
        raise SettingError("ami_owners", "must be a list of account ids or aliases")


def check_metadata_options(value: Any) -> None:
    if not isinstance(value, Mapping):
        raise SettingError("metadata_options", "must be a dict of EC2 MetadataOptions")
    unknown = set(value) - METADATA_OPTION_KEYS
    if unknown:
        raise SettingError(
            "metadata_options",
            f"unknown keys {sorted(unknown)}; allowed: {sorted(METADATA_OPTION_KEYS)}",
        )
    for key, choices in _METADATA_CHOICES.items():
        if key in value and value[key] not in choices:
            raise SettingError("metadata_options", f"{key} must be one of {', '.join(choices)}, "
                               f"not {short(value[key])}")
    hops = value.get("HttpPutResponseHopLimit", HOP_LIMIT_RANGE[0])
    low, high = HOP_LIMIT_RANGE
    if not isinstance(hops, int) or isinstance(hops, bool) or not low <= hops <= high:
        raise SettingError("metadata_options", f"HttpPutResponseHopLimit must be a whole "
                           f"number {low}-{high}, not {short(hops)}")


def check_block_device_mappings(value: Any) -> None:
    if not isinstance(value, list | tuple) or not all(
        isinstance(m, Mapping) and "DeviceName" in m for m in value
    ):
        raise SettingError(
            "block_device_mappings", "must be a list of dicts, each with a 'DeviceName'"
        )


# -- types and ranges of the remaining settings ---------------------------------------

_REGION = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?$")
_PROFILE_NAME = re.compile(r"^[\w+=,.@-]{1,128}$")
_PROFILE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:instance-profile/[\w+=,.@/-]{1,512}$")

#: Values EC2 accepts for the string-valued MetadataOptions.
_METADATA_CHOICES: Mapping[str, tuple[str, ...]] = {
    "HttpTokens": ("required", "optional"),
    "HttpEndpoint": ("enabled", "disabled"),
    "HttpProtocolIpv6": ("enabled", "disabled"),
    "InstanceMetadataTags": ("enabled", "disabled"),
}
#: EC2's range for HttpPutResponseHopLimit.
HOP_LIMIT_RANGE = (1, 64)

#: Below this, check_instance_interval would poll EC2 many times a second per booting
#: worker (the checks share one DescribeInstances, but the timers do not).
MIN_CHECK_INSTANCE_INTERVAL = 1.0


def short(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters: enough to recognise, never a dump."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _type_name(value: Any) -> str:
    return type(value).__name__


def _is_number(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


def check_region(value: Any) -> None:
    if not isinstance(value, str):
        raise SettingError("region",
                           f"must be a string such as 'us-east-1', not {_type_name(value)}")
    if not _REGION.match(value):
        raise SettingError("region", f"{short(value)} is not a region name such as 'us-east-1'")


def check_keypair_name(value: Any) -> None:
    if not isinstance(value, str):
        raise SettingError("keypair_name", f"must be a string, not {_type_name(value)}")
    if not 1 <= len(value) <= 255 or not value.isascii() or not value.isprintable():
        raise SettingError("keypair_name", "must be 1-255 printable ASCII characters")


def check_instance_profile(value: Any) -> None:
    if not isinstance(value, str):
        raise SettingError("instance_profile",
                           f"must be a string (a name or an ARN), not {_type_name(value)}")
    pattern = _PROFILE_ARN if value.startswith("arn:") else _PROFILE_NAME
    if not pattern.match(value):
        raise SettingError("instance_profile", f"{short(value)} is not an instance profile "
                           "name or arn:aws:iam::<account>:instance-profile/<name>")


def check_endpoint_url(value: Any) -> None:
    if not isinstance(value, str):
        raise SettingError("endpoint_url", f"must be a URL string, not {_type_name(value)}")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as e:
        raise SettingError("endpoint_url", f"{short(value)} is not a URL: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SettingError("endpoint_url", f"{short(value)} must be an http(s)://host[:port] URL")


def check_session(value: Any) -> None:
    if not isinstance(value, boto3.session.Session):
        raise SettingError("session", f"must be a boto3.session.Session, not {_type_name(value)}")


def check_seconds(setting: str, value: Any, *, minimum: float, allow_never: bool = False) -> None:
    """A number of seconds >= ``minimum`` (or -1, "never", where buildbot allows it)."""
    if _is_number(value) and (value >= minimum or (allow_never and value == -1)):
        return
    wanted = f"a number of seconds >= {minimum:g}" + (" (or -1: never)" if allow_never else "")
    shown = _type_name(value) if not _is_number(value) else short(value)
    raise SettingError(setting, f"must be {wanted}, not {shown}")


def check_max_builds(value: Any) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        shown = short(value) if _is_number(value) else _type_name(value)
        raise SettingError("max_builds", f"must be None (no limit) or a whole number >= 1, "
                           f"not {shown}")


def check_mapping(setting: str, value: Any) -> None:
    if not isinstance(value, Mapping):
        raise SettingError(setting, f"must be a dict, not {_type_name(value)}")


#: arn:<partition>:iam::<account>:role/[<path>/]<name> (STS's RoleArn, 20-2048 characters).
_ROLE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/(?:[\w+=,.@-]+/)*[\w+=,.@-]{1,64}$",
                       re.ASCII)


def check_role_arn(value: Any, setting: str = "role_arn") -> None:
    if not isinstance(value, str):
        raise SettingError(setting, f"must be a string (an IAM role ARN), not {_type_name(value)}")
    if len(value) > 2048 or not _ROLE_ARN.match(value):
        raise SettingError(setting, f"{short(value)} is not an IAM role ARN "
                           "(arn:aws:iam::<12-digit account>:role/<name>)")
