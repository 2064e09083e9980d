"""The worker's launch glue: the values a build renders (buildbot's compatible-build
check compares them), and one launch of this worker's instance, or of its slot group's
shared instance, composed from the fleet's parts (fleet/launch.py: the slots' user data,
the launch key, the spec; fleet/architecture.py and templates.py: the plan; the Launcher
with its capacity fallback). Failures are counted and turned into buildbot's two kinds:
a launch that can never work fails the build once, another is retried.

A mixin of DockerAMILatentWorker (worker/latent.py).
"""

from __future__ import annotations

import copy
import re
from typing import Any

from buildbot.interfaces import LatentWorkerCannotSubstantiate, LatentWorkerFailedToSubstantiate
from buildbot.process.properties import Properties
from twisted.internet import defer

from buildbot_dockerami.cloud import address
from buildbot_dockerami.config.checks import rendered_problems
from buildbot_dockerami.fleet import fallback, metrics, pools
from buildbot_dockerami.fleet.launch import (
    Launcher,
    LaunchFailed,
    LaunchRefused,
    Slot,
    launch_key,
    launch_spec,
    plan_launch,
    slot_user_data,
)
from buildbot_dockerami.fleet.shared_instance import InstanceGroup
from buildbot_dockerami.protocol import caches
from buildbot_dockerami.protocol.userdata import UserDataError


def pb_port(port_setting: Any) -> int | None:
    """The TCP port from buildbot's ``c['protocols']['pb']['port']`` (int or strport)."""
    if isinstance(port_setting, int):
        return port_setting
    if isinstance(port_setting, str):
        match = re.search(r"(?:^|:)(?:port=)?(\d+)(?::|$)", port_setting)
        if match:
            return int(match.group(1))
    return None


def default_master_address(protocols: dict[str, Any]) -> str | None:
    """This host (its EC2 private IPv4 or FQDN, see cloud/address.py) and the master's PB port:
    where instances connect by default."""
    port = pb_port(protocols.get("pb", {}).get("port"))
    return None if port is None else f"{address.default_host()}:{port}"


class Launching:
    """Launching this worker's instance (start_instance's work)."""

    #: The container_limits setting (protocol/limits.py), for every slot it launches.
    container_limits: Any = None
    #: The registry_credentials setting (protocol/registry.py): where, never what.
    registry_credentials: str | None = None
    #: The caches and disk_floor settings (protocol/caches.py).
    caches: Any = None
    disk_floor: Any = None

    def renderWorkerProps(self, build: Any) -> defer.Deferred:
        """The per-build values; a build whose values differ from the running
        instance's is not compatible with it (CompatibleLatentWorkerMixin)."""
        renderer = build if build is not None else Properties()
        return renderer.render(
            {
                "image": self.image,
                "instance_type": self.instance_type,
                "ami": self.ami,
                "setup_repo": self.setup_repo,
                "setup_branch": self.setup_branch,
            }
        )

    def _connect_address(self) -> str:
        """Where this worker's instances connect: master_address, or the default."""
        address = self.master_address or default_master_address(self.master.config.protocols)
        if address is None:
            raise LatentWorkerFailedToSubstantiate(
                self.name,
                "master_address is not set and this master has no PB port "
                "(c['protocols']['pb']['port'])",
            )
        return address

    def ec2_client(self) -> defer.Deferred:
        """The (shared) EC2 client for this worker's region and endpoint."""
        return self.fleet.client(self.region, self.endpoint_url, self.session,
                                 self.fleet.setting(self.settings, "ec2_timeout"),
                                 credentials=self.credentials)

    @defer.inlineCallbacks
    def _launch(self, build: Any, group: InstanceGroup | None = None) -> Any:
        """RunInstances for this worker, or for every slot of its group."""
        self._launched_for_request = True  # its connection measures the pool's provisioning
        values = yield self.renderWorkerPropsOnStart(build)
        problems = rendered_problems(values)
        if problems:
            # A value that will never work fails the build once, instead of a retry loop.
            self._count_failure(metrics.INVALID_SETTING, "; ".join(problems))
            raise LatentWorkerCannotSubstantiate(self.name, "; ".join(problems))
        client = yield self.ec2_client()
        try:  # each instance type's AMI, and the launch template read and checked
            plan, template = yield plan_launch(client, values, self,
                                               self.master.reactor.seconds())
        except LaunchFailed as e:
            raise self._launch_failed(e) from e
        members = [group.members[n] for n in sorted(group.members)] if group else [self]
        slots = []
        for member in members:
            password = yield member.renew_password(group is not None)
            slots.append(Slot(member.name, password,
                              member.one_time.secret if member.one_time else None))
        try:
            text = slot_user_data(slots, self._connect_address(), values,
                                  isolated=group is not None,
                                  tls_fingerprint=self.master_tls_fingerprint,
                                  container_limits=self.container_limits,
                                  registry_credentials=self.registry_credentials,
                                  disk=caches.extensions(self.caches, self.disk_floor))
        except UserDataError as e:
            self._count_failure(metrics.INVALID_SETTING, str(e))
            raise LatentWorkerCannotSubstantiate(self.name, str(e)) from e
        owner = group.name if group is not None else self.name
        key = launch_key(values, plan.amis, self)
        if not (yield pools.claim_for_launch(self)):
            message = f"pool {self.pool} is at its cap on all masters"
            self._count_failure(metrics.POOL_CAP, message)
            raise LatentWorkerFailedToSubstantiate(self.name, message)
        spec = launch_spec("", text, self, template)
        try:
            instance = yield self._launcher(owner).launch(
                client, spec, fallback.options(values["instance_type"], self.subnet_id,
                                               self.market),
                image=values["image"], key=key, serves=[slot.name for slot in slots],
                reuse=group is None, plan=plan)
        except LaunchFailed as e:
            raise self._launch_failed(e) from e
        return (instance, copy.deepcopy(values))

    def _launch_failed(self, e: LaunchFailed) -> Exception:
        """Counted; a refused launch fails the build once, another is retried."""
        self._count_failure(e.reason, e.message)
        if isinstance(e, LaunchRefused):
            return LatentWorkerCannotSubstantiate(self.name, e.message)
        return LatentWorkerFailedToSubstantiate(self.name, e.message)

    def _launcher(self, owner: str | None = None) -> Launcher:
        return Launcher(self.fleet, owner or self.name, str(self), self._note_timeline)

    def _note_timeline(self, event: str, seconds: float) -> None:
        self.timeline[event] = seconds

    def _count_failure(self, reason: str, message: str = "") -> None:
        self._failure_counted = True
        self.last_failure = message or reason
        self.fleet.metrics.inc("dockerami_launch_failures_total", {"reason": reason})
