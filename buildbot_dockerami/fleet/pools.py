"""Pools: runtime caps on running instances and a minimum of warm idle ones.

A pool is the workers of one ``worker_pool`` (their ``pool`` setting). Operators set
its limits from the Fleet page; they are kept in the master's database, so they
survive a restart. A warm minimum may also be configured (``worker_pool(min_warm=...)``,
a number or periods: schedule.py), warmed ahead of each period by the pool's measured
provisioning time (provisioning.py); one set on the Fleet page overrides it until it
is cleared there. The decisions are the pure functions ``may_launch_one`` and
``warm_shortfall``; the rest counts and acts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.internet import defer, task
from twisted.python import log

from buildbot_dockerami.fleet import retirement, schedule
from buildbot_dockerami.fleet.members import FleetWorker

if TYPE_CHECKING:
    from buildbot_dockerami.fleet.service import Fleet

#: How often warm capacity is checked and topped up.
KEEPER_INTERVAL = 2.0
STATE_CLASS = "buildbot_dockerami.Pool"


@dataclass
class PoolLimits:
    cap: int | None = None
    #: Set on the Fleet page: overrides the configured warm minimum; None follows it.
    min_warm: int | None = None


#: How long buildbot may take from approving a worker for a build to starting it.
RESERVATION_SECONDS = 30.0


def may_launch_one(instances_in_use: int, cap: int | None) -> bool:
    """Whether a pool may start one more instance."""
    return cap is None or instances_in_use < cap


def warm_shortfall(idle: int, starting: int, in_use: int, min_warm: int,
                   cap: int | None) -> int:
    """How many instances to pre-warm so that ``min_warm`` are idle and ready, without
    passing the cap. Instances already starting count as on their way."""
    wanted = max(0, min_warm - idle - starting)
    room = wanted if cap is None else max(0, cap - in_use)
    return min(wanted, room)


def instance_key(worker: FleetWorker) -> str:
    """The instance a worker runs on: its group's for slots, its own otherwise."""
    return worker.group.name if worker.group is not None else worker.name


def _active(worker: FleetWorker) -> bool:
    return worker.active


def members(fleet: Fleet, pool: str) -> list[FleetWorker]:
    return sorted((w for w in list(fleet.workers) if w.pool == pool), key=lambda w: w.name)


def instances_in_use(workers: Iterable[FleetWorker]) -> dict[str, list[Any]]:
    """Instance key -> its workers, for every instance running or on its way."""
    keys: dict[str, list[Any]] = {}
    for worker in workers:
        keys.setdefault(instance_key(worker), []).append(worker)
    return {
        key: ws for key, ws in keys.items()
        if any(_active(w) for w in ws)
        or (ws[0].group is not None and ws[0].group.instance is not None)
    }


