"""One fleet across several masters, on buildbot's own multi-master engine.

Masters sharing a database (``c['multiMaster'] = True``, PostgreSQL, a WAMP router)
share the fleet through that database (shared_tables.py) and EC2's ``buildbot:master`` tags:

- caps: a new instance of a pool needs a numbered slot row below the cap, taken in
  the database before RunInstances; the database refuses a second taker;
- warm minimums: kept by one master only, the active one with the lowest id, from
  every master's idle and starting instances as the rows say;
- dead masters: once buildbot has marked a master inactive (its heartbeat expired)
  one live master, the one whose reclaim row the database accepted, terminates the
  instances tagged for it, frees its slots and lets the others build its requests.

With one master and SQLite the same code runs and it is simply the leader.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from buildbot.data import masters as buildbot_masters
from buildbot.util import service
from twisted.internet import defer, task
from twisted.python import failure, log

from buildbot_dockerami.cloud import instances
from buildbot_dockerami.fleet import pools, reconcile_plan, shared_tables
from buildbot_dockerami.fleet.members import FleetWorker
from buildbot_dockerami.fleet.shared_tables import MasterRow, Row
from buildbot_dockerami.fleet.singleflight import SingleFlight

if TYPE_CHECKING:
    from buildbot_dockerami.fleet.service import Fleet

#: Seconds between two passes: mirror this master's instances, read everyone's.
SYNC_INTERVAL = 2.0
#: A slot claimed for a build that never launched is given back after this.
CLAIM_GRACE = 30.0
#: Seconds between two looks for dead masters to reclaim.
RECLAIM_INTERVAL = 10.0
#: Routing key (buildbot's message queue) of "a slot of a capped pool was freed on the
#: master whose id follows": the others read the rows at once, not at their next pass.
FREED = ("dockerami", "freed")
#: Seconds a master may run without a joined WAMP session before it says so.
MQ_GRACE = 15.0


# -- pure decisions --------------------------------------------------------------------


def leader(masters: Iterable[MasterRow]) -> int | None:
    """The active master that keeps warm minimums: the lowest id, for everyone alike."""
    active = [m.masterid for m in masters if m.active]
    return min(active) if active else None


def expire_after() -> float:
    """Seconds after its last heartbeat buildbot judges a master dead (10 minutes
    unless Heartbeat shortens it)."""
    return float(buildbot_masters.EXPIRE_MINUTES) * 60


def dead_masters(masters: Iterable[MasterRow], me: int, now: float,
                 expire: float) -> list[MasterRow]:
    """Masters buildbot marked inactive whose heartbeat is older than the expiry: they
    crashed (a master that stopped cleanly ended its own instances). Never this one."""
    return [m for m in masters
            if not m.active and m.masterid != me and now - m.last_active >= expire]


def stopped_masters(masters: Iterable[MasterRow], me: int, now: float,
                    expire: float) -> list[int]:
    """Inactive masters with a recent heartbeat: stopped cleanly (or restarting), so
    their rows say nothing true any more; their own start writes them anew."""
    return [m.masterid for m in masters
            if not m.active and m.masterid != me and now - m.last_active < expire]


def mq_problem(mq: Any, joined: bool, waited: float, grace: float = MQ_GRACE) -> str:
    """Why this master's message queue cannot work with several masters, or "".

    buildbot logs nothing when its WAMP router cannot be reached: the master runs and
    hears nothing from the others (build requests, cancellations, freed slots)."""
    kind = (mq or {}).get("type", "simple")
    if kind != "wamp":
        return (f"c['mq'] type is {kind!r}: with several masters it must be 'wamp' (a "
                "router all masters connect to), or no master hears of another's build "
                "requests")
    if not joined and waited >= grace:
        return (f"not connected to the WAMP router {mq.get('router_url')!r} (realm "
                f"{mq.get('realm', 'buildbot')!r}) {waited:.0f} s after start: this master "
                "hears nothing from the others (build requests, cancellations) until it is; "
                "check c['mq']['router_url'] and that the router runs")
    return ""


@dataclass(frozen=True)
class PoolCounts:
    """A pool across all masters."""

    in_use: int = 0
    idle: int = 0
    starting: int = 0


def count(rows: Iterable[Row], pool: str) -> PoolCounts:
    in_pool = [r for r in rows if r.pool == pool]
    return PoolCounts(
        in_use=len(in_pool),
        idle=sum(1 for r in in_pool if r.state == "idle"),
        starting=sum(1 for r in in_pool if r.state in shared_tables.STARTING),
    )


# -- this master's view of its own instances ----------------------------------------------


def instance_state(workers: list[FleetWorker]) -> str:
    if any(w.busy for w in workers):
        return "building"
    if pools.draining(workers):
        return "draining"  # neither idle (no warm capacity) nor starting
    if any(w.conn is not None for w in workers):
        return "idle"
    group = workers[0].group
    if any(w.instance is not None for w in workers) or (
            group is not None and group.instance is not None):
        return "booting"
    return "launching"


def local_rows(fleet: Fleet) -> dict[str, dict[str, Any]]:
    """Instance key -> what the rows say of it, for every instance this master has."""
    rows = {}
    for key, workers in pools.instances_in_use(list(fleet.workers)).items():
        group = workers[0].group
        instance = group.instance if group is not None and group.instance else next(
            (w.instance for w in workers if w.instance is not None), None)
        rows[key] = {
            "pool": workers[0].pool,
            "state": instance_state(workers),
            "instance_id": instance.instance_id if instance else "",
            "instance_type": instance.instance_type if instance else "",
            "workers": sorted(w.name for w in workers),
        }
    return rows


class Coordinator:
    """This master's part in the shared fleet: the pass every SYNC_INTERVAL, slot
    claims before launches, and the reclaiming of dead masters' instances."""

    def __init__(self, fleet: Fleet, master: Any) -> None:
        self.fleet = fleet
        self.master = master
        self.rows: list[Row] = []
        self.masters: list[MasterRow] = []
        #: Instance keys claimed here and not yet running, with when.
        self.pending: dict[str, float] = {}
        #: Keys whose instance ended here (freed) since the last write of the rows.
        self._ended: set[str] = set()
        #: freed()'s calls a reactor turn later, not yet run (stop() cancels them).
        self._freed_calls: list[Any] = []
        self.last_error = ""
        #: Dead master id -> its last reclaim (by any master), as the database says.
        self.reports: dict[int, shared_tables.ReclaimReport] = {}
        self._tables = False
        self._lock = defer.DeferredLock()
        self._flight = SingleFlight(self._pass, self._done)
        self._last_reclaim = float("-inf")
        self._free: dict[str, int] = {}
        #: Pools whose slot the database refused here, until a read shows one free (this
        #: master's read of the rows may not have shown them full: a free slot must wake).
        self._refused: set[str] = set()
        #: Reads of the rows finished so far: a refusal that raced one reads again.
        self._reads = 0
        self._loop = task.LoopingCall(self.tick)
        self._loop.clock = master.reactor
        #: Freed slots, told to the others (event-driven: one more after a busy one).
        self._announce = SingleFlight(self._mirror_and_announce, self._done, again=True)
        #: Other masters' freed slots, read at once.
        self._wake = SingleFlight(self._read_and_wake, self._done, again=True)
        self._consumer: Any = None
        self._started_at = master.reactor.seconds()
        #: Why this master's message queue does not work with several masters, or "".
        self.mq_error = ""

    @property
    def masterid(self) -> int | None:
        return getattr(self.master, "masterid", None)

    def start(self) -> None:
        if not self._loop.running:
            self._started_at = self.master.reactor.seconds()
            self._loop.start(SYNC_INTERVAL, now=False).addErrback(log.err, "dockerami shared")
        if self._consumer is None:
            d = self.master.mq.startConsuming(self._on_freed, (*FREED, None))
            d.addCallback(lambda consumer: setattr(self, "_consumer", consumer))
            d.addErrback(log.err, "dockerami: listening for freed slots")

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
        calls, self._freed_calls = self._freed_calls, []
        for call in calls:
            if call.active():
                call.cancel()
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            defer.maybeDeferred(consumer.stopConsuming).addErrback(
                log.err, "dockerami: no longer listening for freed slots")

    def freed(self, key: str) -> None:
        """The instance ``key`` (a worker's name, or its slot group's) of a capped pool
        ended here: its row goes now, and the other masters are told over buildbot's
        message queue, so a build waiting there for the slot starts without waiting for
        either master's next pass.

        Called from inside the worker's stop_instance, while buildbot still has the
        worker insubstantiating (so it counts against the cap); buildbot marks it not
        substantiated as soon as stop_instance returns. The rows are written a reactor
        turn later: written now, they would still hold the slot, the others would read
        it taken, and their builds would wait for this master's next pass after all.
        Only ``key``'s claim ends with it: another key that dropped out meanwhile may be
        a launch that failed, whose instance a lost answer may hide (its claim keeps
        its CLAIM_GRACE). Once stopped (the master stops), nothing more is written or
        sent from here."""
        if self.masterid is not None and self._loop.running:
            self._freed_calls = [c for c in self._freed_calls if c.active()]
            self._freed_calls.append(self.master.reactor.callLater(0, self._after_freed, key))

    def _after_freed(self, key: str) -> None:
        if key not in local_rows(self.fleet):  # (not launched again within the turn)
            self._ended.add(key)
        self._announce.tick()

    def _local(self) -> tuple[dict[str, dict[str, Any]], set[str]]:
        """This master's instances now, and the keys whose instance ended (freed): their
        claim is over, so the slot goes back now, not CLAIM_GRACE after the claim (an
        instance that ends before a pass saw it running left its row "claimed")."""
        local = local_rows(self.fleet)
        ended = {k for k in self._ended if k not in local}  # (not launched again since)
        self._ended.clear()
        for key in ended:
            self.pending.pop(key, None)
        return local, ended

    def _mirror(self, now: float) -> defer.Deferred:
        """This master's rows made true: what it has now."""
        local, ended = self._local()
        return self._lock.run(self.master.db.pool.do, shared_tables.mirror, self.masterid,
                              local, int(now), CLAIM_GRACE, ended=ended)

    @defer.inlineCallbacks
    def _mirror_and_announce(self) -> Any:
        if not self._loop.running:  # stopped since it was asked for
            return
        yield self._ensure_tables()
        yield self._mirror(self.master.reactor.seconds())
        self.master.mq.produce((*FREED, str(self.masterid)), {"masterid": self.masterid})

    def _on_freed(self, _key: Any, message: Any) -> None:
        if self.masterid is None or message.get("masterid") == self.masterid:
            return
        self.fleet.metrics.inc("dockerami_freed_slot_messages_total", {})
        self._wake.tick()

    def _read_and_wake(self) -> defer.Deferred:
        return self._read_rows(self.master.reactor.seconds(), forget_stopped=False)

    @defer.inlineCallbacks
    def _read_rows(self, now: float, forget_stopped: bool) -> Any:
        """Every master's rows and buildbot's masters, read; those of masters that stopped
        cleanly left out (and, with ``forget_stopped``, deleted); builds waiting here for
        a slot freed elsewhere woken."""
        rows, masters = yield self.master.db.pool.do(shared_tables.read)
        stopped = stopped_masters(masters, self.masterid, now, expire_after())
        if forget_stopped and any(r.masterid in stopped for r in rows):
            yield self.master.db.pool.do(shared_tables.forget, stopped)
        self.rows = [r for r in rows if r.masterid not in stopped]
        self.masters = masters
        self._wake_if_freed()
        self._reads += 1

    def _check_mq(self, now: float) -> None:
        wamp = getattr(self.master, "wamp", None)
        problem = mq_problem(getattr(self.master.config, "mq", None),
                             getattr(wamp, "service", None) is not None,
                             now - self._started_at)
        if problem != self.mq_error:
            log.msg(f"dockerami: no working message queue: {problem}" if problem
                    else "dockerami: the message queue works again")
        self.mq_error = problem

    def leads(self) -> bool:
        """Whether this master keeps the warm minimums (with no rows read yet: not)."""
        return self.masterid is not None and leader(self.masters) == self.masterid

    def counts(self, pool: str) -> PoolCounts:
        """The pool across all masters: the others as last read, this one as it is now."""
        mine = local_rows(self.fleet)
        others = [r for r in self.rows if r.masterid != self.masterid]
        pending = [k for k in self.pending if k not in mine]
        theirs = count(others, pool)
        local_pool = {k: v for k, v in mine.items() if v["pool"] == pool}
        in_pool_pending = [k for k in pending
                           if any(w.pool == pool and pools.instance_key(w) == k
                                  for w in list(self.fleet.workers))]
        return PoolCounts(
            in_use=theirs.in_use + len(local_pool) + len(in_pool_pending),
            idle=theirs.idle + sum(1 for v in local_pool.values() if v["state"] == "idle"),
            starting=theirs.starting + len(in_pool_pending) + sum(
                1 for v in local_pool.values() if v["state"] in shared_tables.STARTING),
        )

    @defer.inlineCallbacks
    def _ensure_tables(self) -> Any:
        if not self._tables:
            yield self.master.db.pool.do(shared_tables.create_tables)
            self._tables = True

    @defer.inlineCallbacks
    def reserve(self, worker: FleetWorker) -> Any:
        """Whether ``worker`` may have an instance: it has one, or a slot of its pool
        was free below the cap and is now claimed for it in the shared database."""
        if worker.pool is None:
            return True
        key = pools.instance_key(worker)
        if key in pools.instances_in_use(pools.members(self.fleet, worker.pool)):
            return True
        if self.masterid is None:
            return False
        cap = self.fleet.pool_limits.get(worker.pool, pools.PoolLimits()).cap
        if not pools.may_launch(worker):  # the last read shows the pool full already
            self._at_cap(worker.pool, cap, self._reads)
            return False
        yield self._ensure_tables()
        now = self.master.reactor.seconds()
        local, ended = self._local()
        want = shared_tables.Claim(self.masterid, key, worker.pool, cap, int(now))
        reads = self._reads
        ok = yield self._lock.run(self.master.db.pool.do, _mirror_and_claim, local, want, ended)
        if ok:
            self.pending[key] = now
        else:
            self._at_cap(worker.pool, cap, reads)
        return ok

    def _at_cap(self, pool: str, cap: int | None, reads: int) -> None:
        """The database refused a slot of ``pool``, or the last read showed it full:
        builds here wait for one (said once per wait, as the next free slot ends it,
        and a free slot then wakes them whatever the counts). ``reads``: the reads of the rows
        finished when the claim was asked; one that finished since, showing a slot
        free, woke nothing (the pool was not refused yet), and its freed-slot message
        is spent: the rows are read again now, not at the next pass."""
        if pool not in self._refused:
            log.msg(f"dockerami: pool {pool!r} is at its cap ({cap}) on all masters together: "
                    "builds here wait for a slot to be freed")
        self._refused.add(pool)
        if self._reads != reads and self._free.get(pool, 0) > 0:
            self._wake.tick()

    @defer.inlineCallbacks
    def claim(self, worker: FleetWorker) -> Any:
        """Right before RunInstances: hold (or refresh) the worker's slot, straight from
        the database, whatever the counts in memory say."""
        if self.masterid is None:
            return False
        yield self._ensure_tables()
        cap = self.fleet.pool_limits.get(worker.pool, pools.PoolLimits()).cap
        now = self.master.reactor.seconds()
        key = pools.instance_key(worker)
        want = shared_tables.Claim(self.masterid, key, worker.pool, cap, int(now))
        reads = self._reads
        ok = yield self._lock.run(self.master.db.pool.do, shared_tables.claim, want)
        if ok:
            self.pending[key] = now
        elif worker.pool is not None:
            self._at_cap(worker.pool, cap, reads)
        return ok

    def tick(self) -> defer.Deferred:
        if self.masterid is None:
            return defer.succeed(None)
        return self._flight.tick()

    def _done(self, result: Any) -> None:
        if isinstance(result, failure.Failure):
            self.last_error = result.getErrorMessage()
            log.msg(f"dockerami: shared fleet pass failed: {self.last_error}")
        else:
            self.last_error = ""

    @defer.inlineCallbacks
    def _pass(self) -> Any:
        fleet, master = self.fleet, self.master
        yield self._ensure_tables()
        for pool in list(fleet.pool_limits):
            # Another master's Fleet page may have changed them.
            fleet.pool_limits[pool] = yield pools.load_limits(master, pool)
        now = master.reactor.seconds()
        self._check_mq(now)
        self.pending = {k: t for k, t in self.pending.items() if now - t < CLAIM_GRACE}
        yield self._mirror(now)
        yield self._read_rows(now, forget_stopped=True)
        self.reports = yield master.db.pool.do(shared_tables.reports)
        if self.leads() and fleet.keeper is not None:
            yield fleet.keeper.tick()
        if now - self._last_reclaim >= RECLAIM_INTERVAL:
            self._last_reclaim = now
            yield self._reclaim(now)

    def _wake_if_freed(self) -> None:
        """A slot freed on another master lets builds waiting here start: more free
        slots than at the last read, or a free one in a pool whose slot the database
        refused here (when the last read had not shown it full yet, or there was none)."""
        free = {}
        for pool, limits in self.fleet.pool_limits.items():
            if limits.cap is not None:
                free[pool] = limits.cap - self.counts(pool).in_use
        if any(free[p] > self._free.get(p, free[p])
               or (p in self._refused and free[p] > 0) for p in free):
            self.fleet.after_release()
        # A pool still full keeps its wait (and says it no second time).
        self._refused = {p for p in self._refused if p in free and free[p] <= 0}
        self._free = free

    @defer.inlineCallbacks
    def _reclaim(self, now: float) -> Any:
        dead = dead_masters(self.masters, self.masterid, now, expire_after())
        if not dead:
            return
        live = {m.masterid for m in self.masters if m.active}
        done = yield self.master.db.pool.do(shared_tables.reclaims_done)
        for corpse in dead:
            if done.get(corpse.masterid) == corpse.last_active:
                continue
            mine = yield self.master.db.pool.do(shared_tables.take_reclaim, corpse, self.masterid,
                                                live)
            if not mine:
                continue
            terminated = yield self._terminate_instances_of(corpse)
            brids = yield self._release_requests(corpse.masterid)
            yield self.master.db.pool.do(shared_tables.reclaimed, corpse.masterid, self.masterid,
                                         terminated, int(now))
            log.msg(f"dockerami: master {corpse.name} (id {corpse.masterid}) is inactive "
                    f"since its heartbeat at {corpse.last_active}; reclaimed its instances: "
                    f"{', '.join(terminated) or 'none'}; gave back its build requests: "
                    f"{', '.join(map(str, brids)) or 'none'}")
            # Its build requests may start here now.
            self.fleet.after_release()

    @defer.inlineCallbacks
    def _release_requests(self, dead: int) -> Any:
        """buildbot 4.3's housekeeping of a dead master retries its builds but unclaims its
        build requests as the master doing the housekeeping (deleting that master's own
        claims), so the dead master's requests would stay claimed for ever. Give them
        back, and tell every master (the 'unclaimed' event buildbot would send)."""
        db = self.master.db
        requests = yield db.buildrequests.getBuildRequests(complete=False, claimed=dead)
        brids = sorted(r.buildrequestid for r in requests)
        if brids:
            yield db.pool.do(shared_tables.unclaim_requests, db.model.buildrequest_claims,
                             brids, dead)
            try:
                yield self.master.data.rtypes.buildrequest.generateEvent(brids, "unclaimed")
            except Exception as e:  # the requests are free; only the news is late
                log.msg(f"dockerami: could not announce unclaimed requests {brids}: {e}")
        return brids

    @defer.inlineCallbacks
    def _terminate_instances_of(self, corpse: MasterRow) -> Any:
        """Terminate every live instance tagged for the dead master, in every EC2
        endpoint this master's workers use. Raises if EC2 cannot be asked: the
        reclaim row stays open and the next pass tries again."""
        tag = instances.master_id(corpse.name)
        terminated = []
        for client in (yield self.fleet.clients()):
            found = yield client.describe_tagged(instances.MASTER_TAG, tag)
            for status in found.values():
                if status.state in reconcile_plan.LIVE_STATES:
                    yield self.fleet.terminate(client, status.instance_id)
                    self.fleet.metrics.inc("dockerami_reclaimed_total", {})
                    terminated.append(status.instance_id)
        return sorted(terminated)

    def reclaimed(self, masterid: int) -> list[str] | None:
        """The instances the last reclaim of this (dead) master ended, whichever master
        did it; None if it was never reclaimed."""
        report = self.reports.get(masterid)
        return None if report is None else list(report.instance_ids)

    def view(self) -> list[dict[str, Any]]:
        """Every master's instances, for the Fleet page: the others as last read."""
        names = {m.masterid: m for m in self.masters}
        out = []
        for row in self.rows:
            if row.masterid == self.masterid:
                continue
            m = names.get(row.masterid)
            out.append({
                "masterid": row.masterid,
                "master": m.name if m else "?",
                "master_tag": instances.master_id(m.name) if m else "",
                "master_active": bool(m and m.active),
                "here": False, "owner": row.owner, "pool": row.pool, "slot": row.slot,
                "instance_id": row.instance_id, "instance_type": row.instance_type,
                "state": row.state, "workers": list(row.workers),
            })
        for owner, values in sorted(local_rows(self.fleet).items()):
            out.append({
                "masterid": self.masterid, "master": self.master.name,
                "master_tag": self.fleet.master_id, "master_active": True, "here": True,
                "owner": owner, "pool": values["pool"],
                "slot": next((r.slot for r in self.rows if r.masterid == self.masterid
                              and r.owner == owner), None),
                "instance_id": values["instance_id"],
                "instance_type": values["instance_type"],
                "state": values["state"], "workers": values["workers"],
            })
        return sorted(out, key=lambda r: (r["master"], r["owner"]))


