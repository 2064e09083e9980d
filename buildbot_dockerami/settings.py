"""Validation of the worker's EC2 settings. Pure: every check raises SettingError.

The worker turns these into ``config.error`` at ``buildbot checkconfig`` time
(for literal values) or into a failed substantiation (for values that are
only known once rendered for a build).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from buildbot_dockerami.userdata import UserDataError

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

#: IMDSv2 only: the metadata service refuses token-less (v1) requests.
DEFAULT_METADATA_OPTIONS: Mapping[str, Any] = {
    "HttpTokens": "required",
    "HttpEndpoint": "enabled",
    "HttpPutResponseHopLimit": 2,
}


def check_ami_id(value: Any, setting: str = "ami") -> None:
    if not isinstance(value, str) or not _AMI_ID.match(value):
        raise SettingError(
            setting, f"{value!r} is not an AMI id (ami- followed by 8 or 17 hex digits)"
        )


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
    if value.get("HttpTokens", "required") not in ("required", "optional"):
        raise SettingError("metadata_options", "HttpTokens must be 'required' or 'optional'")


def check_block_device_mappings(value: Any) -> None:
    if not isinstance(value, list | tuple) or not all(
        isinstance(m, Mapping) and "DeviceName" in m for m in value
    ):
        raise SettingError(
            "block_device_mappings", "must be a list of dicts, each with a 'DeviceName'"
        )
