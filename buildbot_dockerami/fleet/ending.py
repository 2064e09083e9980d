"""How a worker's own instance ends: stopped for reuse (idle_action='stop') when that
is allowed and EC2 agrees, else terminated; either way the pool hears of it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.python import log

from buildbot_dockerami.fleet import retirement

if TYPE_CHECKING:
    from buildbot_dockerami.fleet.launch import LaunchedInstance, Launcher
    from buildbot_dockerami.fleet.service import Fleet


def stops_for_reuse(fleet: Fleet, *, idle_action: str, connected: bool,
                    cancelled: bool) -> bool:
    """For an instance the idle timeout ends: only with idle_action='stop', whose worker
    connected, and only while the master runs and keeps stopped instances at all."""
    return (idle_action == "stop" and connected and not cancelled
            and not fleet.stopping and fleet.stopped.max_count > 0)


@defer.inlineCallbacks
def end(fleet: Fleet, instance: LaunchedInstance, launcher: Launcher, pool: str | None, *,
        key: str, reuse: bool, log_prefix: str) -> Any:
    """End the instance of the worker named ``key`` (its instance key: it has no slot
    group) of ``pool``."""
    # A retired instance (its disk stays too full) is never kept.
    if reuse and not retirement.retired(instance) and (yield launcher.stop_for_reuse(instance)):
        fleet.stopped_for_reuse(pool, key)
        return
    state = yield fleet.terminate(instance.client, instance.instance_id)
    log.msg(f"{log_prefix}: instance {instance.instance_id} is {state}")
    fleet.released(pool, key=key)
