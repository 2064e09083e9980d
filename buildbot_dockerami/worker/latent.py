"""The buildbot glue: DockerAMILatentWorker turns substantiate/insubstantiate into
EC2 launches and terminations of a plain base AMI whose user data names an image."""

from __future__ import annotations

import contextlib
import copy
import re
import secrets
import warnings
from typing import Any

from buildbot import config
from buildbot.interfaces import (
    LatentWorkerCannotSubstantiate,
    LatentWorkerFailedToSubstantiate,
    LatentWorkerSubstantiatiationCancelled,
)
from buildbot.process.properties import Properties
from buildbot.process.results import RETRY
from buildbot.util import Notifier
from buildbot.util.latent import CompatibleLatentWorkerMixin
from buildbot.warnings import ConfigWarning
from buildbot.worker.latent import AbstractLatentWorker, States
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.python import failure, log
from twisted.spread import pb

from buildbot_dockerami import patches
from buildbot_dockerami.cloud import address, instances
from buildbot_dockerami.cloud.ec2 import Credentials
from buildbot_dockerami.config import validators
from buildbot_dockerami.config.checks import (
    accepted_keywords,
    buildbot_settings,
    rendered_problems,
    settings_problems,
    settings_warnings,
)
from buildbot_dockerami.config.model import FLEET_WIDE, WorkerSettings
from buildbot_dockerami.fleet import boot, console, ending, fallback, lost, pools
from buildbot_dockerami.fleet.launch import (
    LaunchedInstance,
    Launcher,
    LaunchFailed,
    Slot,
    launch_key,
    launch_spec,
    slot_user_data,
)
from buildbot_dockerami.fleet.prewarm import PrewarmTimer
from buildbot_dockerami.fleet.service import Fleet
from buildbot_dockerami.fleet.shared_instance import InstanceGroup
from buildbot_dockerami.protocol import imageready
from buildbot_dockerami.protocol.passwords import OneTimeCredentials
from buildbot_dockerami.protocol.userdata import UserDataError
from buildbot_dockerami.worker import on_request

DEFAULT_BUILD_WAIT_TIMEOUT = 10 * 60
#: States in which a slot worker is on its way to expecting its next container.
REARMING_STATES = (States.INSUBSTANTIATING_SUBSTANTIATING, States.SUBSTANTIATING)
CONNECTION_WAIT_SECONDS = 30
#: The worker-info key (a file in the worker's info/ directory) carrying the id of the
#: instance the worker runs on; images that do not report it are accepted
#: (docs/what-happens-when.md).
INSTANCE_ID_INFO = "instance_id"


class ConnectionRefused(pb.Error, UnauthorizedLogin):
    """A worker connection the master turns away: a pb.Error, so not logged as a crash,
    and an UnauthorizedLogin, so a worker that is merely early retries."""


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


def _first(*waits: defer.Deferred) -> defer.Deferred:
    """The first of several results (or failures); the others run on, unheeded."""
    first: defer.Deferred = defer.Deferred()

    def settle(result: Any) -> None:
        if not first.called:
            first.callback(result)  # a Failure takes the errback path

    for wait in waits:
        wait.addBoth(settle)
    return first


