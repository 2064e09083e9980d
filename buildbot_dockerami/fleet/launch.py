"""Launching an instance: the owner's stopped instance started again while it still
matches, else RunInstances over the capacity options in order (fallback.py), each call
idempotent by its ClientToken so that a lost answer is found again, never launched
twice. Each option gets the AMI of its instance type's architecture (architecture.py),
over the launch template if one is given (templates.py). Stopping an idle instance for
that reuse is here too.

Fleet layer: EC2 and the master's Fleet, nothing of builds. A launch that failed for
good is raised as LaunchFailed; the worker counts it and fails the substantiation.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from botocore.exceptions import ClientError
from twisted.internet import defer
from twisted.internet.task import deferLater
from twisted.python import log

from buildbot_dockerami.cloud import instances
from buildbot_dockerami.cloud.ec2 import AsyncEc2, CloudError, LaunchSpec
from buildbot_dockerami.fleet import architecture, fallback, metrics, stopped_pool, templates
from buildbot_dockerami.fleet.metrics import Metrics
from buildbot_dockerami.protocol import limits, registry, tls, userdata
from buildbot_dockerami.protocol.passwords import SECRET_KEY
from buildbot_dockerami.protocol.userdata import UserData

#: How many times (2 s apart) a start waits for a stopping instance to be stopped.
STOPPED_WAIT_CHECKS = 45


@dataclass(frozen=True)
class Slot:
    """One worker an instance serves: its name, the password it connects with, and for
    a container slot the secret its one-time passwords derive from
    (protocol/passwords.py)."""

    name: str
    password: str = field(repr=False)
    secret: str | None = field(default=None, repr=False)


def slot_user_data(slots: Sequence[Slot], master: str, values: Mapping[str, Any], *,
                   isolated: bool, tls_fingerprint: str | None,
                   container_limits: Mapping[str, Any] | None = None,
                   registry_credentials: str | None = None,
                   disk: Mapping[str, str] | None = None) -> str:
    """The user data of an instance serving ``slots`` (the first on line 1, the others
    on extension lines), for the rendered per-build ``values``; raises UserDataError.
    ``container_limits`` (checked at checkconfig) apply to each of its containers;
    ``registry_credentials`` is where the bootstrap fetches the registry's credentials
    (its name only: protocol/registry.py); ``disk``: the caches' and the disk floor's
    extensions (protocol/caches.py)."""
    extensions: dict[str, str] = {}
    if isolated:
        extensions["isolation"] = "container"
        if len(slots) > 1:
            extensions["slots"] = str(len(slots))
            for number, slot in enumerate(slots[1:], start=1):
                extensions[f"slot.{number}"] = f"{slot.name} {slot.password}"
        for number, slot in enumerate(slots):
            if slot.secret is not None:
                extensions[SECRET_KEY.format(slot=number)] = slot.secret
    if tls_fingerprint is not None:
        extensions[tls.EXTENSION] = tls.normalize_fingerprint(tls_fingerprint)
    extensions.update(limits.extensions(container_limits))
    if registry_credentials is not None:
        extensions[registry.EXTENSION] = registry_credentials
    extensions.update(disk or {})
    return userdata.render(UserData(
        worker_name=slots[0].name, password=slots[0].password, master=master,
        image=values["image"], setup_repo=values["setup_repo"],
        setup_branch=values["setup_branch"], extensions=extensions,
    ))


LAUNCH_SETTINGS = ("subnet_id", "market", "security_group_ids", "keypair_name",
                   "instance_profile", "tags", "block_device_mappings", "metadata_options",
                   "launch_template")


def launch_key(values: Mapping[str, Any], ami: Any, settings: Any) -> str:
    """stopped_pool.launch_key of what an instance is launched with: the rendered values,
    the AMI (or the AMIs by instance type) and the worker's LAUNCH_SETTINGS (read from
    ``settings``)."""
    return stopped_pool.launch_key({
        **values, "ami": ami,
        **{name: getattr(settings, name, None) for name in LAUNCH_SETTINGS}})


def launch_spec(ami: str, user_data: str, settings: Any,
                template: Mapping[str, Any] | None = None) -> LaunchSpec:
    """What every capacity option of one launch shares (fallback and the plan set the
    rest); ``template``: the data of the worker's launch template, if it has one."""
    return LaunchSpec(
        ami=ami, instance_type="", user_data=user_data, tags=settings.tags,
        security_group_ids=settings.security_group_ids, keypair_name=settings.keypair_name,
        instance_profile=settings.instance_profile,
        block_device_mappings=settings.block_device_mappings,
        metadata_options=templates.metadata_options(template, settings.metadata_options),
        launch_template=getattr(settings, "launch_template", None),
        template_tags=templates.tags(template or {}),
    )


