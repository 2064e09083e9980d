"""Lifecycle decisions moved out of the worker into the fleet, on a fake clock: how
long a pre-warmed instance waits, when an idle instance is stopped rather than
terminated, and a lost instance counted once however often it is reported."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from twisted.internet import task

from buildbot_dockerami.cloud.instances import InstanceStatus
from buildbot_dockerami.fleet import ending, lost
from buildbot_dockerami.fleet.metrics import Metrics
from buildbot_dockerami.fleet.prewarm import PrewarmTimer


def test_a_prewarmed_instance_waits_its_idle_timeout_and_longer_while_kept_warm() -> None:
    clock, expired, keep = task.Clock(), [], [True]
    timer = PrewarmTimer(clock, lambda: 60, lambda: keep[0], lambda: expired.append(1))
    timer.start()
    clock.advance(59)
    assert not expired
    clock.advance(1)  # the pool still needs it: another wait
    assert not expired
    keep[0] = False
    clock.advance(60)
    assert expired == [1]


def test_a_cancelled_or_never_prewarm_timer_never_expires() -> None:
    clock, expired = task.Clock(), []
    timer = PrewarmTimer(clock, lambda: 5, lambda: False, lambda: expired.append(1))
    timer.start()
    timer.cancel()
    never = PrewarmTimer(clock, lambda: -1, lambda: False, lambda: expired.append(2))
    never.start()
    clock.advance(3600)
    assert expired == []


@pytest.mark.parametrize(("case", "expected"), [
    (("stop", True, False, False, 10), True),
    (("terminate", True, False, False, 10), False),
    (("stop", False, False, False, 10), False),  # never connected: nothing worth keeping
    (("stop", True, True, False, 10), False),  # the worker is being removed
    (("stop", True, False, True, 10), False),  # the master stops
    (("stop", True, False, False, 0), False),  # max_stopped=0
])
def test_an_idle_instance_is_stopped_for_reuse_only_when_everything_allows(
        case, expected) -> None:
    idle_action, connected, cancelled, stopping, max_count = case
    fleet = SimpleNamespace(stopping=stopping, stopped=SimpleNamespace(max_count=max_count))
    assert ending.stops_for_reuse(fleet, idle_action=idle_action, connected=connected,
                                  cancelled=cancelled) is expected


def test_a_lost_instance_is_counted_once_however_often_it_is_reported() -> None:
    metrics, instance = Metrics(), SimpleNamespace(lost=False)
    status = InstanceStatus("i-1", "terminated", "Server.SpotInstanceTermination: Spot")
    reasons = {lost.record(metrics, instance, status) for _ in range(3)}
    assert reasons == {"instance i-1 terminated: Server.SpotInstanceTermination: Spot"}
    assert metrics.counter("dockerami_instances_lost_total", {"state": "terminated"}) == 1
    assert metrics.counter("dockerami_spot_interruptions_total") == 1
