"""The worker's scheduling glue: whether buildbot may hand it a build now (pool caps and
reservations, fleet/pools.py; launch on request, worker/on_request.py), booting it
before any build asks (the Fleet page's Start, a warm minimum, queued requests), and
telling the fleet when builds start and finish (and, for their cost, when a build has
its instance's worker connected: fleet/spending.py).

A mixin of DockerAMILatentWorker (worker/latent.py), before buildbot's classes in its
bases so that its hooks wrap buildbot's.
"""

from __future__ import annotations

from typing import Any

from buildbot.worker.latent import States
from twisted.internet import defer
from twisted.python import log

from buildbot_dockerami.fleet import pools, retirement
from buildbot_dockerami.fleet.prewarm import PrewarmTimer
from buildbot_dockerami.worker import on_request

#: The build property that carries a build's cost (docs/web-ui-and-metrics.md#costs).
COST_PROPERTY = "dockerami_cost_usd"


class Scheduling:
    """buildbot's scheduling hooks, and booting ahead of builds."""

    _prewarming = False
    _prewarm: PrewarmTimer | None = None

    def canStartBuild(self) -> bool:
        # A build that would need a new instance waits while its pool is at its cap.
        return super().canStartBuild() and pools.may_launch(self)

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
                self._prewarm_expired,
                lambda within: (self.fleet.keeper.warm_ended(self, within)
                                if self.fleet.keeper is not None else None))
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
        self._builds_on_instance()

    @defer.inlineCallbacks
    def attached(self, conn: Any) -> Any:
        result = yield super().attached(conn)
        self._builds_on_instance()  # the builds that waited for this worker start now
        return result

    def _builds_on_instance(self) -> None:
        """Builds running with this worker connected run on its instance (their cost's
        share starts, they count toward max_builds_per_instance): told once per build."""
        instance = self.instance
        if instance is None or self.conn is None:
            return
        started = False
        for wfb in list(self.workerforbuilders.values()):
            if wfb.isBusy() and self.fleet.spending.build_started(wfb, instance):
                retirement.build_started(instance)
                started = True
        if started:
            self.drain_if_due()  # worker/retiring.py

    def buildFinished(self, wfb: Any) -> None:
        build = next((b for b in getattr(getattr(wfb, "builder", None), "building", ())
                      if getattr(b, "workerforbuilder", None) is wfb), None)
        super().buildFinished(wfb)
        self._note_use()
        if self.group is not None:
            self.group.build_finished()
        # A graceful Stop waits for this (buildbot's latent workers never check it).
        self.maybeShutdown()
        # Not waited for by a stopping master: a spot price may still be on its way.
        self._record_cost(wfb, build)

    @defer.inlineCallbacks
    def _record_cost(self, wfb: Any, build: Any) -> Any:
        """The finished build's cost, as its property and the Fleet page's last build.
        buildbot has saved the build as finished by now: the property is written to
        the database through the data API right after."""
        buildid = getattr(build, "buildid", None)
        about = {"buildid": buildid, "number": getattr(build, "number", None),
                 "builder": wfb.builder_name}
        try:
            found = yield self.fleet.spending.build_finished(wfb, self.name, about)
            if found is not None and buildid is not None:
                yield self.master.data.updates.setBuildProperty(
                    buildid, COST_PROPERTY, found.usd, "DockerAMI")
        except Exception as e:
            log.msg(f"{self}: could not record the cost of build {buildid}: {e}")
