"""Instances lost from under their workers (a spot reclaim, the console, a colleague):
why, recorded once per instance however often it is reported (by the reconciler, by a
lost connection, to every slot of a shared instance)."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer

from buildbot_dockerami.cloud.instances import InstanceStatus
from buildbot_dockerami.fleet.metrics import Metrics
from buildbot_dockerami.fleet.reconcile_plan import LOST_STATES, lost_reason


def record(metrics: Metrics, instance: Any, status: InstanceStatus) -> str:
    """The reason ``instance`` (fleet.launch.LaunchedInstance) is lost; its loss is
    counted the first time only."""
    if not instance.lost:
        instance.lost = True
        metrics.inc("dockerami_instances_lost_total", {"state": status.state})
        if "Spot" in status.reason:  # reclaimed without its notice having been seen
            metrics.inc("dockerami_spot_interruptions_total", {})
    return lost_reason(status)


@defer.inlineCallbacks
def gone(instance: Any) -> Any:
    """The instance's status if EC2 says it is gone or going, else None (one
    DescribeInstances; its failure is raised)."""
    status = (yield instance.client.describe([instance.instance_id])).get(instance.instance_id)
    return status if status is not None and status.state in LOST_STATES else None
