"""Fleet decisions that need no network: tags, boot verdicts, retry schedules.

Kept apart from fleet.py (which does the I/O) so they can be tested directly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

WORKER_TAG = "buildbot:worker"
MASTER_TAG = "buildbot:master"
#: The launch's ClientToken, so an instance whose RunInstances answer was lost is found.
LAUNCH_TAG = "buildbot:launch"

#: States from which an instance can still become a connected worker.
BOOTING_STATES = frozenset({"pending", "running"})
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


def tag_specifications(tags: Mapping[str, str]) -> list[dict]:
    """Tags applied at launch, so an instance is never untagged, even for a moment."""
    tag_list = [{"Key": k, "Value": v} for k, v in tags.items()]
    return [
        {"ResourceType": "instance", "Tags": tag_list},
        {"ResourceType": "volume", "Tags": tag_list},
    ]


def boot_verdict(
    status: InstanceStatus | None, seconds_since_launch: float, not_found_grace: float = 60.0
) -> tuple[bool, str]:
    """Whether a booting instance can still become a worker, and if not, why.

    EC2 is eventually consistent: a fresh instance may be missing from
    DescribeInstances for a little while, so "not found" only fails after a grace.
    """
    if status is None:
        if seconds_since_launch < not_found_grace:
            return True, ""
        return False, f"instance not found {seconds_since_launch:.0f}s after launch"
    if status.state in BOOTING_STATES:
        return True, ""
    reason = f" ({status.reason})" if status.reason else ""
    return False, f"instance {status.instance_id} is {status.state}{reason}"


def retry_delays(
    first: float = 1.0, factor: float = 2.0, cap: float = 30.0, attempts: int = 6
) -> Iterator[float]:
    """Delays between attempts of a call that must eventually succeed (terminate)."""
    delay = first
    for _ in range(attempts - 1):
        yield delay
        delay = min(delay * factor, cap)


def last_console_words(output: str) -> str:
    """The line of a console that best explains a failed boot: the last FATAL line of
    the bootstrap if there is one, else the last non-empty line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    fatal = [line for line in lines if "FATAL" in line]
    return (fatal or lines or [""])[-1][:500]


def may_launch(instances_in_use: int, cap: int | None) -> bool:
    """Whether a pool may start one more instance."""
    return cap is None or instances_in_use < cap


def warm_shortfall(idle: int, starting: int, in_use: int, min_warm: int,
                   cap: int | None) -> int:
    """How many instances to pre-warm so that ``min_warm`` are idle and ready, without
    passing the cap. Instances already starting count as on their way."""
    wanted = max(0, min_warm - idle - starting)
    room = wanted if cap is None else max(0, cap - in_use)
    return min(wanted, room)
