"""Launching when build requests are queued, not when buildbot hands each build out.

Why: buildbot hands a builder's builds out one at a time, each after a dozen database
transactions (on SQLite, queued on one thread behind the writes of the builds already
started): in a burst of 50 the last launch would come 10-15 s after the first, and the
last build would run that much after one boot time. Launched as soon as the requests
are queued, the instances boot while buildbot hands the builds out.

Two halves: ``plan`` (pure) decides how many idle workers to launch for the requests
waiting; ``prefers_spare`` makes buildbot give a build to a worker whose instance is
already on its way, rather than to an idle worker (buildbot picks at random), so that
a launched (or pre-warmed) instance is used instead of launching another one.

Only for builders whose workers are all this plugin's, with launch settings that are
the same for every build (no renderables): any such instance fits any of their builds.
Off with several masters, where any master may claim a request (the launches would be
repeated on every master).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from buildbot.interfaces import IRenderable
from buildbot.worker.latent import States
from twisted.internet import defer, task
from twisted.python import failure, log

from buildbot_dockerami.fleet.singleflight import SingleFlight

#: Launch settings that may differ per build (rendered with its properties).
PER_BUILD_SETTINGS = ("image", "instance_type", "ami", "setup_repo", "setup_branch")
#: An instance launching or up.
ON_ITS_WAY = (States.SUBSTANTIATING, States.SUBSTANTIATING_STARTING, States.SUBSTANTIATED)


@dataclass(frozen=True)
class Candidate:
    """An idle worker that could be launched, and the builders it serves."""

    name: str
    builders: frozenset[str]


def plan(waiting: Mapping[str, int], spare: Mapping[str, int],
         candidates: Iterable[Candidate]) -> list[str]:
    """The workers to launch so that every builder has an instance on its way for each
    request waiting. A launched worker counts for every builder it serves (as a spare
    one does), so a worker shared by builders never brings more instances than any one
    of them asked for: the rest are launched by buildbot when it hands the builds out."""
    short = {b: n - spare.get(b, 0) for b, n in waiting.items() if n > spare.get(b, 0)}
    chosen = []
    for candidate in candidates:
        if any(short.get(b, 0) > 0 for b in candidate.builders):
            chosen.append(candidate.name)
            for b in candidate.builders:
                short[b] = short.get(b, 0) - 1
    return chosen


def same_for_every_build(worker: Any) -> bool:
    return not any(IRenderable.providedBy(getattr(worker, name, None))
                   for name in PER_BUILD_SETTINGS)


def launched_as_configured(worker: Any) -> bool:
    """The instance was launched with the worker's current settings (a reconfig may
    have changed them since: buildbot would then refuse it every build)."""
    launched = worker._actual_build_props
    return launched is None or launched == {k: getattr(worker, k) for k in PER_BUILD_SETTINGS}


def is_spare(worker: Any, wfb: Any) -> bool:
    """An instance on its way or up, with no build, that buildbot may give a build to."""
    return (worker.state in ON_ITS_WAY and not worker.building and not worker.stopping
            and (worker.state != States.SUBSTANTIATED or worker.conn is not None)
            and same_for_every_build(worker) and launched_as_configured(worker)
            and wfb.isAvailable())


def prefers_spare(worker: Any, buildername: str | None) -> bool:
    """Whether buildbot should give this build to another worker than ``worker``
    (idle, no instance): one whose instance is already on its way for the builder.
    Not when the operator chooses workers (``nextWorker``, ``select_next_worker``):
    that choice may never offer the spare, and every other worker would decline."""
    if buildername is None or worker.state != States.NOT_SUBSTANTIATED:
        return False
    own = worker.workerforbuilders.get(buildername)
    if own is None or own.builder is None or own.builder.config.nextWorker or getattr(
            worker.master.config, "select_next_worker", None):
        return False
    for other in list(worker.fleet.workers):
        if other is worker:
            continue
        wfb = other.workerforbuilders.get(buildername)
        if wfb is not None and is_spare(other, wfb):
            return True
    return False


def _ours_only(builder: Any, ours: set[int]) -> bool:
    """``ours``: ids of the fleet's workers (by identity: hashing a worker is costly)."""
    return bool(builder.workers) and all(
        id(wfb.worker) in ours and wfb.worker.launch_on_request for wfb in builder.workers)