class LaunchFailed(Exception):
    """No instance: ``reason`` labels dockerami_launch_failures_total, ``message`` is
    what the build log and the Fleet page show."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class LaunchRefused(LaunchFailed):
    """No instance, and none will come of these settings as they are (a launch template
    that sets user data, no AMI for any instance type): the build fails, not retried."""


@defer.inlineCallbacks
def plan_launch(client: AsyncEc2, values: Mapping[str, Any], settings: Any,
                now: float) -> Any:
    """(architecture.Plan, the launch template's data or None) for one launch of the
    worker ``settings`` with the rendered ``values``: each instance type's AMI, the
    template read and checked. Raises LaunchFailed / LaunchRefused."""
    template_ref = getattr(settings, "launch_template", None)
    found = None
    has_ami = values["ami"] is not None or settings.ami_filters is not None
    if template_ref is not None:
        try:
            found = yield templates.data(client, template_ref, now)
        except Exception as e:
            raise LaunchFailed(metrics.LAUNCH_TEMPLATE, "launch_template: DescribeLaunchTemplate"
                               f"Versions failed: {_ec2_error(e)}") from e
        problems = templates.problems(found, settings, has_ami=has_ami)
        if problems:
            raise LaunchRefused(metrics.LAUNCH_TEMPLATE, "; ".join(problems))
    types = [o.instance_type for o in fallback.options(values["instance_type"], None,
                                                        "on-demand")]
    try:
        plan = yield architecture.resolve(
            client, types, values["ami"], settings.ami_filters, settings.ami_owners,
            template_image=(found or {}).get("ImageId"))
    except CloudError as e:
        raise LaunchFailed(metrics.NO_AMI, str(e)) from e
    if not plan.amis:
        reasons = "; ".join(f"{t}: {why}" for t, why in plan.skipped.items())
        # Fixed AMIs never change by themselves; filters may match a new image soon.
        refused = LaunchRefused if settings.ami_filters is None else LaunchFailed
        raise refused("no_ami", f"no instance type has an AMI it can boot: {reasons}")
    return plan, found


def _ec2_error(e: Exception) -> str:
    if isinstance(e, ClientError):
        error = e.response.get("Error", {})
        return f"{error.get('Code', '')}: {error.get('Message', '')}"
    return str(e)


@dataclass
class LaunchedInstance:
    client: AsyncEc2
    instance_id: str
    instance_type: str
    image: str
    ami: str
    availability_zone: str = ""
    #: Epoch seconds RunInstances answered.
    launched_at: float = 0.0
    market: str = "on-demand"
    #: stopped_pool.launch_key of what it was launched with: a stopped one is reused only
    #: while it matches.
    key: str = ""
    #: Its loss is counted: the workers that hear of it again count nothing more.
    lost: bool = False
    #: Why it retires (fleet/retirement.py: its bootstrap said so, or the master drains
    #: it); "" while it serves.
    retired: str = ""
    #: Builds started on it (all its slots): max_builds_per_instance drains it.
    builds_started: int = 0
    #: Draining but kept (idle) until its pool's warm minimum has its replacement.
    held: bool = False
    #: The digest of the image it runs, as its image reported it (worker info
    #: ``image_digest``, protocol/imagedigest.py); "" when it reported none.
    image_digest: str = ""
    #: When it reported ``image_digest`` (the fleet's clock): only a registry answer asked
    #: later may drain it (fleet/image_refresh.newer).
    image_digest_at: float = 0.0


class FleetParts(Protocol):
    """What launching needs of the master's Fleet (shared by all its workers)."""

    reactor: Any
    master_id: str
    cooldown: fallback.CoolDown
    metrics: Metrics
    #: ClientToken -> owner of every RunInstances in flight (the reconciler spares them).
    launching: dict[str, str]
    stopped: stopped_pool.StoppedPool

    def find_launch(self, client: AsyncEc2, token: str) -> defer.Deferred: ...

    def terminate(self, client: AsyncEc2, instance_id: str) -> defer.Deferred: ...


class Launcher:
    """Launches for ``owner`` (a worker, or a slot group's name), logging as
    ``log_prefix``; ``note(event, seconds)`` adds to the worker's timeline."""

    def __init__(self, fleet: FleetParts, owner: str, log_prefix: str,
                 note: Callable[[str, float], None]) -> None:
        self.fleet = fleet
        self.owner = owner
        self.prefix = log_prefix
        self.note = note

    def _now(self) -> float:
        return self.fleet.reactor.seconds()

    @defer.inlineCallbacks
    def launch(self, client: AsyncEc2, spec: LaunchSpec, options: Sequence[fallback.Option],
               *, image: str, key: str, serves: Sequence[str], reuse: bool,
               plan: architecture.Plan | None = None) -> Any:
        """A LaunchedInstance: the owner's stopped one if ``reuse`` and it matches
        ``key``, else a new one. ``spec`` gives what every option shares; its instance
        type, subnet, market, ClientToken and ownership tags are set per option (its
        ``tags`` are the operator's), and with a ``plan`` its AMI (options whose type
        the plan skips are left out, each with its reason)."""
        if reuse:
            restarted = yield self.start_stopped(key, spec.user_data)
            if restarted is not None:
                return restarted
        fleet = self.fleet
        if plan is not None:
            for itype, why in plan.skipped.items():
                self.note(f"skipped {itype}: {why}", self._now())
                log.msg(f"{self.prefix}: not launching {itype}: {why}")
            for itype, why in plan.unchecked.items():
                log.msg(f"{self.prefix}: architecture of {itype} unknown ({why}); "
                        "its AMI is chosen without the architecture check")
            options = plan.usable(options)
        choices = fleet.cooldown.order(options, self._now())
        for attempt, option in enumerate(choices, start=1):
            if plan is not None:
                spec = dataclasses.replace(spec, ami=plan.amis[option.instance_type])
            try:
                status = yield self._run_instance(client, spec, option)
                break
            except ClientError as e:
                error = e.response.get("Error", {})
                code, message = error.get("Code", ""), error.get("Message", "")
                if fallback.is_capacity_error(code) and attempt < len(choices):
                    fleet.cooldown.failed(option, self._now())
                    self.note(f"fallback {attempt}: {option}: {code}", self._now())
                    fleet.metrics.inc("dockerami_launch_fallbacks_total", {"code": code})
                    log.msg(f"{self.prefix}: RunInstances for {option} failed ({code}); "
                            f"trying {choices[attempt]}")
                    continue
                raise LaunchFailed(f"RunInstances:{code}",
                                   f"RunInstances failed: {code}: {message}") from e
        ami = spec.ami or (plan.template_image if plan is not None else "")
        shown = ami or "the launch template's AMI"
        log.msg(
            f"{self.prefix}: launched {status.instance_id} ({option}, {shown}) "
            f"running image {image} for {', '.join(serves)}"
        )
        fleet.metrics.inc("dockerami_instance_launches_total", {"worker": self.owner})
        return LaunchedInstance(
            client, status.instance_id, option.instance_type, image, ami,
            status.availability_zone, self._now(), option.market, key,
        )

    @defer.inlineCallbacks
    def _run_instance(self, client: AsyncEc2, spec: LaunchSpec,
                      option: fallback.Option) -> Any:
        """One RunInstances, idempotent by its ClientToken (also a tag, so the instance
        can be found when no answer ever comes)."""
        token = uuid.uuid4().hex
        spec = dataclasses.replace(
            spec,
            instance_type=option.instance_type,
            tags=instances.instance_tags(self.owner, self.fleet.master_id, spec.tags, token),
            client_token=token,
            market=option.market,
            subnet_id=option.subnet_id,
        )
        self.fleet.launching[token] = self.owner
        try:
            return (yield client.run_instance(spec))
        except ClientError:
            raise
        except Exception as e:
            return (yield self._find_lost_launch(client, token, e))
        finally:
            self.fleet.launching.pop(token, None)

    @defer.inlineCallbacks
    def _find_lost_launch(self, client: AsyncEc2, token: str, error: Exception) -> Any:
        """RunInstances never answered (timeouts, connection lost, every retry spent):
        EC2 may still have launched the instance. Look it up by its launch token."""
        try:
            found = yield self.fleet.find_launch(client, token)
        except Exception as e:
            found, outcome = None, f"lookup failed: {e}"
        else:
            outcome = "found" if found is not None else "not launched"
        self.fleet.metrics.inc("dockerami_launch_answers_lost_total",
                               {"outcome": "found" if found is not None else "not_found"})
        if found is not None:
            log.msg(f"{self.prefix}: RunInstances gave no answer ({error}); instance "
                    f"{found.instance_id} found by its launch token")
            return found
        # Not found (or not knowable now): any instance the call did create carries the
        # token but no worker, so the reconciler terminates it on its next pass.
        message = f"RunInstances gave no answer ({error}); {outcome}"
        log.msg(f"{self.prefix}: {message}")
        raise LaunchFailed(metrics.NO_ANSWER, message)

    # -- the stopped warm pool (stopped_pool.py decides, this does the EC2 calls) ----------

    @defer.inlineCallbacks
    def start_stopped(self, key: str, user_data: str) -> Any:
        """The owner's stopped instance, started again with ``user_data`` (a fresh
        credential), if it still matches ``key``; None to launch a new one."""
        pool = self.fleet.stopped
        entry = pool.take(self.owner)
        if entry is None:
            return None
        instance = entry.instance
        now = self._now()
        if not stopped_pool.reusable(entry, key, now, pool.max_age):
            why = "stale: launched with other settings" if entry.key != key else "too old"
            yield self.retire(entry, why)
            return None
        try:
            yield self._wait_stopped(instance)
            yield instance.client.set_user_data(instance.instance_id, user_data)
            yield instance.client.start([instance.instance_id])
        except Exception as e:
            yield self.retire(entry, f"could not start it: {e}")
            return None
        log.msg(f"{self.prefix}: started stopped instance {instance.instance_id} with a "
                "fresh credential")
        self.fleet.metrics.inc("dockerami_stopped_starts_total", {})
        self.note("started_from_stopped", now)
        # It pulls its image again: what it reported running before it stopped is past.
        return dataclasses.replace(instance, launched_at=now, image_digest="",
                                   image_digest_at=0.0)

    @defer.inlineCallbacks
    def _wait_stopped(self, instance: LaunchedInstance) -> Any:
        """EC2 takes a while to stop an instance; its user data changes only once it has."""
        for _ in range(STOPPED_WAIT_CHECKS):
            status = (yield instance.client.describe([instance.instance_id])).get(
                instance.instance_id)
            if status is None or status.state == "stopped":
                return
            yield deferLater(self.fleet.reactor, 2, lambda: None)
        raise CloudError(f"{self.owner} still not stopped")

    @defer.inlineCallbacks
    def retire(self, entry: stopped_pool.StoppedInstance, why: str) -> Any:
        log.msg(f"{self.prefix}: terminating stopped instance {entry.instance_id}: {why}")
        try:
            yield self.fleet.terminate(entry.instance.client, entry.instance_id)
        except Exception as e:
            log.msg(f"{self.prefix}: {e}")

    @defer.inlineCallbacks
    def stop_for_reuse(self, instance: LaunchedInstance) -> Any:
        """Stop (not terminate) the owner's idle instance, for a start in seconds later;
        False if EC2 would not stop it (terminate it instead)."""
        try:
            yield instance.client.stop([instance.instance_id])
        except Exception as e:
            log.msg(f"{self.prefix}: could not stop {instance.instance_id} ({e}); "
                    "terminating it")
            return False
        pool = self.fleet.stopped
        now = self._now()
        pool.add(stopped_pool.StoppedInstance(self.owner, instance, instance.key, now))
        log.msg(f"{self.prefix}: instance {instance.instance_id} stopped for reuse")
        for entry in stopped_pool.to_retire(pool.entries.values(), now, pool.max_count,
                                        pool.max_age):
            pool.take(entry.owner)
            yield self.retire(entry, "beyond max_stopped or max_stopped_age")
        return True
