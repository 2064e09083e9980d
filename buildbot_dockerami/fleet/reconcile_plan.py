"""What the reconciler decides: EC2's view of this master's instances against what its
workers track. Pure; reconciler.Reconciler polls EC2 and carries the plan out.

EC2 is the truth and the master's memory a cache: an instance tagged for this master
that no worker tracks (left by a crash, a lost launch answer, a removed worker) is
terminated; an instance a worker tracks that EC2 reports gone (spot reclaim, the
console, a colleague) is reported lost so its builds are retried.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from buildbot_dockerami.cloud.instances import InstanceStatus

#: Untracked instances in these states still cost money and get terminated.
LIVE_STATES = frozenset({"pending", "running", "stopping", "stopped"})
#: A tracked instance in these states can no longer serve its worker.
LOST_STATES = frozenset({"shutting-down", "terminated", "stopping", "stopped"})
#: Default seconds between two passes; the bound for "nothing untracked left running".
DEFAULT_INTERVAL = 30.0
#: Shortest interval accepted: DescribeInstances is rate-limited per account.
MIN_INTERVAL = 5.0


@dataclass
class Plan:
    #: Untracked instances that nobody will ever use: untracked in two passes running.
    terminate: list[InstanceStatus] = field(default_factory=list)
    #: Untracked instances seen for the first time: terminated if the next pass agrees.
    suspects: set[str] = field(default_factory=set)
    #: Tracked instances that EC2 says are gone or going.
    lost: list[InstanceStatus] = field(default_factory=list)


def plan(seen: Mapping[str, InstanceStatus], tracked: Collection[str],
         launching: Collection[str], suspects: Collection[str] = ()) -> Plan:
    """Decide about every instance EC2 reported as tagged for this master.

    ``launching`` holds the ClientTokens of RunInstances calls still in flight: their
    instance may exist before the master has heard of it, and must not be mistaken
    for an orphan. An untracked instance is terminated only when the previous pass
    found it untracked too (``suspects``): one pass can race a worker taking or letting
    go of an instance; two passes an interval apart cannot.
    """
    result = Plan()
    for status in seen.values():
        if status.instance_id in tracked:
            if status.state in LOST_STATES:
                result.lost.append(status)
        elif status.state in LIVE_STATES and not (
            status.launch_token and status.launch_token in launching
        ):
            result.suspects.add(status.instance_id)
            if status.instance_id in suspects:
                result.terminate.append(status)
    return result


def lost_reason(status: InstanceStatus) -> str:
    """``instance i-... terminated: <EC2's state reason>``, for the build and the page."""
    reason = f": {status.reason}" if status.reason else ""
    return f"instance {status.instance_id} {status.state}{reason}"