def attach(fleet: Any, master: Any) -> None:
    """Follow this master's queue for its fleet, once; not with several masters."""
    if fleet.demand is None and fleet.shared is None and not getattr(
            master.config, "multiMaster", False):
        fleet.demand = LaunchOnRequest(fleet, master)
        fleet.demand.start().addErrback(log.err, "dockerami: launch on request")


class LaunchOnRequest:
    """Follows buildbot's queue from its message queue (requests new, claimed,
    unclaimed, complete) and launches idle workers for the requests waiting. The
    queue is kept in memory from the events, not read from the database: in a burst
    buildbot's database is the bottleneck (on SQLite, one transaction at a time)."""

    #: Event -> whether the request is waiting after it.
    EVENTS = {"new": True, "unclaimed": True, "claimed": False, "complete": False}

    def __init__(self, fleet: Any, master: Any) -> None:
        self.fleet = fleet
        self.master = master
        self._consumers: list[Any] = []
        #: builderid -> ids of its requests waiting (unclaimed).
        self.waiting: dict[int, set[int]] = {}
        self._pass = SingleFlight(self._launch_for_waiting, self._passed, again=True)
        #: One pass per reactor turn however many events it brought.
        self._soon: Any = None

    @defer.inlineCallbacks
    def start(self) -> Any:
        if self._consumers:
            return
        for event in self.EVENTS:
            self._consumers.append((yield self.master.mq.startConsuming(
                self._changed, ("buildrequests", None, event))))

    def stop(self) -> None:
        for consumer in self._consumers:
            consumer.stopConsuming()
        self._consumers = []

    def _changed(self, key: tuple[str, ...], request: dict[str, Any]) -> None:
        builderid, brid = request["builderid"], request["buildrequestid"]
        if self.EVENTS.get(key[-1]) and not request.get("claimed"):
            self.waiting.setdefault(builderid, set()).add(brid)
            if self._soon is None or not self._soon.active():
                self._soon = self.master.reactor.callLater(0, self._pass.tick)
        elif builderid in self.waiting:
            self.waiting[builderid].discard(brid)
            if not self.waiting[builderid]:
                del self.waiting[builderid]

    @staticmethod
    def _passed(result: Any) -> None:
        if isinstance(result, failure.Failure):
            log.err(result, "dockerami: launch on request")

    @defer.inlineCallbacks
    def _launch_for_waiting(self) -> Any:
        fleet, botmaster = self.fleet, self.master.botmaster
        if fleet.stopping or fleet.shared is not None or botmaster is None:
            return
        waiting: dict[str, int] = {}
        ours = {id(w) for w in fleet.workers}
        for builder in list(botmaster.builders.values()):
            if _ours_only(builder, ours):
                builderid = yield builder.getBuilderId()  # cached by buildbot
                if self.waiting.get(builderid):
                    waiting[builder.name] = len(self.waiting[builderid])
        if not waiting:
            return
        workers = sorted(fleet.workers, key=lambda w: w.name)
        spare = {name: sum(1 for w in workers if name in w.workerforbuilders
                           and is_spare(w, w.workerforbuilders[name]))
                 for name in waiting}
        candidates = [Candidate(w.name, frozenset(w.workerforbuilders)) for w in workers
                      if w.launch_on_request and w.may_launch_ahead()]
        by_name = {w.name: w for w in workers}
        for name in plan(waiting, spare, candidates):
            if by_name[name].prewarm():
                log.msg(f"dockerami: launching {name} for the build requests waiting")
            # One launch per reactor turn: 50 in one turn stalled the reactor for 1.3 s.
            yield task.deferLater(self.master.reactor, 0, lambda: None)
