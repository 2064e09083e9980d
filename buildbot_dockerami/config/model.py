"""Every setting, declared once.

``WorkerSettings`` lists the keywords ``DockerAMILatentWorker`` takes besides buildbot's
own; ``FleetWide`` those that concern the whole fleet of a master (set once, with
``FleetSettings`` in ``c['services']``). The worker's checkConfig and reconfigService,
the unknown-keyword suggestions and checkconfig's problems all derive from these
declarations, so adding a setting is one line here and its checks in checks.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from buildbot_dockerami.cloud.ec2 import DEFAULT_TIMEOUT
from buildbot_dockerami.fleet.image_refresh import DEFAULT_INTERVAL as DEFAULT_IMAGE_INTERVAL
from buildbot_dockerami.fleet.reconcile_plan import DEFAULT_INTERVAL
from buildbot_dockerami.fleet.refresh import DEFAULT_INTERVAL as DEFAULT_REFRESH_INTERVAL
from buildbot_dockerami.fleet.stopped_pool import DEFAULT_MAX_STOPPED, DEFAULT_MAX_STOPPED_AGE

#: Settings whose values are secrets: checked, handed on, never kept as attributes.
SECRET = {"secret": True}


@dataclass(frozen=True)
class FleetWide:
    """Settings of a master's whole fleet; their defaults apply until set."""

    #: Seconds between two reconciler passes (the bound for "nothing untracked left").
    reconcile_interval: Any = DEFAULT_INTERVAL
    #: Seconds an EC2 answer may take before the call is retried.
    ec2_timeout: Any = DEFAULT_TIMEOUT
    #: Stopped instances kept for reuse, and for how long (idle_action='stop').
    max_stopped: Any = DEFAULT_MAX_STOPPED
    max_stopped_age: Any = DEFAULT_MAX_STOPPED_AGE
    #: Launch idle workers as soon as build requests are queued (one master only).
    launch_on_request: Any = False
    #: On-demand USD per hour by instance type (and ``stopped``), over the default table.
    prices: Any = None
    #: Seconds between two DescribeImages for the same ami_filters (fleet/refresh.py).
    ami_refresh_interval: Any = DEFAULT_REFRESH_INTERVAL
    #: Seconds between two registry checks of the same image tag (fleet/image_refresh.py).
    image_refresh_interval: Any = DEFAULT_IMAGE_INTERVAL
    #: Registry host -> the host (or hosts) of its token service that may be sent the
    #: registry credentials, beyond the built-in ones (cloud/image_digests.py).
    registry_token_services: Any = None


FLEET_WIDE = tuple(f.name for f in dataclasses.fields(FleetWide))


@dataclass(frozen=True)
class WorkerSettings:
    """What a DockerAMILatentWorker is configured with, besides buildbot's own settings
    (``build_wait_timeout``, ``missing_timeout``, ``max_builds``, ...)."""

    image: Any = None
    ami: Any = None
    ami_filters: Any = None
    ami_owners: Any = None
    instance_type: Any = None
    region: Any = None
    master_address: Any = None
    setup_repo: Any = None
    setup_branch: Any = None
    subnet_id: Any = None
    security_group_ids: Any = None
    keypair_name: Any = None
    instance_profile: Any = None
    tags: Any = None
    block_device_mappings: Any = None
    metadata_options: Any = None
    #: RunInstances' LaunchTemplate, the base of every launch (fleet/templates.py).
    launch_template: Any = None
    endpoint_url: Any = None
    session: Any = None
    identifier: Any = field(default=None, metadata=SECRET)
    secret_identifier: Any = field(default=None, metadata=SECRET)
    isolation: Any = "none"
    instance_group: Any = None
    #: Memory, pids and CPU limits of each container the bootstrap runs (None: defaults).
    container_limits: Any = None
    pool: Any = None
    #: The pool's warm minimum: a number or periods (fleet/schedule.py); worker_pool's.
    min_warm: Any = None
    market: Any = "on-demand"
    idle_action: Any = "terminate"
    master_tls_fingerprint: Any = None
    #: Where the image's registry credentials live ('ssm:...' or 'secretsmanager:...'),
    #: fetched at boot with the instance role (protocol/registry.py); never the secret.
    registry_credentials: Any = None
    #: Named caches kept on the instance, one Docker volume per builder (protocol/caches.py).
    caches: Any = None
    #: Free space the bootstrap keeps on the instance's disk, pruning, else retiring.
    disk_floor: Any = None
    #: Builds an instance takes before it drains (no new build, ends after its running
    #: ones; fleet/retirement.py); slots of a shared instance count together. None: no cap.
    max_builds_per_instance: Any = None
    #: Seconds after its launch an instance drains (fleet/retirement.py). None: no cap.
    max_instance_age: Any = None
    # Fleet-wide (FleetWide): still taken per worker for one release, with a warning.
    reconcile_interval: Any = FleetWide.reconcile_interval
    ec2_timeout: Any = FleetWide.ec2_timeout
    max_stopped: Any = FleetWide.max_stopped
    max_stopped_age: Any = FleetWide.max_stopped_age
    launch_on_request: Any = FleetWide.launch_on_request
    #: The keywords the operator gave (the rest are defaults).
    given: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    @classmethod
    def split(cls, kwargs: Mapping[str, Any]) -> tuple[WorkerSettings, dict[str, Any]]:
        """These settings out of a worker's keywords, and the others (buildbot's own,
        or unknown ones) for buildbot."""
        ours = {k: v for k, v in kwargs.items() if k in WORKER_SETTINGS}
        rest = {k: v for k, v in kwargs.items() if k not in WORKER_SETTINGS}
        return cls(**ours, given=frozenset(ours)), rest

    def plain(self) -> dict[str, Any]:
        """Every setting but the secrets, by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name in WORKER_SETTINGS and not f.metadata.get("secret")}

    def moved_to_fleet(self) -> list[str]:
        """The fleet-wide settings this worker was given itself."""
        return [name for name in FLEET_WIDE if name in self.given]


WORKER_SETTINGS = tuple(f.name for f in dataclasses.fields(WorkerSettings) if f.name != "given")
