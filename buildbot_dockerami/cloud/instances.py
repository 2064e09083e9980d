"""The instance model and its tags: what DescribeInstances says of an instance, and the
tags that name its master, worker and launch from the moment it exists. Pure."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

WORKER_TAG = "buildbot:worker"
MASTER_TAG = "buildbot:master"
#: The launch's ClientToken, so an instance whose RunInstances answer was lost is found.
LAUNCH_TAG = "buildbot:launch"

#: States that count as "terminate confirmed".
GONE_STATES = frozenset({"shutting-down", "terminated"})


@dataclass(frozen=True)
class InstanceStatus:
    """What DescribeInstances said about one instance."""

    instance_id: str
    state: str
    reason: str = ""
    instance_type: str = ""
    availability_zone: str = ""
    worker: str = ""
    master: str = ""
    launch_token: str = ""
    #: Epoch seconds EC2 says the instance was launched.
    launched_at: float = 0.0
    market: str = "on-demand"


def master_id(master_name: str) -> str:
    """A stable, tag-safe id for one master: its host plus a hash of host and basedir.

    buildbot names a master ``hostname:basedir``; the basedir can be long and
    private, so only a short digest of it goes into the tag.
    """
    host = master_name.split(":", 1)[0] or "master"
    digest = hashlib.sha256(master_name.encode()).hexdigest()[:10]
    return f"{host[:200]}-{digest}"


def instance_tags(worker_name: str, master: str, user_tags: Mapping[str, str],
                  launch_token: str = "") -> dict[str, str]:
    tags = dict(user_tags)
    tags.update({"Name": f"buildbot-{worker_name}", WORKER_TAG: worker_name, MASTER_TAG: master})
    if launch_token:
        tags[LAUNCH_TAG] = launch_token
    return tags


def tag_specifications(tags: Mapping[str, str],
                       base: Mapping[str, Mapping[str, str]] | None = None) -> list[dict]:
    """Tags applied at launch, so an instance is never untagged, even for a moment;
    ``base`` (a launch template's tags by resource type) under ours."""
    return [
        {"ResourceType": kind,
         "Tags": [{"Key": k, "Value": v} for k, v in {**(base or {}).get(kind, {}),
                                                        **tags}.items()]}
        for kind in ("instance", "volume")
    ]