class InUse:
    """Per pool, the instances in use (running or on their way), kept current as the
    workers change (``note``), so that a scheduling check is O(1) instead of a pass
    over the pool: buildbot asks for every candidate of every build, and a burst of
    N builds would cost O(N^2) passes. ``resync`` recounts from scratch (the keeper
    does every tick), bounding what a missed change could cost.
    """

    def __init__(self) -> None:
        #: worker -> (pool, instance key, counted as active) as last noted.
        self._counted: dict[Any, tuple[str, str, bool]] = {}
        self._active: Counter[tuple[str, str]] = Counter()
        self._members: Counter[tuple[str, str]] = Counter()
        self._groups: dict[tuple[str, str], Any] = {}
        self._in_use: dict[str, set[str]] = {}
        #: pool -> instance key -> when its reservation lapses.
        self._reserved: dict[str, dict[str, float]] = {}
        #: holder (a builder) -> the slot it last reserved: buildbot considers one
        #: build per builder at a time, so a new approval replaces the last one (which
        #: buildbot may have turned down after all, e.g. for a lock).
        self._holders: dict[Any, tuple[str, str]] = {}

    def reserve(self, pool: str, key: str, until: float, holder: Any = None) -> None:
        if holder is not None:
            old = self._holders.get(holder)
            if old is not None and old != (pool, key):
                self._reserved.get(old[0], {}).pop(old[1], None)
            self._holders[holder] = (pool, key)
        if key not in self._in_use.get(pool, ()):
            self._reserved.setdefault(pool, {})[key] = until

    def _lapse(self, pool: str, now: float) -> dict[str, float]:
        reserved = self._reserved.get(pool, {})
        for key in [k for k, until in reserved.items() if until < now]:
            del reserved[key]
        return reserved

    def note(self, worker: FleetWorker) -> None:
        """The worker's state, instance, builds, pool or group may have changed."""
        self._uncount(worker)
        if worker.pool is None:
            return
        slot = (worker.pool, instance_key(worker))
        active = _active(worker)
        self._counted[worker] = (*slot, active)
        self._members[slot] += 1
        if worker.group is not None:
            self._groups[slot] = worker.group
        if active:
            self._active[slot] += 1
        self._refresh(slot)

    def forget(self, worker: FleetWorker) -> None:
        self._uncount(worker)

    def group_changed(self, group: Any) -> None:
        """A shared instance came or went."""
        for slot in [s for s, g in self._groups.items() if g is group]:
            self._refresh(slot)

    def resync(self, workers: Iterable[FleetWorker]) -> None:
        self._counted.clear()
        self._active.clear()
        self._members.clear()
        self._groups.clear()
        self._in_use.clear()
        for worker in workers:
            self.note(worker)

    def count(self, pool: str, now: float) -> int:
        """Instances in use or reserved (reservations are few and short-lived)."""
        in_use = self._in_use.get(pool, set())
        reserved = self._lapse(pool, now)
        return len(in_use) + sum(1 for key in reserved if key not in in_use)

    def uses(self, pool: str, key: str, now: float) -> bool:
        return key in self._in_use.get(pool, ()) or key in self._lapse(pool, now)

    def _uncount(self, worker: FleetWorker) -> None:
        old = self._counted.pop(worker, None)
        if old is not None:
            pool, key, active = old
            if active:
                self._active[(pool, key)] -= 1
            self._members[(pool, key)] -= 1
            if self._members[(pool, key)] <= 0:
                self._groups.pop((pool, key), None)
            self._refresh((pool, key))

    def _refresh(self, slot: tuple[str, str]) -> None:
        group = self._groups.get(slot)
        used = self._active[slot] > 0 or (group is not None and group.instance is not None)
        keys = self._in_use.setdefault(slot[0], set())
        if used:
            keys.add(slot[1])
            self._reserved.get(slot[0], {}).pop(slot[1], None)  # served
        else:
            keys.discard(slot[1])


def may_launch(worker: FleetWorker) -> bool:
    """False when starting this worker would need a new instance beyond its pool's cap,
    counting every master's instances (as last read from the shared database). On one
    master O(1): answered from the fleet's InUse index."""
    if worker.pool is None:
        return True
    limits = worker.fleet.pool_limits.get(worker.pool, PoolLimits())
    if limits.cap is None:
        return True
    in_use = worker.fleet.in_use
    key = instance_key(worker)
    now = worker.fleet.reactor.seconds()
    shared = getattr(worker.fleet, "shared", None)
    if in_use.uses(worker.pool, key, now) or (shared is not None and key in shared.pending):
        return True
    count = in_use.count(worker.pool, now)
    if shared is not None:
        count = max(count, shared.counts(worker.pool).in_use)
    return may_launch_one(count, limits.cap)


def capped(pool: str | None, fleet: Fleet) -> bool:
    """Whether a cap may be holding builds of this pool back (so a release matters)."""
    return pool is not None and fleet.pool_limits.get(pool, PoolLimits()).cap is not None


