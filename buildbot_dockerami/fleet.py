"""Per-master fleet state: EC2 clients, the batched boot monitor, reliable termination.

One ``Fleet`` exists per buildbot master and is shared by all its
DockerAMILatentWorkers, so that booting instances are checked with one
DescribeInstances per interval for the whole master, and instances whose
termination failed are retried in the background instead of forgotten.
Knows nothing of builds.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Hashable
from typing import Any, Protocol

from botocore.exceptions import ClientError
from twisted.internet import defer, task, threads
from twisted.python import failure, log
from twisted.python.threadpool import ThreadPool

from buildbot_dockerami import (
    demand,
    fallback,
    heap,
    multimaster,
    policy,
    pools,
    reconcile,
    warmpool,
)
from buildbot_dockerami.cloud import DEFAULT_TIMEOUT, AsyncEc2, CloudError, Ec2
from buildbot_dockerami.metrics import Metrics
from buildbot_dockerami.policy import InstanceStatus

#: How often instances whose termination failed are tried again.
UNDEAD_RETRY_SECONDS = 60.0
#: Attempts at a termination while the master stops: the reconciler of its next life
#: ends what these miss, and a stopping master must not wait for an outage to end.
STOPPING_ATTEMPTS = 2


def _is_not_found(error: BaseException) -> bool:
    return isinstance(error, ClientError) and error.response.get("Error", {}).get(
        "Code", ""
    ).startswith("InvalidInstanceID")


class StateMonitor:
    """Answers "what state is instance X in?" with at most one DescribeInstances per
    client per ``max_age`` however many workers ask, and shares in-flight calls."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._watched: dict[str, tuple[AsyncEc2, float]] = {}
        self._watchers: dict[str, set[str]] = {}
        self._cache: dict[str, InstanceStatus] = {}
        self._polled_at: dict[AsyncEc2, float] = {}
        self._waiters: dict[AsyncEc2, list[defer.Deferred]] = {}

    def watch(self, client: AsyncEc2, instance_id: str, watcher: str = "") -> None:
        """Start checking ``instance_id``; several watchers (slots) may share one instance."""
        if instance_id not in self._watched:
            self._watched[instance_id] = (client, self._clock())
        self._watchers.setdefault(instance_id, set()).add(watcher)

    def unwatch(self, instance_id: str, watcher: str | None = None) -> None:
        """Stop checking for ``watcher`` (None: for everyone)."""
        watchers = self._watchers.get(instance_id, set())
        if watcher is None:
            watchers.clear()
        watchers.discard(watcher or "")
        if not watchers:
            self._watchers.pop(instance_id, None)
            self._watched.pop(instance_id, None)
            self._cache.pop(instance_id, None)

    def seconds_since_watch(self, instance_id: str) -> float:
        _, since = self._watched.get(instance_id, (None, self._clock()))
        return self._clock() - since

    @defer.inlineCallbacks
    def status(self, instance_id: str, max_age: float) -> Any:
        """The instance's latest status, or None if EC2 does not (yet) know it."""
        if instance_id not in self._watched:
            return None
        client, _ = self._watched[instance_id]
        stale = self._clock() - self._polled_at.get(client, float("-inf")) > max_age
        if stale or client in self._waiters:
            yield self._poll(client)
        return self._cache.get(instance_id)

    def _poll(self, client: AsyncEc2) -> defer.Deferred:
        waiter: defer.Deferred = defer.Deferred()
        waiting = self._waiters.setdefault(client, [])
        waiting.append(waiter)
        if len(waiting) == 1:
            self._polled_at[client] = self._clock()
            ids = [iid for iid, (c, _) in self._watched.items() if c is client]
            d = client.describe(ids)
            d.addBoth(self._poll_done, client, ids)
        return waiter

    def _poll_done(self, result: Any, client: AsyncEc2, ids: list[str]) -> None:
        if isinstance(result, dict):
            for iid in ids:
                if iid in result:
                    self._cache[iid] = result[iid]
                else:
                    self._cache.pop(iid, None)
        else:
            # A failed poll must be retried by the next caller, not cached as fresh.
            self._polled_at.pop(client, None)
            log.msg(f"dockerami: DescribeInstances failed: {result.getErrorMessage()}")
        for waiter in self._waiters.pop(client, []):
            if isinstance(result, dict):
                waiter.callback(None)
            else:
                waiter.errback(result)


