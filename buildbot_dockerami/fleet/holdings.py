"""What one master holds: its workers, their slot groups' shared instances, launches in
flight and stopped instances kept for reuse.

The fleet service owns one ``Holdings``; the reconciler and the shared instances are
given it (with a clock, the terminator and the metrics), not the fleet, so each of them
can be made and tested alone and none of them calls back into the service.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.python import log

from buildbot_dockerami.fleet.stopped_pool import StoppedPool

if TYPE_CHECKING:
    from buildbot_dockerami.cloud.ec2 import AsyncEc2


class Holdings:
    """The instances this master's workers own, and where they are."""

    def __init__(self, stopped: StoppedPool | None = None) -> None:
        #: This master's DockerAMILatentWorkers (fleet/members.py: FleetWorker).
        self.workers: weakref.WeakSet = weakref.WeakSet()
        #: Slot groups by name (shared_instance.InstanceGroup), one instance each.
        self.groups: dict[str, Any] = {}
        #: ClientToken -> owner of every RunInstances call still in flight.
        self.launching: dict[str, str] = {}
        #: Idle instances stopped for reuse (idle_action='stop').
        self.stopped = stopped if stopped is not None else StoppedPool()

    def tracked(self) -> dict[str, list[Any]]:
        """Instance id -> the workers (or slot groups, or the stopped pool) that own it."""
        owners: dict[str, list[Any]] = {}
        for worker in list(self.workers):
            if worker.instance is not None:
                owners.setdefault(worker.instance.instance_id, []).append(worker)
        for group in self.groups.values():
            if group.instance is not None:
                owners.setdefault(group.instance.instance_id, []).append(group)
        for instance_id in self.stopped.by_instance():
            owners.setdefault(instance_id, []).append(self.stopped)
        return owners

    @defer.inlineCallbacks
    def clients(self, skipping: str | None = None) -> Any:
        """The distinct EC2 clients this master's workers use (one per region, endpoint
        and credentials), in the workers' order. A worker whose client cannot be built
        fails the call, unless ``skipping`` names the caller: then it is logged, skipped."""
        found: list[AsyncEc2] = []
        for worker in list(self.workers):
            try:
                client = yield worker.ec2_client()
            except Exception as e:
                if skipping is None:
                    raise
                log.msg(f"dockerami: {skipping}: no EC2 client for {worker.name}: {e}")
                continue
            if client not in found:
                found.append(client)
        return found