def reserve(worker: FleetWorker, holder: Any = None) -> defer.Deferred:
    """Whether the worker may have an instance, its pool's slot claimed in the shared
    database if it needs a new one (multimaster.Coordinator.reserve); on one master,
    held in the InUse index until the worker starts (``holder``: the builder asking)."""
    fleet = worker.fleet
    shared = getattr(fleet, "shared", None)
    if shared is not None:
        return shared.reserve(worker)
    if not may_launch(worker):
        return defer.succeed(False)
    if capped(worker.pool, fleet):
        fleet.in_use.reserve(worker.pool, instance_key(worker),
                             fleet.reactor.seconds() + RESERVATION_SECONDS, holder)
        if fleet.reservation_wakeup is None or not fleet.reservation_wakeup.active():
            # A lapsed reservation frees a slot nothing else announces.
            fleet.reservation_wakeup = fleet.reactor.callLater(
                RESERVATION_SECONDS + 1, fleet.after_release)
    return defer.succeed(True)


def claim_for_launch(worker: FleetWorker) -> defer.Deferred:
    """Right before RunInstances: the slot must be held (reserve took it)."""
    shared = getattr(worker.fleet, "shared", None)
    if shared is None or worker.pool is None:
        return defer.succeed(True)
    return shared.claim(worker)


def _counts(fleet: Fleet, pool: str) -> tuple[int, int, int]:
    """(instances, idle, starting) of the pool on every master."""
    shared = getattr(fleet, "shared", None)
    if shared is not None:
        c = shared.counts(pool)
        return c.in_use, c.idle, c.starting
    in_use = instances_in_use(members(fleet, pool))
    starting = sum(1 for ws in in_use.values() if not any(w.conn for w in ws))
    return len(in_use), idle_count(in_use), starting


def warm_without_draining(fleet: Fleet, pool: str, now: float) -> bool:
    """Whether the pool's warm minimum is met by instances that take builds (a draining
    one that held it may end: its replacement is ready)."""
    _, idle, _ = _counts(fleet, pool)
    return idle >= warm_minimum(fleet, pool, now)


def lead(fleet: Fleet, pool: str) -> float:
    """How long before a period its warm minimum is started: the pool's measured
    provisioning time, plus a keeper interval (a launch waits for the next tick)."""
    return fleet.provisioning.lead(pool) + KEEPER_INTERVAL


def warm_minimum(fleet: Fleet, pool: str, now: float) -> int:
    """The idle instances the pool keeps now: the Fleet page's override, else the
    configured minimum (warmed ahead of each period), else none."""
    limits = fleet.pool_limits.get(pool, PoolLimits())
    if limits.min_warm is not None:
        return limits.min_warm
    configured = fleet.warm_schedules.get(pool)
    return 0 if configured is None else configured.target(now, lead(fleet, pool))


def pool_status(fleet: Fleet, pool: str) -> dict[str, Any]:
    """The pool's limits and its instances on every master; with a configured warm
    minimum, its periods (the one in force, the next) and the page's override."""
    limits = fleet.pool_limits.get(pool, PoolLimits())
    instances, idle, _ = _counts(fleet, pool)
    now = fleet.reactor.seconds()
    status: dict[str, Any] = {"cap": limits.cap, "min_warm": warm_minimum(fleet, pool, now),
                              "instances": instances, "idle": idle}
    configured = fleet.warm_schedules.get(pool)
    if configured is not None:
        status["schedule"] = {
            **schedule.describe(configured, now, lead(fleet, pool)),
            "lead_measured": fleet.provisioning.samples(pool) > 0,
            "override": limits.min_warm,
        }
    return status


def _idle(workers: list[FleetWorker]) -> bool:
    # A draining instance (fleet/retirement.py) is no warm capacity: it takes no build,
    # so the keeper launches its replacement while it waits to end.
    return (not any(w.busy for w in workers) and any(w.conn is not None for w in workers)
            and not draining(workers))


