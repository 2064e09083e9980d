"""The reconciler loop: every interval, EC2's view of this master's instances against
what its workers track. The decisions are reconcile_plan.plan's (pure); this module polls
EC2 and carries them out."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer, task
from twisted.python import failure, log

from buildbot_dockerami.cloud import instances
from buildbot_dockerami.cloud.ec2 import AsyncEc2
from buildbot_dockerami.cloud.instances import InstanceStatus
from buildbot_dockerami.fleet import reconcile_plan, stopped_pool
from buildbot_dockerami.fleet.holdings import Holdings
from buildbot_dockerami.fleet.metrics import Metrics
from buildbot_dockerami.fleet.singleflight import SingleFlight
from buildbot_dockerami.fleet.termination import Terminator


class Reconciler:
    """Compares EC2's view of every instance tagged for this master with what the
    workers track, once at start-up and then every ``interval`` seconds, with one
    DescribeInstances per EC2 endpoint however many workers and readers there are.
    The decisions are reconcile_plan.plan's; a failed poll only delays them.

    It is given what it uses: the clock, this master's id (the tag it looks for), what
    the master holds, the terminator, the metrics, and whether the master is stopping."""

    def __init__(self, reactor: Any, master_id: str, holdings: Holdings, *,
                 terminator: Terminator, metrics: Metrics,
                 stopping: Callable[[], bool]) -> None:
        self.reactor = reactor
        self.master_id = master_id
        self.holdings = holdings
        self.terminator = terminator
        self.metrics = metrics
        self.stopping = stopping
        self.interval = reconcile_plan.DEFAULT_INTERVAL
        #: Instance id -> (client, status) as last seen; what the status page shows.
        self.view: dict[str, tuple[AsyncEc2, InstanceStatus]] = {}
        self.checked_at: float | None = None
        self.last_error = ""
        self.passes = 0
        self._loop: task.LoopingCall | None = None
        self._flight = SingleFlight(self._pass, self._done)
        self._first: Any = None
        #: Untracked instances of the last pass: terminated if still untracked now.
        self._suspects: set[str] = set()
        #: Instances whose connecting worker is being checked (one check at a time each).
        self._checking: set[str] = set()

    def start(self, interval: float, first_delay: float = 1.0) -> None:
        """(Re)start with the shortest interval any worker asked for. The first pass
        waits ``first_delay`` so that every worker of the config is known to it."""
        if self._loop is not None and self._loop.running and interval == self.interval:
            return
        self.interval = interval
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = task.LoopingCall(self.tick)
        self._loop.clock = self.reactor
        if self._first is None and self.passes == 0:
            self._first = self.reactor.callLater(first_delay, self._start_loop)
        else:
            self._start_loop()

    def _start_loop(self) -> None:
        self._first = None
        if self._loop is not None and not self._loop.running and not self.stopping():
            self._loop.start(self.interval, now=True).addErrback(log.err, "dockerami reconciler")

    def stop(self) -> None:
        if self._first is not None and self._first.active():
            self._first.cancel()
        self._first = None
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def tick(self) -> defer.Deferred:
        if self.stopping():
            self.stop()
            return defer.succeed(None)
        return self._flight.tick()

    def _done(self, result: Any) -> None:
        if isinstance(result, failure.Failure):
            log.err(result, "dockerami: reconciler pass")

    @defer.inlineCallbacks
    def _pass(self) -> Any:
        holdings = self.holdings
        clients = yield holdings.clients(skipping="reconciler")
        view: dict[str, tuple[AsyncEc2, InstanceStatus]] = {}
        seen: dict[str, InstanceStatus] = {}
        suspects: set[str] = set()
        errors = []
        for client in clients:
            try:
                found = yield client.describe_tagged(instances.MASTER_TAG, self.master_id)
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
            tracked = holdings.tracked()
            decided = reconcile_plan.plan(found, tracked, holdings.launching, self._suspects)
            suspects |= decided.suspects
            self._act(client, decided, tracked)
            seen.update(found)
        self.view = view
        self._suspects = suspects
        self._retire_stopped()
        self._drain_due()
        self.checked_at = self.reactor.seconds()
        self.passes += 1
        if errors:
            self.last_error = "; ".join(errors)
            log.msg(f"dockerami: reconciler: DescribeInstances failed ({self.last_error}); "
                    "decisions wait for the next pass")
        else:
            self.last_error = ""

    def _act(self, client: AsyncEc2, decided: reconcile_plan.Plan,
             tracked: dict[str, list[Any]]) -> None:
        for status in decided.terminate:
            if self.stopping():
                break
            if self.terminator.in_progress(status.instance_id):
                continue
            log.msg(f"dockerami: reconciler: terminating {status.instance_id} "
                    f"({status.state}, worker {status.worker or '?'}): tagged for this master "
                    "but no worker tracks it")
            self.metrics.inc("dockerami_untracked_terminated_total", {})
            d = self.terminator.terminate(client, status.instance_id)
            d.addErrback(lambda f, iid=status.instance_id: log.msg(
                f"dockerami: reconciler: terminating {iid} failed: {f.getErrorMessage()}"))
        for status in decided.lost:
            for owner in tracked.get(status.instance_id, []):
                owner.instance_lost(status)

    def _retire_stopped(self) -> None:
        """Stopped instances past ``max_stopped_age`` (or the count) are terminated."""
        pool = self.holdings.stopped
        for entry in stopped_pool.to_retire(list(pool.entries.values()), self.reactor.seconds(),
                                        pool.max_count, pool.max_age):
            pool.take(entry.owner)
            log.msg(f"dockerami: terminating stopped instance {entry.instance_id} of "
                    f"{entry.owner}: beyond max_stopped or max_stopped_age")
            self.terminator.terminate(entry.instance.client, entry.instance_id).addErrback(
                lambda f: log.msg(f"dockerami: {f.getErrorMessage()}"))

    def _drain_due(self) -> None:
        """Instances past max_instance_age, launched from an AMI their ami_filters no
        longer pick (refresh.py, its DescribeImages bounded), or running an image whose
        tag moved (image_refresh.py, its registry checks bounded) drain on the fleet's clock
        (retirement.py decides; each worker drains its own, never killing a build)."""
        if self.stopping():
            return
        for worker in list(self.holdings.workers):
            drain = getattr(worker, "drain_if_due", None)
            if drain is None:
                continue
            try:
                drain()
                worker.refresh_if_stale().addErrback(
                    log.err, f"dockerami: reconciler: refreshing {worker}")
                image = getattr(worker, "refresh_image_if_stale", None)
                if image is not None:
                    image().addErrback(
                        log.err, f"dockerami: reconciler: refreshing the image of {worker}")
            except Exception:
                log.err(None, f"dockerami: reconciler: draining {worker}")

    def terminate_untracked(self, instance_id: str, claimed_by: str) -> None:
        """A worker connected from ``instance_id``, which no worker tracks: end it if
        it is tagged for this master and no launch of ours is still waiting for it."""
        # An instance this master is ending or ended needs no check: its worker reconnects
        # while EC2 shuts it down (50 such, one DescribeInstances each, in a burst's end).
        if instance_id in self._checking or self.terminator.ending_or_ended(instance_id):
            return
        self._checking.add(instance_id)
        d = self._terminate_if_untracked(instance_id, claimed_by)
        d.addErrback(
            lambda f: log.msg(f"dockerami: could not end {instance_id}: {f.getErrorMessage()}"))
        d.addBoth(lambda _: self._checking.discard(instance_id))

    @defer.inlineCallbacks
    def _terminate_if_untracked(self, instance_id: str, claimed_by: str) -> Any:
        holdings = self.holdings
        for client in (yield holdings.clients()):
            status = (yield client.describe([instance_id])).get(instance_id)
            if status is None:
                continue
            if (status.master != self.master_id or instance_id in holdings.tracked()
                    or status.launch_token in holdings.launching
                    or status.state not in reconcile_plan.LIVE_STATES):
                return
            log.msg(f"dockerami: terminating {instance_id}: its worker connected as "
                    f"{claimed_by}, but no worker of this master tracks it")
            self.metrics.inc("dockerami_untracked_terminated_total", {})
            yield self.terminator.terminate(client, instance_id)
            return

    def orphans(self) -> list[tuple[AsyncEc2, InstanceStatus]]:
        """Live instances tagged for this master that no worker tracks, as last seen."""
        tracked = self.holdings.tracked()
        return [
            (client, status) for iid, (client, status) in sorted(self.view.items())
            if iid not in tracked and status.state in reconcile_plan.LIVE_STATES
        ]
