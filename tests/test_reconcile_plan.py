"""The reconciler's decisions, without a network."""

from __future__ import annotations

from buildbot_dockerami.cloud.instances import InstanceStatus
from buildbot_dockerami.fleet import reconcile_plan


def ids(statuses: list[InstanceStatus]) -> list[str]:
    return sorted(s.instance_id for s in statuses)


def test_untracked_live_instances_are_terminated_tracked_ones_kept():
    seen = {
        "i-tracked": InstanceStatus("i-tracked", "running"),
        "i-orphan": InstanceStatus("i-orphan", "running"),
        "i-orphan-booting": InstanceStatus("i-orphan-booting", "pending"),
        "i-orphan-stopped": InstanceStatus("i-orphan-stopped", "stopped"),
        "i-done": InstanceStatus("i-done", "terminated"),
        "i-going": InstanceStatus("i-going", "shutting-down"),
    }
    first = reconcile_plan.plan(seen, {"i-tracked"}, set())
    assert first.terminate == [], "one pass is not enough to call an instance untracked"
    assert first.suspects == {"i-orphan", "i-orphan-booting", "i-orphan-stopped"}
    # Meanwhile a worker took i-orphan-booting (a launch answered late, say).
    second = reconcile_plan.plan(seen, {"i-tracked", "i-orphan-booting"}, set(), first.suspects)
    assert ids(second.terminate) == ["i-orphan", "i-orphan-stopped"]
    assert second.lost == []


def test_an_instance_whose_launch_is_in_flight_is_not_an_orphan():
    seen = {
        "i-new": InstanceStatus("i-new", "pending", launch_token="tok-1"),
        "i-old": InstanceStatus("i-old", "running", launch_token="tok-0"),
    }
    plan = reconcile_plan.plan(seen, set(), {"tok-1"}, {"i-new", "i-old"})
    assert ids(plan.terminate) == ["i-old"]


def test_tracked_instances_that_ec2_reports_gone_are_lost():
    seen = {
        "i-a": InstanceStatus("i-a", "terminated", "Server.SpotInstanceTermination"),
        "i-b": InstanceStatus("i-b", "stopping"),
        "i-c": InstanceStatus("i-c", "running"),
    }
    plan = reconcile_plan.plan(seen, {"i-a", "i-b", "i-c"}, set())
    assert ids(plan.lost) == ["i-a", "i-b"]
    assert plan.terminate == []
    assert (reconcile_plan.lost_reason(seen["i-a"])
            == "instance i-a terminated: Server.SpotInstanceTermination")
    assert reconcile_plan.lost_reason(seen["i-b"]) == "instance i-b stopping"
