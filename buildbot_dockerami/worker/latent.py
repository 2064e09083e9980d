"""The buildbot glue: DockerAMILatentWorker turns substantiate/insubstantiate into
EC2 launches and terminations of a plain base AMI whose user data names an image."""

from __future__ import annotations

import copy
import warnings
from typing import Any

from buildbot import config
from buildbot.interfaces import (
    LatentWorkerFailedToSubstantiate,
    LatentWorkerSubstantiatiationCancelled,
)
from buildbot.util import Notifier
from buildbot.util.latent import CompatibleLatentWorkerMixin
from buildbot.warnings import ConfigWarning
from buildbot.worker.latent import AbstractLatentWorker, States
from twisted.internet import defer
from twisted.python import failure, log

from buildbot_dockerami import patches
from buildbot_dockerami.cloud import address
from buildbot_dockerami.cloud.ec2 import Credentials
from buildbot_dockerami.config.checks import (
    accepted_keywords,
    buildbot_settings,
    cache_builds_problems,
    settings_problems,
    settings_warnings,
)
from buildbot_dockerami.config.model import FLEET_WIDE, WorkerSettings
from buildbot_dockerami.fleet import boot_state, console, ending, metrics, retirement
from buildbot_dockerami.fleet.launch import (
    LaunchedInstance,
)
from buildbot_dockerami.fleet.service import Fleet
from buildbot_dockerami.fleet.shared_instance import InstanceGroup
from buildbot_dockerami.protocol import imageready
from buildbot_dockerami.worker import on_request
from buildbot_dockerami.worker.connections import Connections
from buildbot_dockerami.worker.launching import Launching
from buildbot_dockerami.worker.losses import Losses
from buildbot_dockerami.worker.retiring import Retiring
from buildbot_dockerami.worker.scheduling import Scheduling

DEFAULT_BUILD_WAIT_TIMEOUT = 10 * 60


class DockerAMILatentWorker(Launching, Connections, Losses, Retiring, Scheduling,
                            CompatibleLatentWorkerMixin, AbstractLatentWorker):
    """A latent worker that boots a base AMI which runs ``image`` as the worker.

    Settings are described in docs/configuration.md; every one of them is applied
    again on ``buildbot reconfig`` and used from the next launch on. This class keeps
    the configuration and buildbot's start/check/stop of an instance; the rest of
    buildbot's hooks are in the mixins of its bases, one module each under worker/
    (launching, connections, losses, retiring, scheduling), over the fleet service.
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
    #: This substantiation launched (or started) the instance: its connection measures
    #: the pool's provisioning time (fleet/provisioning.py).
    _launched_for_request = False
    #: A container slot waiting for the fresh container that replaces its last one.
    recycling = False
    #: The user's build_wait_timeout (buildbot's is forced to 0 under isolation).
    idle_timeout: float = DEFAULT_BUILD_WAIT_TIMEOUT
    #: This insubstantiation is the idle timeout's (the instance may be stopped).
    _idle_stop = False
    pool: str | None = None
    #: Why the last launch or boot failed, for the Fleet page.
    last_failure = ""
    #: Settings buildbot renders through the secrets providers before reconfigService
    #: (a class attribute: methods still see the ``secrets`` module).
    secrets = ["identifier", "secret_identifier"]
    credentials: Credentials | None = None

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
        problems = settings_problems(name, password, settings) + cache_builds_problems(
            settings, kwargs.get("max_builds"))
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
        patches.at_configure(self.master)
        # Rendered by buildbot (``secrets`` above) before they get here.
        self.credentials = None if settings.identifier is None else Credentials(
            settings.identifier, settings.secret_identifier)
        self.fleet = Fleet.of(self.master)
        on_request.attach(self.fleet, self.master)
        self.idle_timeout = kwargs.get("build_wait_timeout", DEFAULT_BUILD_WAIT_TIMEOUT)
        self.group = yield self.fleet.register(self, settings, self.idle_timeout)
        if settings.isolation != "none":
            # Every build ends its worker's connection: the container or instance is spent.
            kwargs["build_wait_timeout"] = 0
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

    # -- the instance: buildbot's AbstractLatentWorker contract -------------------

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
        self._launched_for_request = False
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
        self._on_connect = connected = defer.Deferred()
        try:
            state = yield boot_state.check(
                self.fleet.monitor, instance, self.check_instance_interval * 0.8, connected,
                password=self.password, log_prefix=str(self))
        finally:
            self._on_connect = None
        if self.conn is not None or self.instance is not instance:
            return (True, "")  # connected (or gone) meanwhile: not a booting instance now
        if state.status is not None and state.status.state == "running":
            self.timeline.setdefault("running", self.master.reactor.seconds())
        if not state.ok:
            self._count_failure(state.failure, state.reason)
            self._failed_console = state.console  # logged in full by stop_instance
        return (state.ok, state.reason)

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

    @property
    def stopping(self) -> bool:
        """The worker is being removed or the master stops: no new instance for it."""
        return self._stopping

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
        yield self.fleet.unregister(self)

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
                self._count_failure(metrics.NEVER_CONNECTED, "the worker never connected")
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
        yield ending.end(self.fleet, instance, self._launcher(), self.pool, key=self.name,
                         reuse=reuse, log_prefix=str(self))
        return True

    def _soft_disconnect(self, fast: bool = False, stopping_service: bool = False) -> Any:
        # The idle timer's way out (and build_wait_timeout=0's): the one that may stop.
        self._idle_stop = not stopping_service
        return super()._soft_disconnect(fast, stopping_service)

    def _leave_slot(self, group: InstanceGroup, instance: LaunchedInstance) -> None:
        """This slot's container is spent (build done, container lost) or never came."""
        if group.instance is not instance or group.terminating or self._stopping:
            return
        if retirement.retired(instance):  # its bootstrap retired it: it ends once no slot builds
            group.end_if_retired()
            return
        if not self._connected:
            # Not waited for: shutting the group down releases this very worker.
            self._deferwaiter.add(group.shutdown(f"{self.name}'s container never connected"))
            return
        self.recycling = True
        self.arm()