def draining(workers: list[FleetWorker]) -> bool:
    """Whether the instance these workers share drains (takes no new build)."""
    group = workers[0].group
    instance = group.instance if group is not None else workers[0].instance
    return not retirement.takes_builds(instance)


def idle_count(in_use: dict[str, list[Any]]) -> int:
    """How many of these instances are connected and building nothing."""
    return sum(1 for ws in in_use.values() if _idle(ws))


class PoolKeeper:
    """Tops pools up to their warm minimum by pre-warming workers, within the cap."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self._loop = task.LoopingCall(self.tick)
        self._loop.clock = fleet.reactor

    def start(self) -> None:
        if getattr(self.fleet, "shared", None) is not None:
            return  # ticked by the shared pass, on the one master that leads
        if not self._loop.running:
            self._loop.start(KEEPER_INTERVAL, now=False).addErrback(log.err, "dockerami pools")

    @defer.inlineCallbacks
    def tick(self) -> Any:
        """Counts are the whole fleet's; only the leading master calls this (see
        multimaster), so a minimum is kept once, not once per master."""
        self.fleet.in_use.resync(w for w in list(self.fleet.workers) if w.pool is not None)
        shared = getattr(self.fleet, "shared", None)
        now = self.fleet.reactor.seconds()
        for pool, limits in list(self.fleet.pool_limits.items()):
            min_warm = warm_minimum(self.fleet, pool, now)
            if min_warm <= 0:
                continue
            workers = members(self.fleet, pool)
            in_use = instances_in_use(workers)
            instances, idle, starting = _counts(self.fleet, pool)
            wanted = warm_shortfall(idle, starting, instances, min_warm, limits.cap)
            spare = [w for w in workers if instance_key(w) not in in_use
                     and (shared is None or instance_key(w) not in shared.pending)]
            for worker in spare:
                if wanted <= 0:
                    break
                if not (yield reserve(worker)):
                    break
                log.msg(f"dockerami: pool {pool}: pre-warming {worker.name} "
                        f"({idle} idle fleet-wide, minimum {min_warm})")
                if worker.prewarm():
                    wanted -= 1

    def keeps_warm(self, worker: FleetWorker) -> bool:
        """Whether ending this idle worker's instance would drop its pool below minimum."""
        if worker.pool is None:
            return False
        _, idle, _ = _counts(self.fleet, worker.pool)
        return idle <= warm_minimum(self.fleet, worker.pool, self.fleet.reactor.seconds())

    def warm_ended(self, worker: FleetWorker, within: float) -> float | None:
        """When a period of the worker's pool schedule last ended, if at most ``within``
        seconds ago (and no override holds the minimum): an instance it kept warm idles
        out from then, as any idle instance would."""
        if worker.pool is None:
            return None
        limits = self.fleet.pool_limits.get(worker.pool, PoolLimits())
        configured = self.fleet.warm_schedules.get(worker.pool)
        if limits.min_warm is not None or configured is None:
            return None
        return configured.last_end(self.fleet.reactor.seconds(), within)


@defer.inlineCallbacks
def load_limits(master: Any, pool: str) -> Any:
    objectid = yield master.db.state.getObjectId(pool, STATE_CLASS)
    stored = yield master.db.state.getState(objectid, "limits", {})
    if "override" in stored:
        min_warm = stored.get("min_warm") if stored["override"] else None
    else:  # stored before warm minimums were configurable: 0 was "none set"
        min_warm = stored.get("min_warm") or None
    return PoolLimits(cap=stored.get("cap"), min_warm=min_warm)


@defer.inlineCallbacks
def save_limits(master: Any, pool: str, limits: PoolLimits) -> Any:
    objectid = yield master.db.state.getObjectId(pool, STATE_CLASS)
    # "min_warm" stays a number for a master of an older release sharing the database.
    yield master.db.state.setState(objectid, "limits", {
        "cap": limits.cap, "min_warm": limits.min_warm or 0,
        "override": limits.min_warm is not None})
