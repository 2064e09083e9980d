"""A launch template as the base of every RunInstances (``launch_template=``).

Accounts that mandate launch templates (security groups, EBS encryption, IMDS policy,
tags, managed by another team) keep them; the plugin sends its own parts on top, which
EC2 lets override the template's: user data, tags at launch, ClientToken, market,
instance type and subnet (the capacity fallback's), and the AMI and the other launch
settings when they are given. docs/configuration.md#launch-templates says which.

Before a launch the template's data is read (DescribeLaunchTemplateVersions, kept for
``TTL`` seconds per client and template) and refused, failing the launch with a clear
reason, when it sets what would break the plugin: its own user data, a market, API
termination protection, or network interfaces next to subnet_id / security_group_ids.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.internet import defer

from buildbot_dockerami.cloud.ec2 import (
    DEFAULT_METADATA_OPTIONS,
    AsyncEc2,
    template_name,
)

#: Seconds a template's data is used before it is read again: a new $Latest or
#: $Default version applies from the next launch after that.
TTL = 60.0
#: The memo key (AsyncEc2.memo) of a template's data.
MEMO = "launch-template"
#: Resource types whose tags the plugin sets, and so sends with the template's.
TAGGED = ("instance", "volume")


@defer.inlineCallbacks
def data(client: AsyncEc2, template: Mapping[str, Any], now: float) -> Any:
    """The template version's LaunchTemplateData, read again after TTL seconds."""
    memo = client.memo.setdefault(MEMO, {})
    key = tuple(sorted((k, str(v)) for k, v in template.items()))
    kept = memo.get(key)
    if kept is not None and now - kept[0] < TTL:
        return kept[1]
    found = yield client.launch_template_data(template)
    memo[key] = (now, found)
    return found


def problems(found: Mapping[str, Any], settings: Any, *, has_ami: bool) -> list[str]:
    """Why this template cannot be the base of the worker's launches (``settings``: its
    subnet_id, security_group_ids, idle_action); ``has_ami``: ami or ami_filters given."""
    name = f"launch_template: template {template_name(settings.launch_template)}"
    out = []
    if "UserData" in found:
        out.append(f"{name} sets UserData; the plugin's user data names the image and "
                   "carries the worker's credentials: remove UserData from the template")
    if "InstanceMarketOptions" in found:
        out.append(f"{name} sets InstanceMarketOptions; the plugin's market= chooses spot "
                   "or on-demand: remove them from the template")
    if found.get("DisableApiTermination"):
        out.append(f"{name} sets DisableApiTermination; the plugin terminates its "
                   "instances: remove it from the template")
    if found.get("DisableApiStop") and getattr(settings, "idle_action", "") == "stop":
        out.append(f"{name} sets DisableApiStop, and idle_action='stop' stops instances")
    if found.get("NetworkInterfaces"):
        given = [s for s in ("subnet_id", "security_group_ids") if getattr(settings, s, None)]
        if given:
            out.append(f"{name} sets NetworkInterfaces, which EC2 does not take together "
                       f"with {' and '.join(given)}: give the subnet and security groups "
                       "in one place")
    if not has_ami and not found.get("ImageId"):
        out.append(f"{name} has no ImageId, and neither ami= nor ami_filters= is given")
    return out


def tags(found: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """The template's tags for the resource types the plugin tags too."""
    return {spec["ResourceType"]: {t["Key"]: t["Value"] for t in spec.get("Tags", [])}
            for spec in found.get("TagSpecifications", [])
            if spec.get("ResourceType") in TAGGED}


def metadata_options(found: Mapping[str, Any] | None,
                     configured: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """RunInstances' MetadataOptions: the worker's if given, else none when a template
    sets its own, else the plugin's default (IMDSv2 only)."""
    if configured is not None:
        return configured
    if found is not None and found.get("MetadataOptions"):
        return {}
    return DEFAULT_METADATA_OPTIONS