class DockerAMILatentWorker(CompatibleLatentWorkerMixin, AbstractLatentWorker):
    """A latent worker that boots a base AMI which runs ``image`` as the worker.

    Settings are described in docs/configuration.md; every one of them is applied
    again on ``buildbot reconfig`` and used from the next launch on.
    """

    _instance: LaunchedInstance | None = None
    _state = States.NOT_SUBSTANTIATED
    group: InstanceGroup | None = None
    isolation = "none"
    #: Whether this substantiation's worker connected (else: log the console).
    _connected = False
    _stopping = False
    _failure_counted = False
    #: The console fetched when this substantiation's instance was found dead.
    _failed_console: str | None = None
    _requested_at = 0.0
    #: A container slot waiting for the fresh container that replaces its last one.
    recycling = False
    #: The user's build_wait_timeout (buildbot's is forced to 0 under isolation).
    idle_timeout: float = DEFAULT_BUILD_WAIT_TIMEOUT
    _prewarming = False
    _prewarm: PrewarmTimer | None = None
    #: Fired when the worker connects while check_instance waits for EC2.
    _on_connect: defer.Deferred | None = None
    #: This insubstantiation is the idle timeout's (the instance may be stopped).
    _idle_stop = False
    pool: str | None = None
    #: Why the last launch or boot failed, for the Fleet page.
    last_failure = ""
    #: The instance whose loss this worker last recorded (see _record_lost).
    _lost_id = ""
    #: Settings buildbot renders through the secrets providers before reconfigService
    #: (a class attribute: methods still see the ``secrets`` module).
    secrets = ["identifier", "secret_identifier"]
    credentials: Credentials | None = None
    #: A container slot's one-time passwords (protocol/passwords.py), with a fresh password.
    one_time: OneTimeCredentials | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Fired when a slot worker starts expecting its next container (see attached).
        self._expecting_connection: Notifier[None] = Notifier()
        #: When this substantiation was requested, connected, started its first build.
        self.timeline: dict[str, float] = {}
        self.image_ready: imageready.ImageReady | None = None  # as its image reported
        if "name" in kwargs and not args:
            # buildbot takes name= before checkConfig could check it; pass it on as ours.
            args = (kwargs.pop("name"),)
        super().__init__(*args, **kwargs)

    # The pool index (pools.InUse) is told of every change that can make an instance
    # count against a cap: the state, the instance, builds starting and finishing.
    @property
    def state(self) -> Any:  # type: ignore[override]
        return self._state

    @state.setter
    def state(self, value: Any) -> None:
        self._state = value
        self._note_use()

    @property
    def instance(self) -> LaunchedInstance | None:
        return self._instance

    @instance.setter
    def instance(self, value: LaunchedInstance | None) -> None:
        self._instance = value
        self._note_use()

    def _note_use(self) -> None:
        fleet = getattr(self, "fleet", None)
        if fleet is not None:
            fleet.in_use.note(self)

    def checkConfig(self, name: Any = None, password: Any = None, **kwargs: Any) -> None:
        settings, kwargs = WorkerSettings.split(kwargs)
        problems = settings_problems(name, password, settings)
        bad, kwargs = buildbot_settings(kwargs, accepted_keywords(type(self)))
        for problem in problems + bad:
            config.error(f"DockerAMILatentWorker {name!r}: {problem}")
        # buildbot's checks get what is left, and a usable name, so they raise no TypeError.
        usable_name = name if isinstance(name, str) else f"unnamed-{id(self):x}"
        try:
            super().checkConfig(usable_name, password, **kwargs)
        except (TypeError, ValueError, AttributeError) as e:
            config.error(f"DockerAMILatentWorker {name!r}: {e}")
        patches.at_config_load()
        for setting in settings.moved_to_fleet():
            warnings.warn(
                f"DockerAMILatentWorker {name!r}: {setting}: is a fleet-wide setting now; "
                f"set it once with c['services'].append(FleetSettings({setting}=...)) "
                "(the worker keyword still works in this release)",
                ConfigWarning, stacklevel=2)
        for warning in settings_warnings(settings):
            warnings.warn(f"DockerAMILatentWorker {name!r}: {warning}", ConfigWarning,
                          stacklevel=2)
        warning = address.loopback_warning() if settings.master_address is None else None
        if warning:
            warnings.warn(f"DockerAMILatentWorker {name!r}: master_address: {warning}",
                          ConfigWarning, stacklevel=2)

    @defer.inlineCallbacks
    def reconfigService(self, name: str, password: Any = None, **kwargs: Any) -> Any:
        settings, kwargs = WorkerSettings.split(kwargs)
        self.settings = settings
        for setting, value in settings.plain().items():
            if setting not in FLEET_WIDE:  # read through the fleet (Fleet.setting)
                setattr(self, setting, value)
        self.tags = dict(settings.tags or {})
        if settings.metadata_options is None:
            self.metadata_options = validators.DEFAULT_METADATA_OPTIONS
        patches.at_configure(self.master)
        # Rendered by buildbot (``secrets`` above) before they get here.
        self.credentials = None if settings.identifier is None else Credentials(
            settings.identifier, settings.secret_identifier)
        self.fleet = Fleet.of(self.master)
        self.fleet.workers.add(self)
        self.fleet.worker_configured(settings)
        on_request.attach(self.fleet, self.master)
        # Built now (once for all workers sharing it), not by the first launch of a burst.
        self.ec2_client().addErrback(
            lambda f: log.msg(f"{self}: no EC2 client yet: {f.getErrorMessage()}"))
        pool = settings.pool
        if pool is not None:
            if pool not in self.fleet.pool_limits:
                self.fleet.pool_limits[pool] = yield pools.load_limits(self.master, pool)
            if self.fleet.keeper is None:
                self.fleet.keeper = pools.PoolKeeper(self.fleet)
            self.fleet.keeper.start()
        isolation, instance_group = settings.isolation, settings.instance_group
        idle_timeout = kwargs.get("build_wait_timeout", DEFAULT_BUILD_WAIT_TIMEOUT)
        self.idle_timeout = idle_timeout
        if isolation != "none":
            # Every build ends its worker's connection: the container or instance is spent.
            kwargs["build_wait_timeout"] = 0
        if self.group is not None and (
            isolation != "container" or self.group.name != (instance_group or name)
        ):
            self.group.members.pop(name, None)
            self.group = None
        if isolation == "container":
            self.group = self.fleet.group(instance_group or name)
            self.group.join(self)
            self.group.idle_timeout = idle_timeout
        self._note_use()
        # None means a fresh password per instance (see start_instance); until then,
        # getRandomPass keeps the live one if an instance is booting or connected.
        self.random_password = password is None
        if password is None:
            # A slot keeps the password its next container will bring.
            password = self.one_time.password if self.one_time else self.getRandomPass()
        result = yield super().reconfigService(name, password, **kwargs)
        return result

    @property
    def launch_on_request(self) -> bool:
        return bool(self.fleet.setting(self.settings, "launch_on_request"))

    # -- launching ---------------------------------------------------------------

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

    @defer.inlineCallbacks
    def start_instance(self, build: Any) -> Any:
        if self.fleet.stopping:
            # Nothing new while the master stops: the build is retried after the restart.
            raise LatentWorkerFailedToSubstantiate(self.name, "the master is shutting down")
        if self.instance is not None:
            raise LatentWorkerFailedToSubstantiate(
                self.name, f"instance {self.instance.instance_id} is still running"
            )
        self._requested_at = self.master.reactor.seconds()
        self.timeline = {"requested": self._requested_at}
        self._failure_counted = False
        self._failed_console = None
        if self.group is not None:
            group = self.group
            instance = yield group.acquire(lambda: self._launch(build, group))
            # Compatible with builds by what the shared instance was launched with.
            self._actual_build_props = copy.deepcopy(group.launch_values)
            self._expecting_connection.notify(None)
        else:
            instance, _ = yield self._launch(build)
        self.instance = instance
        self._connected = False
        self.fleet.monitor.watch(instance.client, instance.instance_id, self.name)
        return True

    def ec2_client(self) -> defer.Deferred:
        """The (shared) EC2 client for this worker's region and endpoint."""
        return self.fleet.client(self.region, self.endpoint_url, self.session,
                                 self.fleet.setting(self.settings, "ec2_timeout"),
                                 credentials=self.credentials)

    @defer.inlineCallbacks
    def renew_password(self, one_time: bool = False) -> Any:
        """A fresh password per instance when none is configured; with ``one_time``
        (container slots), a fresh secret whose passwords each serve one container."""
        self.one_time = OneTimeCredentials.fresh() if (
            one_time and self.random_password) else None
        if self.random_password:
            self.password = self.one_time.password if self.one_time else secrets.token_hex(16)
            yield self.registration.update(self, self.master.config)
        return self.password

    @defer.inlineCallbacks
    def _launch(self, build: Any, group: InstanceGroup | None = None) -> Any:
        """RunInstances for this worker, or for every slot of its group."""
        values = yield self.renderWorkerPropsOnStart(build)
        problems = rendered_problems(values)
        if problems:
            # A value that will never work fails the build once, instead of a retry loop.
            self._count_failure("invalid_setting", "; ".join(problems))
            raise LatentWorkerCannotSubstantiate(self.name, "; ".join(problems))
        client = yield self.ec2_client()
        ami = values["ami"]
        if ami is None:
            ami = yield client.newest_image(self.ami_filters, self.ami_owners)
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
                                  registry_credentials=self.registry_credentials)
        except UserDataError as e:
            self._count_failure("invalid_setting", str(e))
            raise LatentWorkerCannotSubstantiate(self.name, str(e)) from e
        owner = group.name if group is not None else self.name
        key = launch_key(values, ami, self)
        if not (yield pools.claim_for_launch(self)):
            message = f"pool {self.pool} is at its cap on all masters"
            self._count_failure("pool_cap", message)
            raise LatentWorkerFailedToSubstantiate(self.name, message)
        spec = launch_spec(ami, text, self)
        try:
            instance = yield self._launcher(owner).launch(
                client, spec, fallback.options(values["instance_type"], self.subnet_id,
                                               self.market),
                image=values["image"], key=key, serves=[slot.name for slot in slots],
                reuse=group is None)
        except LaunchFailed as e:
            self._count_failure(e.reason, e.message)
            raise LatentWorkerFailedToSubstantiate(self.name, e.message) from e
        return (instance, copy.deepcopy(values))

    def _launcher(self, owner: str | None = None) -> Launcher:
        return Launcher(self.fleet, owner or self.name, str(self), self._note_timeline)

    def _note_timeline(self, event: str, seconds: float) -> None:
        self.timeline[event] = seconds

    def _count_failure(self, reason: str, message: str = "") -> None:
        self._failure_counted = True
        self.last_failure = message or reason
        self.fleet.metrics.inc("dockerami_launch_failures_total", {"reason": reason})

    @defer.inlineCallbacks
    def check_instance(self) -> Any:
        """Called by buildbot every check_instance_interval until the worker connects;
        answered from the fleet's batched DescribeInstances.

        buildbot holds the worker's start/stop lock meanwhile, so the wait ends when
        the worker connects: a slow DescribeInstances would otherwise hold the lock
        through a short build, and the insubstantiation after it behind that.
        """
        instance = self.instance
        if instance is None:
            return (True, "")
        if self.fleet.stopping:
            return (False, "the master is shutting down")
        monitor = self.fleet.monitor
        self._on_connect = connected = defer.Deferred()
        try:
            status = yield _first(
                monitor.status(instance.instance_id, self.check_instance_interval * 0.8),
                connected)
        except Exception as e:
            # Not knowing the state only delays the verdict (missing_timeout still holds).
            log.msg(f"{self}: state of {instance.instance_id} unknown for now: {e}")
            return (True, "")
        finally:
            self._on_connect = None
        if self.conn is not None or self.instance is not instance:
            return (True, "")  # connected (or gone) meanwhile: not a booting instance now
        ok, reason = boot.boot_verdict(
            status, monitor.seconds_since_watch(instance.instance_id))
        if status is not None and status.state == "running":
            self.timeline.setdefault("running", self.master.reactor.seconds())
        if not ok:
            self._count_failure(f"instance_{status.state if status else 'not_found'}", reason)
            # The boot's last words (e.g. the bootstrap's "cannot pull image") say why.
            output = yield console.output(instance, self.password, str(self))
            self._failed_console = output  # logged in full by stop_instance, not fetched again
            explained = console.explained(reason, output)
            if explained != reason:
                reason = self.last_failure = explained
        return (ok, reason)

    def _refuse(self, conn: Any, why: str) -> None:
        log.msg(f"{self}: refusing a connection: {why}")
        conn.loseConnection()
        raise ConnectionRefused(f"{self.name}: {why}")

    def _check_origin(self, conn: Any) -> None:
        """A connection is accepted only from the instance launched for this worker.

        Images that report no instance id (the seed's) are let in; the reconciler
        ends any instance this master does not track within its interval.
        """
        reported = str(conn.info.get(INSTANCE_ID_INFO) or "").strip()
        expected = self.instance.instance_id if self.instance is not None else None
        if reported and reported != expected:
            self.fleet.metrics.inc("dockerami_connections_refused_total", {})
            if reported not in self.fleet.tracked():
                self.fleet.reconciler.terminate_untracked(reported, self.name)
            self._refuse(conn, f"it runs on {reported}, not on this worker's instance "
                               f"{expected or '(none)'}")
        if (self.group is None and self.state != States.SUBSTANTIATING_STARTING
                and self.build_wait_timeout >= 0):
            # e.g. the worker of an instance being terminated reconnects: buildbot would
            # refuse it with a logged RuntimeError; refuse it quietly (it may retry).
            self._refuse(conn, f"not expecting a connection ({self.state.name.lower()})")

    @defer.inlineCallbacks
    def attached(self, conn: Any) -> Any:
        self._check_origin(conn)
        recycling = self.state in REARMING_STATES or (
            self.state == States.SUBSTANTIATED and self.conn is None  # lost, not yet cleaned up
        )
        if self.group is not None and recycling:
            # A fresh container can connect before buildbot has finished recycling the
            # last one's substantiation; buildbot would turn it away. Wait for it.
            with contextlib.suppress(defer.TimeoutError):
                yield self._expecting_connection.wait().addTimeout(
                    CONNECTION_WAIT_SECONDS, self.master.reactor
                )
        # buildbot forgets a graceful Stop when a worker connects; one asked for while
        # the instance booted still stands.
        graceful = self._graceful
        yield super().attached(conn)
        if graceful and not self._graceful:
            self._graceful = True
            self._update_graceful()
        if self.one_time is not None and self.conn is not None:
            # This container's password is spent: accepted once, never again.
            self.password = self.one_time.spend()
            yield self.registration.update(self, self.master.config)
        if self.instance is not None and self.conn is not None:
            self.timeline["connected"] = self.master.reactor.seconds()
            self.image_ready = imageready.from_info(
                conn.info, self.instance.launched_at, self._requested_at,
                self.timeline["connected"])
            if self.image_ready is not None:
                self.timeline[imageready.STEP] = self.image_ready.at
            if self.busy:  # the build that asked for this instance starts now
                self.timeline["build_started"] = self.timeline["connected"]
            elif self._prewarming and self.group is None:
                self._prewarm_timer.start()
            self._prewarming = False
            self.recycling = False
            self.fleet.metrics.observe(
                "dockerami_provisioning_seconds",
                self.master.reactor.seconds() - self._requested_at,
                {"isolation": self.isolation},
            )
            self._connected = True
            self.fleet.monitor.unwatch(self.instance.instance_id, self.name)
        if self.conn is not None and self._on_connect is not None:
            # check_instance's wait ends, and with it buildbot's lock: last, so that an
            # insubstantiation queued on the lock sees this connection fully recorded.
            connected, self._on_connect = self._on_connect, None
            connected.callback(None)

    def running_builds(self) -> list[Any]:
        return [build for builder in self.botmaster.builders.values()
                for build in builder.building if build.workername == self.name]

    def instance_lost(self, status: Any) -> None:
        """EC2 says this worker's connected instance is gone (spot reclaim, the console,
        a colleague): its builds end as RETRY with the reason, the worker lets go of it."""
        instance = self.instance
        if (instance is None or instance.instance_id != status.instance_id
                or self.state != States.SUBSTANTIATED):
            return  # booting: check_instance decides; terminating: our own doing
        self._let_go(self._record_lost(instance, status))

    def detached(self) -> Any:
        # A connection lost unasked may be the instance dying: ask EC2 once, now, so
        # the reason is known without waiting for the reconciler.
        instance = self.instance
        if (instance is not None and self.group is None and not self._stopping
                and self.state == States.SUBSTANTIATED and not self.fleet.stopping):
            self._deferwaiter.add(self._why_lost(instance))
        return super().detached()

    @defer.inlineCallbacks
    def _why_lost(self, instance: LaunchedInstance) -> Any:
        try:
            status = yield lost.gone(instance)
        except Exception as e:
            log.msg(f"{self}: connection lost; state of {instance.instance_id} unknown: {e}")
            return
        if status is not None:
            reason = self._record_lost(instance, status)
            log.msg(f"{self}: connection lost: {reason}")
            if self.instance is instance and self.state == States.SUBSTANTIATED:
                yield self.insubstantiate()

    def _record_lost(self, instance: LaunchedInstance, status: instances.InstanceStatus) -> str:
        """The reason ``instance`` is lost (fleet/lost.py counts it once); this worker
        shows it once, so a late report never hides a newer failure."""
        reason = lost.record(self.fleet.metrics, instance, status)
        if self._lost_id != instance.instance_id:
            self._lost_id = instance.instance_id
            self.last_failure = reason
        return reason

    def _let_go(self, reason: str) -> None:
        """The instance cannot serve any longer: builds RETRY with ``reason`` (built again
        elsewhere), the connection and the instance are released."""
        log.msg(f"{self}: {reason}; its builds are retried")
        for build in self.running_builds():
            build.stopBuild(reason, results=RETRY)
        if self.conn is not None:
            self.conn.loseConnection()
        if self.group is None:
            self._deferwaiter.add(self.insubstantiate())

    def shutdownRequested(self) -> None:
        """The worker asks to shut down. On a spot instance that is the bootstrap
        answering EC2's interruption notice: don't wait for the build (the instance
        has two minutes), retry it elsewhere now."""
        instance = self.instance
        if instance is None or instance.market != "spot":
            super().shutdownRequested()
            return
        self.fleet.metrics.inc("dockerami_spot_interruptions_total", {})
        reason = f"spot interruption: instance {instance.instance_id} is reclaimed by EC2"
        self.last_failure = reason
        self._let_go(reason)

    # -- per-build isolation -------------------------------------------------------

    @property
    def busy(self) -> bool:
        return bool(self.building)

    @property
    def active(self) -> bool:
        """FleetWorker.active: counts against its pool's cap."""
        return (self.busy or self.instance is not None
                or self.state != States.NOT_SUBSTANTIATED)

    def arm(self) -> None:
        """Expect this slot's next fresh container: substantiate without a build, as
        buildbot's latent machines do for workers that start with their machine."""
        if self._stopping or self.state not in (States.NOT_SUBSTANTIATED, States.INSUBSTANTIATING):
            return
        self.substantiate(None, None).addErrback(lambda _: None)  # failures are logged

    def release(self) -> defer.Deferred:
        return self.insubstantiate()

    # -- operator controls -------------------------------------------------------

    def canStartBuild(self) -> bool:
        # A build that would need a new instance waits while its pool is at its cap.
        return super().canStartBuild() and pools.may_launch(self)

    @property
    def stopping(self) -> bool:
        """The worker is being removed or the master stops: no new instance for it."""
        return self._stopping

    def may_launch_ahead(self) -> bool:
        """Whether launch on request may start this worker before a build asks for it."""
        return (self.group is None and self.state == States.NOT_SUBSTANTIATED
                and not self._stopping and self.canStartBuild()
                and on_request.same_for_every_build(self))

    @defer.inlineCallbacks
    def isCompatibleWithBuild(self, build_props: Any) -> Any:
        # Asked again for every build buildbot is about to start (canStartBuild is only
        # asked once per batch), after the builds before it have taken their workers.
        if on_request.prefers_spare(self, build_props.getProperty("buildername")):
            return False  # buildbot then tries the worker whose instance is on its way
        if not pools.may_launch(self):
            return False
        if not (yield super().isCompatibleWithBuild(build_props)):
            return False
        # Last: a pool slot held until the worker starts (across masters: claimed in
        # the shared database).
        return (yield pools.reserve(self, holder=build_props.getProperty("buildername")))

    def prewarm(self) -> bool:
        """Boot an instance now, before any build asks (the Fleet page's Start, the
        pool's warm minimum, or build requests waiting: on_request.py)."""
        if (self.state != States.NOT_SUBSTANTIATED or self.isPaused() or self._stopping
                or not pools.may_launch(self)):
            return False
        self._prewarming = True
        self.substantiate(None, None).addErrback(lambda _: None)  # failures are logged
        return True

    @property
    def _prewarm_timer(self) -> PrewarmTimer:
        if self._prewarm is None:
            self._prewarm = PrewarmTimer(
                self.master.reactor, lambda: self.idle_timeout,
                lambda: self.fleet.keeper is not None and self.fleet.keeper.keeps_warm(self),
                self._prewarm_expired)
        return self._prewarm

    def _prewarm_expired(self) -> None:
        if not self.busy and self.instance is not None:
            log.msg(f"{self}: pre-warmed instance had no build; ending it")
            self._idle_stop = True
            self._deferwaiter.add(self.insubstantiate())

    def buildStarted(self, wfb: Any) -> None:
        # buildbot calls this when it claims the worker, before substantiating it.
        super().buildStarted(wfb)
        self._note_use()
        self._prewarm_timer.cancel()
        if self.conn is not None:
            self.timeline.setdefault("build_started", self.master.reactor.seconds())
        if self.group is not None:
            self.group.build_started()

    def buildFinished(self, wfb: Any) -> None:
        super().buildFinished(wfb)
        self._note_use()
        if self.group is not None:
            self.group.build_finished()
        # A graceful Stop waits for this (buildbot's latent workers never check it).
        self.maybeShutdown()

    @defer.inlineCallbacks
    def shutdown(self) -> Any:
        """The web UI's Stop (graceful: called once idle) and Kill (now) worker actions.

        buildbot's own shutdown only asks the worker process to exit, which would leave
        the instance running and billing. Here the instance is terminated (a container-
        isolated slot gets a fresh container instead; its instance ends when idle), any
        running build ends as RETRY and is built again, and the worker stays available:
        the next build boots a new instance.
        """
        log.msg(f"{self}: shut down by request; ending its {self.isolation_target}")
        yield self.insubstantiate()
        if self._graceful:
            self._graceful = False
            self._update_graceful()
        self.botmaster.maybeStartBuildsForWorker(self.name)

    @property
    def isolation_target(self) -> str:
        return "container" if self.group is not None else "instance"

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        self._stopping = True
        yield super().stopService()
        self.fleet.workers.discard(self)
        self.fleet.in_use.forget(self)
        if self.group is not None:
            yield self.group.leave(self)

    # -- stopping ----------------------------------------------------------------

    @defer.inlineCallbacks
    def insubstantiate(self, fast: bool = False, force_substantiation_build: Any = None) -> Any:
        yield super().insubstantiate(fast, force_substantiation_build)
        build = force_substantiation_build
        if (build is None or self.state != States.NOT_SUBSTANTIATED
                or not self._substantiation_notifier):
            return
        # buildbot (4.3) drops the build it was to substantiate for when an
        # insubstantiation queued ahead of this one already ended the instance: the
        # build would wait for a substantiation nobody starts.
        if self._stopping or getattr(build, "stopped", False):
            self._fireSubstantiationNotifier(
                failure.Failure(LatentWorkerSubstantiatiationCancelled()))
            return
        log.msg(f"{self}: substantiating for the build left waiting by an insubstantiation")
        self.substantiate(None, build).addErrback(lambda _: None)  # failures are logged

    @defer.inlineCallbacks
    def stop_instance(self, fast: bool = False) -> Any:
        self._prewarm_timer.cancel()
        instance, self.instance = self.instance, None
        self.resetWorkerPropsOnStop()
        if instance is None:
            return True
        self.fleet.monitor.unwatch(instance.instance_id, self.name)
        cancelled = self._stopping or (self.group is not None and self.group.terminating)
        if not self._connected and not cancelled:
            if not self._failure_counted:
                self._count_failure("never_connected", "the worker never connected")
            output = self._failed_console
            if output is None:
                output = yield console.output(instance, self.password, str(self))
            console.log_never_connected(str(self), instance, output)
        if self.group is not None:
            self._leave_slot(self.group, instance)
            return True
        idle, self._idle_stop = self._idle_stop, False
        reuse = idle and ending.stops_for_reuse(
            self.fleet, idle_action=self.idle_action, connected=self._connected,
            cancelled=cancelled)
        yield ending.end(self.fleet, instance, self._launcher(), self.pool, reuse=reuse,
                         log_prefix=str(self))
        return True

    def _soft_disconnect(self, fast: bool = False, stopping_service: bool = False) -> Any:
        # The idle timer's way out (and build_wait_timeout=0's): the one that may stop.
        self._idle_stop = not stopping_service
        return super()._soft_disconnect(fast, stopping_service)

    def _leave_slot(self, group: InstanceGroup, instance: LaunchedInstance) -> None:
        """This slot's container is spent (build done, container lost) or never came."""
        if group.instance is not instance or group.terminating or self._stopping:
            return
        if not self._connected:
            # Not waited for: shutting the group down releases this very worker.
            self._deferwaiter.add(group.shutdown(f"{self.name}'s container never connected"))
            return
        self.recycling = True
        self.arm()
