"""The per-master fleet service: what one master's DockerAMILatentWorkers share.

One ``Fleet`` runs per buildbot master, as a buildbot ``SharedService`` (the idiom of
buildbot's ``KubeClientService``): the first worker to be configured attaches it to the
master, later ones find it; it starts with the master and, as a shared service, stops
after every other service, so the workers' last terminations still have its EC2 clients
and retries. It holds the EC2 clients, the batched boot monitor (monitor.py), reliable
termination (termination.py), the reconciler loop (reconciler.py), the shared instances
of slot workers (shared_instance.py), pool counts and warm pools, and the fleet-wide
settings (``FleetSettings``, worker/fleet_settings.py).

The workers are what it serves, seen through ``FleetWorker`` (members.py); it never
imports buildbot's worker or process modules.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

from buildbot.util import service
from twisted.internet import defer, threads
from twisted.python import failure, log
from twisted.python.threadpool import ThreadPool

from buildbot_dockerami.cloud import instances
from buildbot_dockerami.cloud.ec2 import CALLS_AT_ONCE, DEFAULT_TIMEOUT, AsyncEc2, Ec2
from buildbot_dockerami.cloud.image_digests import (
    AsyncImageDigests,
    ImageDigests,
    token_services,
)
from buildbot_dockerami.fleet import fallback, multimaster, pools, schedule, stopped_pool
from buildbot_dockerami.fleet.history import History
from buildbot_dockerami.fleet.holdings import Holdings
from buildbot_dockerami.fleet.image_refresh import DEFAULT_INTERVAL as DEFAULT_IMAGE_INTERVAL
from buildbot_dockerami.fleet.image_refresh import ImageRefresh
from buildbot_dockerami.fleet.members import FleetWorker
from buildbot_dockerami.fleet.metrics import Metrics
from buildbot_dockerami.fleet.monitor import StateMonitor
from buildbot_dockerami.fleet.provisioning import ProvisioningTimes
from buildbot_dockerami.fleet.reconciler import Reconciler
from buildbot_dockerami.fleet.refresh import DEFAULT_INTERVAL as DEFAULT_REFRESH_INTERVAL
from buildbot_dockerami.fleet.refresh import AmiRefresh
from buildbot_dockerami.fleet.shared_instance import InstanceGroup
from buildbot_dockerami.fleet.spending import Spending
from buildbot_dockerami.fleet.termination import Terminator


class Fleet(service.SharedService):
    """Everything one master shares across its workers."""

    #: One per master, whatever it is asked with (buildbot names shared services by
    #: their arguments).
    SERVICE_NAME = "dockerami-fleet"

    @classmethod
    def getName(cls, *args: Any, **kwargs: Any) -> str:
        return cls.SERVICE_NAME

    @classmethod
    def of(cls, master: Any) -> Fleet:
        """This master's fleet, attached to it (and started with it) the first time.

        Synchronous, unlike ``getService``, for the web plugin's readers too; like it,
        the service is put first among the master's children so it is stopped last."""
        fleet = master.namedServices.get(cls.SERVICE_NAME)
        if fleet is None:
            fleet = cls(master.reactor, master.name, master)
            fleet.name = cls.SERVICE_NAME
            fleet.setServiceParent(master).addErrback(log.err, "dockerami: fleet start")
            master.services.remove(fleet)
            master.services.insert(0, fleet)
        return fleet

    def __init__(self, reactor: Any, master_name: str, master: Any = None) -> None:
        super().__init__()
        self.reactor = reactor
        self.master_id = instances.master_id(master_name)
        self.monitor = StateMonitor(clock=reactor.seconds)
        self._pool: ThreadPool | None = None
        self._clients: dict[Hashable, AsyncEc2] = {}
        self._creating: dict[Hashable, list[defer.Deferred]] = {}
        self.terminator = Terminator(reactor, self.monitor, lambda: self.stopping)
        self.metrics = Metrics()
        #: What this master holds (holdings.py); the names below are the same objects.
        self.holdings = Holdings(stopped_pool.StoppedPool(clock=reactor.seconds))
        #: This master's DockerAMILatentWorkers, for the operator surface.
        self.workers = self.holdings.workers
        self.groups: dict[str, InstanceGroup] = self.holdings.groups
        #: ClientToken -> owner of every RunInstances call still in flight.
        self.launching = self.holdings.launching
        #: Idle instances stopped for reuse (idle_action='stop').
        self.stopped = self.holdings.stopped
        #: Per pool: runtime limits (pools.PoolLimits), and the keeper of warm capacity.
        self.pool_limits: dict[str, Any] = {}
        self.keeper: Any = None
        #: Per pool: the configured warm minimum (worker_pool's min_warm, schedule.py),
        #: and the spec it was parsed from.
        self.warm_schedules: dict[str, schedule.Schedule] = {}
        self._warm_specs: dict[str, Any] = {}
        #: Per pool: recent provisioning times, the lead of a scheduled warm minimum.
        self.provisioning = ProvisioningTimes()
        #: Called when an instance is gone, so builds waiting on a pool cap can start.
        self.after_release: Callable[[], Any] = lambda: None
        #: Instances in use per pool, for O(1) cap checks.
        self.in_use = pools.InUse()
        self.reconciler = Reconciler(reactor, self.master_id, self.holdings,
                                     terminator=self.terminator, metrics=self.metrics,
                                     stopping=lambda: self.stopping)
        #: The newest image of each worker's ami_filters, asked on a bound (refresh.py).
        self.refresh = AmiRefresh(reactor.seconds)
        #: What each image tag points at, asked of its registry on a bound
        #: (image_refresh.py), in the fleet's thread pool.
        self._digests = ImageDigests()
        self.image_refresh = ImageRefresh(
            reactor.seconds, AsyncImageDigests(reactor, self._digests, pool=self._thread_pool))
        #: Capacity options EC2 recently refused, shared by every worker.
        self.cooldown = fallback.CoolDown()
        self._stopping = False
        #: FleetSettings' values (config.model.FleetWide); None: not configured.
        self.configured: Any = None
        #: The master's botmaster: its ``shuttingDown`` says the master is stopping.
        self.botmaster: Any = getattr(master, "botmaster", None)
        if self.botmaster is not None:
            self.after_release = self.botmaster.maybeStartBuildsForAllBuilders
        #: This master's part in the fleet all masters share (multimaster.Coordinator).
        self.shared: multimaster.Coordinator | None = None
        #: The scheduling pass due when single-master pool reservations lapse.
        self.reservation_wakeup: Any = None
        #: Launches idle workers for queued build requests (one master only); made and
        #: started by the glue (worker/on_request.py), stopped with the fleet.
        self.demand: Any = None
        #: Instances by state over the last hours, sampled on this clock (history.py).
        self.history = History.of(self)
        #: On-demand prices from the www plugin's older ``prices`` setting (www/__init__.py).
        self.page_prices: dict[str, float] = {}
        #: Prices, each build's share, the cost counter and the day's total (spending.py).
        self.spending = Spending(reactor, self.holdings, self.metrics, self.prices,
                                 lambda: iter(sorted(self.pool_limits)))

    def startService(self) -> Any:
        d = super().startService()
        self.history.start()
        master = self.master
        if master is not None and getattr(master.config, "multiMaster", False):
            # Several masters share pools and reclaim each other's instances.
            self.shared = multimaster.Coordinator(self, master)
            self.shared.start()
        self.spending.start()
        return d

    def stopService(self) -> Any:
        """Last of the master's services: its workers have ended their instances."""
        self.begin_stopping()
        self._stop()
        return super().stopService()

    # -- the workers it serves -------------------------------------------------------

    @defer.inlineCallbacks
    def register(self, worker: FleetWorker, settings: Any, idle_timeout: float) -> Any:
        """A worker was (re)configured with ``settings`` (config.model.WorkerSettings):
        serve it. Its EC2 client is built now (once for all workers sharing it), not by
        the first launch of a burst; its pool's limits are loaded and kept; a slot worker
        (isolation='container') joins its group, whose shared instance it returns."""
        self.workers.add(worker)
        self.worker_configured(settings)
        worker.ec2_client().addErrback(
            lambda f: log.msg(f"{worker}: no EC2 client yet: {f.getErrorMessage()}"))
        pool = settings.pool
        if pool is not None:
            self._configure_warm(pool, settings.min_warm, worker.name)
            if pool not in self.pool_limits:
                self.pool_limits[pool] = yield pools.load_limits(self.master, pool)
            if self.keeper is None:
                self.keeper = pools.PoolKeeper(self)
            self.keeper.start()
        group = worker.group
        name = settings.instance_group or worker.name
        if group is not None and (settings.isolation != "container" or group.name != name):
            group.members.pop(worker.name, None)
            group = None
        if settings.isolation == "container":
            group = self.group(name)
            group.join(worker)
            group.idle_timeout = idle_timeout
        return group

    def _configure_warm(self, pool: str, spec: Any, worker: str) -> None:
        """The pool's configured warm minimum, as its workers carry it (worker_pool gives
        all of them the same; workers made by hand: the one configured last)."""
        previous = self._warm_specs.get(pool)
        if pool in self._warm_specs and previous == spec:
            return
        self._warm_specs[pool] = spec
        try:
            parsed = None if spec is None else schedule.parse(spec)
        except schedule.ScheduleError as e:  # checkconfig refused it already
            log.msg(f"dockerami: pool {pool}: min_warm of {worker}: {e}")
            parsed = None
        if parsed is None:
            self.warm_schedules.pop(pool, None)
        else:
            self.warm_schedules[pool] = parsed
        if spec is not None or previous is not None:
            log.msg(f"dockerami: pool {pool}: configured warm minimum {spec!r} "
                    f"(from {worker})")

    @defer.inlineCallbacks
    def unregister(self, worker: FleetWorker) -> Any:
        """A worker's service stops (master shutdown, removed by reconfig)."""
        self.workers.discard(worker)
        self.in_use.forget(worker)
        if worker.group is not None:
            yield worker.group.leave(worker)

    # -- fleet-wide settings ---------------------------------------------------------

    def configure(self, settings: Any) -> None:
        """The fleet-wide settings (config.model.FleetWide) from ``FleetSettings`` in
        ``c['services']``, or None when it is not (or no longer) configured."""
        self.configured = settings
        self._apply_settings()

    def worker_configured(self, worker_settings: Any) -> None:
        """A worker was (re)configured. Without FleetSettings its own fleet-wide keywords
        (deprecated) still apply, as they did: the smallest reconcile_interval of any
        worker; the stopped-pool limits of the worker configured last."""
        if self.configured is None:
            self.stopped.max_count = worker_settings.max_stopped
            self.stopped.max_age = worker_settings.max_stopped_age
        self._apply_settings()

    def setting(self, worker_settings: Any, name: str) -> Any:
        """A fleet-wide setting as it applies to a worker: FleetSettings' if configured,
        else the worker's own (deprecated) keyword or its default."""
        source = self.configured if self.configured is not None else worker_settings
        return getattr(source, name)

    def _apply_settings(self) -> None:
        settings = self.configured
        if settings is not None:
            self.stopped.max_count = settings.max_stopped
            self.stopped.max_age = settings.max_stopped_age
            self.refresh.interval = settings.ami_refresh_interval
            self.image_refresh.interval = settings.image_refresh_interval
            self._digests.token_services = token_services(settings.registry_token_services)
            interval = settings.reconcile_interval
        else:
            self.refresh.interval = DEFAULT_REFRESH_INTERVAL
            self.image_refresh.interval = DEFAULT_IMAGE_INTERVAL
            self._digests.token_services = {}
            intervals = [w.settings.reconcile_interval for w in list(self.workers)]
            if not intervals:
                return
            interval = min(intervals)
        self.reconciler.start(interval)

    def prices(self) -> dict[str, float]:
        """The operator's prices (instance type -> on-demand USD per hour, and
        ``stopped``): FleetSettings' over the www plugin's older setting."""
        configured = getattr(self.configured, "prices", None) or {}
        return {**self.page_prices, **configured}

    def group(self, name: str) -> InstanceGroup:
        """The shared instance of the slot workers named for ``name``."""
        if name not in self.groups:
            self.groups[name] = InstanceGroup(name, self.reactor, self.terminator,
                                              self.holdings, self.released)
        return self.groups[name]

    def _thread_pool(self) -> ThreadPool:
        if self._pool is None:
            self._pool = ThreadPool(minthreads=0, maxthreads=CALLS_AT_ONCE, name="dockerami-ec2")
            self._pool.start()
        return self._pool

    @property
    def stopping(self) -> bool:
        """The master is shutting down: launch nothing, give up quickly."""
        return self._stopping or bool(getattr(self.botmaster, "shuttingDown", False))

    def begin_stopping(self) -> None:
        self._stopping = True
        if self.reservation_wakeup is not None and self.reservation_wakeup.active():
            self.reservation_wakeup.cancel()
        if self.demand is not None:
            self.demand.stop()
        self.spending.stop()
        self.reconciler.stop()
        self.history.stop()
        if self.shared is not None:
            self.shared.stop()

    def _stop(self) -> None:
        """After begin_stopping, once nothing will terminate through the fleet any more."""
        self.terminator.stop()
        if self._pool is not None:
            self._pool.stop()
            self._pool = None

    def client(self, region: str | None, endpoint_url: str | None, session: Any,
               timeout: float = DEFAULT_TIMEOUT, credentials: Any = None) -> defer.Deferred:
        """An AsyncEc2 for these settings, shared by every worker that uses them.

        Built in a thread (botocore reads config files and endpoint data, ~0.2 CPU-s),
        once: callers arriving while it is built wait for the same one. Workers ask
        for it at (re)configuration, so the first launch of a burst does not pay.
        """
        key = (region, endpoint_url, id(session) if session is not None else None, timeout,
               credentials)
        if key in self._clients:
            return defer.succeed(self._clients[key])
        if key not in self._creating:
            pool = self._thread_pool()
            metrics = self.metrics
            d = threads.deferToThreadPool(
                self.reactor, pool, Ec2, region, endpoint_url, session,
                lambda op: metrics.inc("dockerami_ec2_requests_total", {"operation": op}),
                lambda op: metrics.inc("dockerami_ec2_throttles_total", {"operation": op}),
                timeout=timeout,
                credentials=credentials,
            )
            self._creating[key] = []
            d.addBoth(self._client_created, key, pool)
        waiter: defer.Deferred = defer.Deferred()
        self._creating[key].append(waiter)
        return waiter

    def clients(self, skipping: str | None = None) -> defer.Deferred:
        """The distinct EC2 clients of this master's workers (Holdings.clients)."""
        return self.holdings.clients(skipping)

    def _client_created(self, result: Any, key: Hashable, pool: ThreadPool) -> None:
        waiters = self._creating.pop(key, [])
        if isinstance(result, failure.Failure):
            for waiter in waiters:  # the next caller tries again
                waiter.errback(result)
            return
        client = self._clients.setdefault(key, AsyncEc2(result, pool, self.reactor))
        for waiter in waiters:
            waiter.callback(client)

    def released(self, pool: str | None, group: Any = None, *, key: str | None = None) -> None:
        """An instance of ``pool`` is gone: a slot group's, or the worker ``key``'s. Only
        a cap holds builds back until then, so only then is buildbot asked to schedule
        again (a pass over every builder), and the other masters told."""
        if group is not None:
            self.in_use.group_changed(group)
            key = group.name
        if pools.capped(pool, self):
            self.after_release()
            if self.shared is not None and key is not None:
                self.shared.freed(key)

    def stopped_for_reuse(self, pool: str | None, key: str) -> None:
        """The worker ``key``'s instance was stopped for reuse: any worker's build may
        start it again, so buildbot schedules again whatever the caps; it no longer
        counts against its pool's cap, so with one the other masters are told, as for
        a termination."""
        self.after_release()
        if pools.capped(pool, self) and self.shared is not None:
            self.shared.freed(key)

    def tracked(self) -> dict[str, list[Any]]:
        """Instance id -> the workers (or slot groups) that own it (Holdings.tracked)."""
        return self.holdings.tracked()

    @defer.inlineCallbacks
    def find_launch(self, client: AsyncEc2, token: str) -> Any:
        """The instance a RunInstances call with this ClientToken created, or None."""
        found = yield client.describe_tagged(instances.LAUNCH_TAG, token)
        live = [s for s in found.values() if s.state not in instances.GONE_STATES]
        return live[0] if live else None

    def terminate(self, client: AsyncEc2, instance_id: str) -> defer.Deferred:
        """Terminate and confirm (termination.Terminator: retried until it is)."""
        return self.terminator.terminate(client, instance_id)

    def in_progress(self, instance_id: str) -> bool:
        """Whether this master is already ending the instance (or retrying to)."""
        return self.terminator.in_progress(instance_id)

    def ending_or_ended(self, instance_id: str) -> bool:
        """Whether this master is ending the instance or has ended it."""
        return self.terminator.ending_or_ended(instance_id)

    @property
    def undead(self) -> list[str]:
        """Instances whose termination failed, still retried in the background."""
        return self.terminator.undead