class Fleet:
    """Everything one master shares across its workers."""

    _by_master: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @classmethod
    def for_master(cls, master: Any) -> Fleet:
        fleet = cls._by_master.get(master)
        if fleet is None:
            fleet = cls(master.reactor, master.name)
            master.reactor.addSystemEventTrigger("before", "shutdown", fleet.begin_stopping)
            cls._by_master[master] = fleet
            if getattr(master.config, "multiMaster", False):
                # Several masters share pools and reclaim each other's instances.
                fleet.shared = multimaster.Coordinator(fleet, master)
                fleet.shared.start()
            else:
                fleet.demand = demand.LaunchOnRequest(fleet, master)
                fleet.demand.start().addErrback(log.err, "dockerami: launch on request")
            heap.freeze_after_startup(master.reactor)
        return fleet

    def __init__(self, reactor: Any, master_name: str) -> None:
        self.reactor = reactor
        self.master_id = policy.master_id(master_name)
        self.monitor = StateMonitor(clock=reactor.seconds)
        self._pool: ThreadPool | None = None
        self._clients: dict[Hashable, AsyncEc2] = {}
        self._creating: dict[Hashable, list[defer.Deferred]] = {}
        self._undead: dict[str, AsyncEc2] = {}
        self._undead_loop: task.LoopingCall | None = None
        self.groups: dict[str, InstanceGroup] = {}
        self.metrics = Metrics()
        #: This master's DockerAMILatentWorkers, for the operator surface.
        self.workers: weakref.WeakSet = weakref.WeakSet()
        #: Per pool: runtime limits (pools.PoolLimits), and the keeper of warm capacity.
        self.pool_limits: dict[str, Any] = {}
        self.keeper: Any = None
        #: Called when an instance is gone, so builds waiting on a pool cap can start.
        self.after_release: Callable[[], Any] = lambda: None
        #: Instances in use per pool, for O(1) cap checks.
        self.in_use = pools.InUse()
        #: ClientToken -> owner of every RunInstances call still in flight.
        self.launching: dict[str, str] = {}
        self.reconciler = Reconciler(self)
        #: Capacity options EC2 recently refused, shared by every worker.
        self.cooldown = fallback.CoolDown()
        #: Idle instances stopped for reuse (idle_action='stop').
        self.stopped = warmpool.StoppedPool()
        self._stopping = False
        #: The master's botmaster: its ``shuttingDown`` says the master is stopping.
        self.botmaster: Any = None
        #: Instance id -> the callers waiting for its termination in progress.
        self._terminations: dict[str, list[defer.Deferred]] = {}
        #: This master's part in the fleet all masters share (multimaster.Coordinator).
        self.shared: multimaster.Coordinator | None = None
        #: Launches idle workers for queued build requests (one master only).
        self.demand: demand.LaunchOnRequest | None = None

    def group(self, name: str) -> InstanceGroup:
        """The shared instance of the slot workers named for ``name``."""
        if name not in self.groups:
            self.groups[name] = InstanceGroup(self, name)
        return self.groups[name]

    def _thread_pool(self) -> ThreadPool:
        if self._pool is None:
            self._pool = ThreadPool(minthreads=0, maxthreads=8, name="dockerami-ec2")
            self._pool.start()
            self.reactor.addSystemEventTrigger("during", "shutdown", self._stop)
        return self._pool

    @property
    def stopping(self) -> bool:
        """The master is shutting down: launch nothing, give up quickly."""
        return self._stopping or bool(getattr(self.botmaster, "shuttingDown", False))

    def begin_stopping(self) -> None:
        self._stopping = True
        if self.demand is not None:
            self.demand.stop()
        self.reconciler.stop()
        if self.shared is not None:
            self.shared.stop()

    def _stop(self) -> None:
        self.reconciler.stop()
        if self.shared is not None:
            self.shared.stop()
        if self._undead:
            log.msg(
                "dockerami: master stopping with instances whose termination failed: "
                + ", ".join(sorted(self._undead))
            )
        if self._undead_loop is not None and self._undead_loop.running:
            self._undead_loop.stop()
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

    def _client_created(self, result: Any, key: Hashable, pool: ThreadPool) -> None:
        waiters = self._creating.pop(key, [])
        if isinstance(result, failure.Failure):
            for waiter in waiters:  # the next caller tries again
                waiter.errback(result)
            return
        client = self._clients.setdefault(key, AsyncEc2(result, pool, self.reactor))
        for waiter in waiters:
            waiter.callback(client)

    def released(self, pool: str | None, group: Any = None) -> None:
        """An instance of ``pool`` is gone. Only a cap holds builds back until then, so
        only then is buildbot asked to schedule again (a pass over every builder)."""
        if group is not None:
            self.in_use.group_changed(group)
        if pools.capped(pool, self):
            self.after_release()

    def tracked(self) -> dict[str, list[Any]]:
        """Instance id -> the workers (or slot groups) that own it."""
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
    def find_launch(self, client: AsyncEc2, token: str) -> Any:
        """The instance a RunInstances call with this ClientToken created, or None."""
        found = yield client.describe_tagged(policy.LAUNCH_TAG, token)
        live = [s for s in found.values() if s.state not in policy.GONE_STATES]
        return live[0] if live else None

    def terminate(self, client: AsyncEc2, instance_id: str) -> defer.Deferred:
        """Terminate and confirm, retrying with backoff. If it still fails, the instance
        is kept on a list retried every minute and the error is raised to the caller.
        Callers asking while a termination is in progress share it."""
        mine: defer.Deferred = defer.Deferred()
        waiters = self._terminations.get(instance_id)
        if waiters is not None:
            waiters.append(mine)
            return mine
        waiters = self._terminations[instance_id] = [mine]

        def finish(result: Any) -> None:
            self._terminations.pop(instance_id, None)
            for waiter in waiters:
                if isinstance(result, failure.Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(result)
        self._terminate(client, instance_id).addBoth(finish)
        return mine

    def in_progress(self, instance_id: str) -> bool:
        """Whether this master is already ending the instance (or retrying to)."""
        return instance_id in self._terminations or instance_id in self._undead

    @defer.inlineCallbacks
    def _terminate(self, client: AsyncEc2, instance_id: str) -> Any:
        self.monitor.unwatch(instance_id)
        delays = policy.retry_delays(attempts=STOPPING_ATTEMPTS if self.stopping else 6)
        while True:
            try:
                states = yield client.terminate([instance_id])
                state = states.get(instance_id)
                if state not in policy.GONE_STATES:
                    status = (yield client.describe([instance_id])).get(instance_id)
                    state = status.state if status else "terminated"
                if state in policy.GONE_STATES:
                    self._undead.pop(instance_id, None)
                    return state
                error = f"instance is still {state} after TerminateInstances"
            except Exception as e:
                if _is_not_found(e):
                    self._undead.pop(instance_id, None)
                    return "terminated"
                error = str(e)
            delay = next(delays, None)
            if delay is None:
                if self.stopping:
                    raise CloudError(f"could not terminate {instance_id} while stopping "
                                     f"({error}); the next start's reconciler will")
                self._remember_undead(client, instance_id)
                raise CloudError(f"could not terminate {instance_id}: {error}")
            log.msg(
                f"dockerami: terminating {instance_id} failed ({error}); retrying in {delay:.0f}s"
            )
            yield task.deferLater(self.reactor, delay, lambda: None)

    def _remember_undead(self, client: AsyncEc2, instance_id: str) -> None:
        self._undead[instance_id] = client
        log.msg(
            f"dockerami: ERROR: {instance_id} could not be terminated; it stays on the "
            f"retry list (every {UNDEAD_RETRY_SECONDS:.0f}s) until it is"
        )
        if self._undead_loop is None:
            self._undead_loop = task.LoopingCall(self._retry_undead)
            self._undead_loop.clock = self.reactor
            self._undead_loop.start(UNDEAD_RETRY_SECONDS, now=False)

    @defer.inlineCallbacks
    def _retry_undead(self) -> Any:
        for instance_id, client in list(self._undead.items()):
            try:
                states = yield client.terminate([instance_id])
                if states.get(instance_id) in policy.GONE_STATES:
                    log.msg(f"dockerami: {instance_id} finally terminated")
                    self._undead.pop(instance_id, None)
            except Exception as e:
                if _is_not_found(e):
                    self._undead.pop(instance_id, None)
                else:
                    log.msg(f"dockerami: {instance_id} still not terminated: {e}")

    @property
    def undead(self) -> list[str]:
        return sorted(self._undead)


class Reconciler:
    """Compares EC2's view of every instance tagged for this master with what the
    workers track, once at start-up and then every ``interval`` seconds, with one
    DescribeInstances per EC2 endpoint however many workers and readers there are.
    The decisions are reconcile.plan's; a failed poll only delays them."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.interval = reconcile.DEFAULT_INTERVAL
        #: Instance id -> (client, status) as last seen; what the status page shows.
        self.view: dict[str, tuple[AsyncEc2, InstanceStatus]] = {}
        self.checked_at: float | None = None
        self.last_error = ""
        self.passes = 0
        self._loop: task.LoopingCall | None = None
        self._running: defer.Deferred | None = None
        self._first: Any = None
        #: Untracked instances of the last pass: terminated if still untracked now.
        self._suspects: set[str] = set()

    def start(self, interval: float, first_delay: float = 1.0) -> None:
        """(Re)start with the shortest interval any worker asked for. The first pass
        waits ``first_delay`` so that every worker of the config is known to it."""
        if self._loop is not None and self._loop.running and interval == self.interval:
            return
        self.interval = interval
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = task.LoopingCall(self.tick)
        self._loop.clock = self.fleet.reactor
        if self._first is None and self.passes == 0:
            self._first = self.fleet.reactor.callLater(first_delay, self._start_loop)
        else:
            self._start_loop()

    def _start_loop(self) -> None:
        self._first = None
        if self._loop is not None and not self._loop.running and not self.fleet.stopping:
            self._loop.start(self.interval, now=True).addErrback(log.err, "dockerami reconciler")

    def stop(self) -> None:
        if self._first is not None and self._first.active():
            self._first.cancel()
        self._first = None
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def tick(self) -> defer.Deferred:
        if self.fleet.stopping:
            self.stop()
            return defer.succeed(None)
        if self._running is None:  # never two passes at once
            self._running = self._pass()
            self._running.addBoth(self._done)
        return defer.succeed(None)

    def _done(self, result: Any) -> None:
        self._running = None
        if isinstance(result, failure.Failure):
            log.err(result, "dockerami: reconciler pass")

    @defer.inlineCallbacks
    def _pass(self) -> Any:
        fleet = self.fleet
        clients: list[AsyncEc2] = []
        for worker in list(fleet.workers):
            try:
                client = yield worker.ec2_client()
            except Exception as e:
                log.msg(f"dockerami: reconciler: no EC2 client for {worker.name}: {e}")
                continue
            if client not in clients:
                clients.append(client)
        view: dict[str, tuple[AsyncEc2, InstanceStatus]] = {}
        seen: dict[str, InstanceStatus] = {}
        suspects: set[str] = set()
        errors = []
        for client in clients:
            try:
                found = yield client.describe_tagged(policy.MASTER_TAG, fleet.master_id)
            except Exception as e:
                errors.append(str(e))
                # Not knowing is no reason to act: keep what was last seen.
                view.update({i: v for i, v in self.view.items() if v[0] is client})
                suspects |= {i for i, v in self.view.items()
                             if v[0] is client and i in self._suspects}
                continue
            view.update({iid: (client, status) for iid, status in found.items()})
            # Judged on what is tracked and in flight now, after the answer: a launch
            # stops being in flight only once its worker tracks the instance.
            tracked = fleet.tracked()
            decided = reconcile.plan(found, tracked, fleet.launching, self._suspects)
            suspects |= decided.suspects
            self._act(client, decided, tracked)
            seen.update(found)
        self.view = view
        self._suspects = suspects
        self._retire_stopped()
        self.checked_at = fleet.reactor.seconds()
        self.passes += 1
        if errors:
            self.last_error = "; ".join(errors)
            log.msg(f"dockerami: reconciler: DescribeInstances failed ({self.last_error}); "
                    "decisions wait for the next pass")
        else:
            self.last_error = ""

    def _act(self, client: AsyncEc2, decided: reconcile.Plan,
             tracked: dict[str, list[Any]]) -> None:
        fleet = self.fleet
        for status in decided.terminate:
            if fleet.stopping:
                break
            if fleet.in_progress(status.instance_id):
                continue
            log.msg(f"dockerami: reconciler: terminating {status.instance_id} "
                    f"({status.state}, worker {status.worker or '?'}): tagged for this master "
                    "but no worker tracks it")
            fleet.metrics.inc("dockerami_untracked_terminated_total", {})
            d = fleet.terminate(client, status.instance_id)
            d.addErrback(lambda f, iid=status.instance_id: log.msg(
                f"dockerami: reconciler: terminating {iid} failed: {f.getErrorMessage()}"))
        for status in decided.lost:
            for owner in tracked.get(status.instance_id, []):
                owner.instance_lost(status)

    def _retire_stopped(self) -> None:
        """Stopped instances past ``max_stopped_age`` (or the count) are terminated."""
        fleet = self.fleet
        pool = fleet.stopped
        for entry in warmpool.to_retire(list(pool.entries.values()), fleet.reactor.seconds(),
                                        pool.max_count, pool.max_age):
            pool.take(entry.owner)
            log.msg(f"dockerami: terminating stopped instance {entry.instance_id} of "
                    f"{entry.owner}: beyond max_stopped or max_stopped_age")
            fleet.terminate(entry.instance.client, entry.instance_id).addErrback(
                lambda f: log.msg(f"dockerami: {f.getErrorMessage()}"))

    def terminate_untracked(self, instance_id: str, claimed_by: str) -> None:
        """A worker connected from ``instance_id``, which no worker tracks: end it if
        it is tagged for this master and no launch of ours is still waiting for it."""
        self._terminate_if_untracked(instance_id, claimed_by).addErrback(
            lambda f: log.msg(f"dockerami: could not end {instance_id}: {f.getErrorMessage()}"))

    @defer.inlineCallbacks
    def _terminate_if_untracked(self, instance_id: str, claimed_by: str) -> Any:
        fleet = self.fleet
        clients: list[AsyncEc2] = []
        for worker in list(fleet.workers):
            client = yield worker.ec2_client()
            if client not in clients:
                clients.append(client)
        for client in clients:
            status = (yield client.describe([instance_id])).get(instance_id)
            if status is None:
                continue
            if (status.master != fleet.master_id or instance_id in fleet.tracked()
                    or status.launch_token in fleet.launching
                    or status.state not in reconcile.LIVE_STATES):
                return
            log.msg(f"dockerami: terminating {instance_id}: its worker connected as "
                    f"{claimed_by}, but no worker of this master tracks it")
            fleet.metrics.inc("dockerami_untracked_terminated_total", {})
            yield fleet.terminate(client, instance_id)
            return

    def orphans(self) -> list[tuple[AsyncEc2, InstanceStatus]]:
        """Live instances tagged for this master that no worker tracks, as last seen."""
        tracked = self.fleet.tracked()
        return [
            (client, status) for iid, (client, status) in sorted(self.view.items())
            if iid not in tracked and status.state in reconcile.LIVE_STATES
        ]


class GroupMember(Protocol):
    """What an InstanceGroup needs of a slot worker."""

    name: str

    @property
    def busy(self) -> bool: ...

    def arm(self) -> None: ...

    def release(self) -> defer.Deferred: ...


class InstanceGroup:
    """One instance whose slots are served by several workers, each build in a fresh
    container (isolation='container'). The instance lives while any slot is busy, and
    ``idle_timeout`` seconds after the last build; then every slot is released and the
    instance terminated."""

    def __init__(self, fleet: Fleet, name: str) -> None:
        self.fleet = fleet
        self.name = name
        self.members: dict[str, GroupMember] = {}
        self.instance: Any = None
        self.launch_values: dict[str, Any] | None = None
        self.idle_timeout = 600.0
        self.terminating = False
        self._launch_waiters: list[defer.Deferred] | None = None
        self._gone_waiters: list[defer.Deferred] = []
        self._idle_timer: Any = None

    def join(self, member: GroupMember) -> None:
        self.members[member.name] = member

    def slot_of(self, name: str) -> int:
        return sorted(self.members).index(name)

    @defer.inlineCallbacks
    def acquire(self, launch: Callable[[], defer.Deferred]) -> Any:
        """The group's instance, launched by ``launch()`` (-> (instance, values)) if
        there is none; concurrent callers share one launch."""
        while self.terminating:
            waiter: defer.Deferred = defer.Deferred()
            self._gone_waiters.append(waiter)
            yield waiter
        if self.instance is not None:
            return self.instance
        if self._launch_waiters is not None:
            waiter = defer.Deferred()
            self._launch_waiters.append(waiter)
            return (yield waiter)
        self._launch_waiters = []
        try:
            instance, values = yield launch()
        except Exception:
            error = failure.Failure()
            waiters, self._launch_waiters = self._launch_waiters, None
            for waiter in waiters:
                waiter.errback(error)
            raise
        self.instance, self.launch_values = instance, values
        waiters, self._launch_waiters = self._launch_waiters, None
        for waiter in waiters:
            waiter.callback(instance)
        self._start_idle_timer()
        for member in self.members.values():
            member.arm()
        return instance

    def build_started(self) -> None:
        self._cancel_idle_timer()

    def build_finished(self) -> None:
        if not any(member.busy for member in self.members.values()):
            self._start_idle_timer()

    def _start_idle_timer(self) -> None:
        self._cancel_idle_timer()
        if self.idle_timeout < 0:  # buildbot's convention: never shut down
            return
        self._idle_timer = self.fleet.reactor.callLater(self.idle_timeout, self._idle)

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.cancel()
        self._idle_timer = None

    def _idle(self) -> None:
        self._idle_timer = None
        if any(member.busy for member in self.members.values()):
            return
        self.shutdown(f"idle for {self.idle_timeout:.0f}s").addErrback(
            log.err, f"dockerami: terminating the instance of {self.name}"
        )

    @defer.inlineCallbacks
    def shutdown(self, why: str) -> Any:
        """Release every slot, then terminate the instance. Never wait for this from a
        member's stop_instance: releasing that member waits for its stop to finish."""
        instance = self.instance
        if instance is None or self.terminating:
            return
        self.terminating = True
        self._cancel_idle_timer()
        log.msg(f"dockerami: {self.name}: terminating {instance.instance_id}: {why}")
        try:
            yield defer.DeferredList(
                [member.release() for member in list(self.members.values())], consumeErrors=True
            )
            yield self.fleet.terminate(instance.client, instance.instance_id)
        finally:
            self.instance = self.launch_values = None
            self.terminating = False
            self.fleet.released(next((m.pool for m in self.members.values()), None), self)
            waiters, self._gone_waiters = self._gone_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def instance_lost(self, status: InstanceStatus) -> None:
        """EC2 says the shared instance is gone: its slots' workers stop their builds
        (instance_lost on each), then every slot is released."""
        if self.instance is None or self.instance.instance_id != status.instance_id:
            return
        self.shutdown(reconcile.lost_reason(status)).addErrback(
            log.err, f"dockerami: releasing the lost instance of {self.name}")

    @defer.inlineCallbacks
    def leave(self, member: GroupMember) -> Any:
        """A member's service stops (master shutdown, removed by reconfig)."""
        self.members.pop(member.name, None)
        if not self.members:
            self.fleet.groups.pop(self.name, None)
            yield self.shutdown("no workers left for it")
