"""The boot state of a worker's instance, as the worker asks while it waits for its
connection: still coming, or failed and why (the verdict from boot.py, the reason
completed with the console's last words from console.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.python import log

from buildbot_dockerami.cloud.instances import InstanceStatus
from buildbot_dockerami.fleet import boot, console, metrics
from buildbot_dockerami.fleet.monitor import StateMonitor

#: What ``check`` waits for stands for "the worker connected first".
CONNECTED = object()


@dataclass(frozen=True)
class BootState:
    #: The instance can still become a connected worker (or the answer is not known).
    ok: bool
    reason: str = ""
    #: EC2's view, None when not known (no answer, or the worker connected first).
    status: InstanceStatus | None = None
    #: Failed: the metric's reason (e.g. instance_terminated) and the console, masked.
    failure: str = ""
    console: str | None = None


def first(*waits: defer.Deferred) -> defer.Deferred:
    """The first of several results (or failures); the others run on, unheeded."""
    done: defer.Deferred = defer.Deferred()

    def settle(result: Any) -> None:
        if not done.called:
            done.callback(result)  # a Failure takes the errback path

    for wait in waits:
        wait.addBoth(settle)
    return done


@defer.inlineCallbacks
def check(monitor: StateMonitor, instance: Any, max_age: float, connected: defer.Deferred, *,
          password: str, log_prefix: str) -> Any:
    """The instance's BootState, from the monitor's batched DescribeInstances (at most
    ``max_age`` seconds old), or at once when ``connected`` fires first: the caller
    holds buildbot's start/stop lock while it waits."""
    try:
        status = yield first(monitor.status(instance.instance_id, max_age),
                             connected.addCallback(lambda _: CONNECTED))
    except Exception as e:
        # Not knowing the state only delays the verdict (missing_timeout still holds).
        log.msg(f"{log_prefix}: state of {instance.instance_id} unknown for now: {e}")
        return BootState(True)
    if status is CONNECTED:
        return BootState(True)
    ok, reason = boot.boot_verdict(status, monitor.seconds_since_watch(instance.instance_id))
    if ok:
        return BootState(True, status=status)
    # The boot's last words (e.g. the bootstrap's "cannot pull image") say why.
    output = yield console.output(instance, password, log_prefix)
    failed = metrics.died(status.state if status is not None else None)
    return BootState(False, console.explained(reason, output), status,
                     failure=failed, console=output)