def _mirror_and_claim(conn: Any, local: dict[str, dict[str, Any]],
                      want: shared_tables.Claim, ended: set[str]) -> bool:
    """Rows made true first, so a slot freed here a moment ago counts as free."""
    shared_tables.mirror(conn, want.masterid, local, want.now, CLAIM_GRACE, ended=ended)
    return shared_tables.claim(conn, want)


class Heartbeat(service.BuildbotService):
    """Makes buildbot judge masters dead sooner than its 10 minutes, so a crashed
    master's instances are reclaimed sooner: this master tells the database it is
    alive every ``every`` seconds and marks masters silent for ``expire_after``
    seconds inactive (buildbot's own housekeeping: their builds are retried and their
    build requests handed back). Give every master the same values."""

    name = "dockerami-heartbeat"
    _loop: task.LoopingCall | None = None
    every: float = 60

    def checkConfig(self, every: float = 60, expire_after: float = 600) -> None:
        from buildbot import config

        for setting, value in (("every", every), ("expire_after", expire_after)):
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                config.error(f"dockerami Heartbeat: {setting}: {value!r} must be seconds > 0")
                return
        if expire_after < 3 * every:
            config.error(f"dockerami Heartbeat: expire_after ({expire_after}) must be at "
                         f"least three heartbeats (3 x every = {3 * every})")

    def reconfigService(self, every: float = 60, expire_after: float = 600) -> Any:
        self.every = every
        buildbot_masters.EXPIRE_MINUTES = expire_after / 60
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = task.LoopingCall(self._beat)
        self._loop.clock = self.master.reactor
        if self.running:
            self._loop.start(self.every, now=False).addErrback(log.err, "dockerami heartbeat")
        return defer.succeed(None)

    def startService(self) -> Any:
        d = defer.maybeDeferred(super().startService)
        if self._loop is not None and not self._loop.running:
            self._loop.start(self.every, now=False).addErrback(log.err, "dockerami heartbeat")
        return d

    def stopService(self) -> Any:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return super().stopService()

    @defer.inlineCallbacks
    def _beat(self) -> Any:
        master = self.master
        if master.masterid is None:
            return
        try:
            yield master.data.updates.masterActive(name=master.name, masterid=master.masterid)
            yield master.data.updates.expireMasters()
        except Exception as e:
            log.msg(f"dockerami: heartbeat failed: {e}")
