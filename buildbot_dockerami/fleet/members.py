"""What the fleet knows of the workers it serves: the one interface it calls back
through. ``DockerAMILatentWorker`` provides it; the fleet never imports buildbot's
worker or process modules, so everything it needs of a worker is listed here."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet import defer

if TYPE_CHECKING:
    from buildbot_dockerami.fleet.launch import LaunchedInstance
    from buildbot_dockerami.fleet.shared_instance import InstanceGroup


class FleetWorker(Protocol):
    """A worker registered with the fleet (``Fleet.workers``)."""

    name: str
    #: The fleet it is registered with (fleet.service.Fleet).
    fleet: Any
    #: Its worker_pool's name, or None.
    pool: str | None
    #: The shared instance of its slot group (isolation='container'), or None.
    group: InstanceGroup | None
    #: The instance it runs on, or None.
    instance: LaunchedInstance | None
    #: Its buildbot connection, None while not connected.
    conn: Any
    #: Its settings (config.model.WorkerSettings).
    settings: Any
    #: Why its last launch or boot failed, for the Fleet page.
    last_failure: str

    @property
    def busy(self) -> bool:
        """A build runs on it."""

    @property
    def active(self) -> bool:
        """Building, or its instance is on its way, up, or being ended: it counts
        against its pool's cap."""

    @property
    def stopping(self) -> bool:
        """It is being removed, or the master stops: no new instance for it."""

    def prewarm(self) -> bool:
        """Boot an instance now, before any build asks; False if it cannot."""

    def instance_lost(self, status: Any) -> None:
        """EC2 says its connected instance is gone (cloud.instances.InstanceStatus)."""

    def ec2_client(self) -> defer.Deferred:
        """Its (shared) EC2 client (cloud.ec2.AsyncEc2)."""
