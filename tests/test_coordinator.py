"""The multi-master Coordinator alone: a fake clock, fake workers, the real shared tables
on SQLite (the database pool runs each call at once; a claim's answer may be held back to
race it with a read), a message queue that records what is sent. No master, no fleet."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from twisted.internet import defer, task
from twisted.python import log

from buildbot_dockerami.fleet import multimaster, pools, shared_tables
from buildbot_dockerami.fleet.metrics import Metrics
from buildbot_dockerami.fleet.shared_tables import Claim

ME, OTHER = 1, 2


class DbPool:
    """buildbot's db.pool as the Coordinator uses it: ``do(fn, *args)`` on a connection.
    Functions in ``held`` run at once but their answer waits for ``answer()``."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.held: set[Callable[..., Any]] = set()
        self.waiting: list[tuple[defer.Deferred, Any]] = []
        self.calls: list[str] = []

    def do(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred:
        self.calls.append(fn.__name__)
        with self.engine.connect() as conn:
            result = fn(conn, *args, **kwargs)
        if fn in self.held:
            d: defer.Deferred = defer.Deferred()
            self.waiting.append((d, result))
            return d
        return defer.succeed(result)

    def answer(self) -> None:
        waiting, self.waiting = self.waiting, []
        for d, result in waiting:
            d.callback(result)

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """As another master would: straight on the database."""
        with self.engine.connect() as conn:
            return fn(conn, *args, **kwargs)


class Mq:
    def __init__(self) -> None:
        self.sent: list[tuple[tuple[str, ...], dict[str, Any]]] = []
        self.consumer: Any = None

    def startConsuming(self, callback: Any, _filter: Any) -> defer.Deferred:
        self.consumer = callback
        return defer.succeed(self)

    def stopConsuming(self) -> None:
        self.consumer = None

    def produce(self, key: tuple[str, ...], message: dict[str, Any]) -> None:
        self.sent.append((key, message))


class State:
    """buildbot's db.state, holding each pool's limits as the Fleet page saves them."""

    def __init__(self, cap: int) -> None:
        self.cap = cap

    def getObjectId(self, name: str, class_name: str) -> defer.Deferred:
        return defer.succeed(1)

    def getState(self, objectid: int, name: str, default: Any) -> defer.Deferred:
        return defer.succeed({"cap": self.cap})


class Master:
    def __init__(self, clock: task.Clock, db: DbPool, cap: int) -> None:
        self.reactor, self.masterid, self.name = clock, ME, "me"
        self.db = type("Db", (), {"pool": db, "state": State(cap)})()
        self.mq = Mq()
        self.config = type("Config", (), {"mq": {"type": "wamp"}})()


class Group:
    def __init__(self, name: str) -> None:
        self.name, self.instance = name, None


class Worker:
    """A FleetWorker as far as the Coordinator looks at one."""

    def __init__(self, name: str, fleet: Fleet, group: Group | None = None,
                 pool: str = "p") -> None:
        self.name, self.fleet, self.pool, self.group = name, fleet, pool, group
        self.instance: Any = None
        self.conn: Any = None
        self.active = self.busy = False
        fleet.workers.append(self)


class Fleet:
    def __init__(self, clock: task.Clock, cap: int) -> None:
        self.reactor = clock
        self.workers: list[Worker] = []
        self.pool_limits = {"p": pools.PoolLimits(cap=cap)}
        self.metrics = Metrics()
        self.keeper = None
        self.in_use = pools.InUse()
        self.woken = 0
        self.shared: multimaster.Coordinator | None = None

    def after_release(self) -> None:
        self.woken += 1


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[sa.Engine]:
    eng = sa.create_engine(f"sqlite:///{tmp_path / 'state.sqlite'}")
    with eng.connect() as conn:
        conn.execute(sa.text("CREATE TABLE masters (id INTEGER PRIMARY KEY, name TEXT, "
                             "active INTEGER, last_active INTEGER)"))
        conn.execute(sa.text("INSERT INTO masters VALUES (1, 'me', 1, 0), (2, 'other', 1, 0)"))
        conn.commit()
        shared_tables.create_tables(conn)
    yield eng
    eng.dispose()


def coordinator(engine: sa.Engine, cap: int = 2) -> tuple[task.Clock, Fleet, DbPool,
                                                          multimaster.Coordinator]:
    clock = task.Clock()
    clock.advance(1000)
    db = DbPool(engine)
    fleet = Fleet(clock, cap)
    shared = multimaster.Coordinator(fleet, Master(clock, db, cap))  # type: ignore[arg-type]
    fleet.shared = shared
    shared.start()
    return clock, fleet, db, shared


@pytest.fixture
def logged() -> Iterator[list[str]]:
    lines: list[str] = []

    def observer(event: dict[str, Any]) -> None:
        lines.append(" ".join(str(m) for m in event.get("message", ())))

    log.addObserver(observer)
    yield lines
    log.removeObserver(observer)


def at_cap(lines: list[str], pool: str) -> int:
    return sum(f"pool {pool!r} is at its cap" in line for line in lines)


def freed_elsewhere(shared: multimaster.Coordinator, db: DbPool, owner: str) -> None:
    """Another master's instance ``owner`` ended: its rows written, its message heard."""
    db.run(shared_tables.mirror, OTHER, {}, 1000, multimaster.CLAIM_GRACE, ended={owner})
    shared.master.mq.consumer(("dockerami", "freed", str(OTHER)), {"masterid": OTHER})


def owners(db: DbPool) -> set[str]:
    return {r.owner for r in db.run(shared_tables.read)[0]}


def claimed(shared: multimaster.Coordinator, worker: Worker) -> bool:
    d = shared.claim(worker)  # type: ignore[arg-type]
    results: list[bool] = []
    d.addCallback(results.append)
    return results[0]


def test_only_the_instance_that_ended_gives_its_claim_back_not_a_failed_launch(engine):
    clock, fleet, db, shared = coordinator(engine)
    j, k = Worker("j", fleet), Worker("k", fleet)
    j.active = k.active = True  # both launching: their slots claimed
    assert claimed(shared, j) and claimed(shared, k)
    assert owners(db) == {"j", "k"}
    # Within one reactor turn: j's instance ends (stop_instance: still insubstantiating,
    # so still in use), and k's RunInstances fails with no answer: its instance may
    # exist, so its claim must hold for the grace period.
    shared.freed("j")
    j.active = False
    k.active = False
    clock.advance(0)
    assert owners(db) == {"k"}
    assert db.run(shared_tables.read)[0][0].state == "claimed"
    assert shared.master.mq.sent == [(("dockerami", "freed", "1"), {"masterid": 1})]
    clock.advance(multimaster.CLAIM_GRACE + multimaster.SYNC_INTERVAL)  # then k's goes
    assert owners(db) == set()
    assert shared.last_error == ""
    shared.stop()


def test_a_claim_launched_again_within_the_turn_is_kept(engine):
    clock, fleet, db, shared = coordinator(engine)
    j = Worker("j", fleet)
    j.active = True
    assert claimed(shared, j)
    shared.freed("j")  # its instance ended, and a new launch took the key at once
    clock.advance(0)
    assert owners(db) == {"j"}
    shared.stop()


def test_an_instance_groups_instance_that_ended_gives_its_claim_back_at_once(engine):
    clock, fleet, db, shared = coordinator(engine)
    group = Group("g")
    slots = [Worker(f"g-{n}", fleet, group) for n in range(2)]
    slots[0].active = True
    assert claimed(shared, slots[0])
    assert owners(db) == {"g"}
    # InstanceGroup.shutdown: the members released and the instance cleared before
    # the fleet hears (Fleet.released -> freed with the group's key).
    slots[0].active = False
    shared.freed("g")
    clock.advance(0)
    assert owners(db) == set()
    shared.stop()


class Told:
    """A Coordinator as far as the fleet tells it of ended instances."""

    def __init__(self) -> None:
        self.keys: list[str] = []

    def freed(self, key: str) -> None:
        self.keys.append(key)

    def stop(self) -> None:
        pass


class Ended:
    def __init__(self) -> None:
        self.instance_id, self.client = "i-1", None


class Member:
    def __init__(self, name: str) -> None:
        self.name, self.pool, self.busy = name, "p", False

    def arm(self) -> None:
        pass

    def release(self) -> defer.Deferred:
        return defer.succeed(None)


def told_fleet() -> tuple[Any, Told]:
    from buildbot_dockerami.fleet.service import Fleet as RealFleet

    fleet = RealFleet(task.Clock(), "m")
    fleet.pool_limits["p"] = pools.PoolLimits(cap=1)
    told = Told()
    fleet.shared = told  # type: ignore[assignment]
    fleet.terminate = lambda client, instance_id: defer.succeed("terminated")  # type: ignore
    return fleet, told


def test_the_fleet_names_the_instance_that_ended_a_workers_or_a_slot_groups():
    from buildbot_dockerami.fleet import ending

    fleet, told = told_fleet()
    ending.end(fleet, Ended(), None, "p", key="w0", reuse=False,  # type: ignore[arg-type]
               log_prefix="w0")
    assert told.keys == ["w0"]
    group = fleet.group("g")
    group.terminator = type("T", (), {"terminate": lambda self, c, i: defer.succeed(None)})()
    group.join(Member("g-0"))
    group.instance = Ended()
    group.shutdown("idle")
    assert told.keys == ["w0", "g"]


def test_a_free_slot_in_one_pool_ends_only_that_pools_wait(engine, logged):
    clock, fleet, db, shared = coordinator(engine, cap=1)
    fleet.pool_limits["q"] = pools.PoolLimits(cap=1)
    wp, wq = Worker("wp", fleet), Worker("wq", fleet, pool="q")
    db.run(shared_tables.claim, Claim(OTHER, "x", "p", 1, 1000))
    db.run(shared_tables.claim, Claim(OTHER, "y", "q", 1, 1000))
    clock.advance(multimaster.SYNC_INTERVAL)  # a pass reads both full
    assert not claimed(shared, wp) and not claimed(shared, wq)
    assert (at_cap(logged, "p"), at_cap(logged, "q"), fleet.woken) == (1, 1, 0)
    freed_elsewhere(shared, db, "x")
    assert fleet.woken == 1  # p's builds woken; they take the slot
    assert claimed(shared, wp)
    assert not claimed(shared, wq)  # q's build tried again: still waiting, said once
    assert at_cap(logged, "q") == 1
    freed_elsewhere(shared, db, "y")
    assert fleet.woken == 2 and claimed(shared, wq)
    shared.stop()


@pytest.mark.parametrize("asking", ["reserve", "claim"])
def test_a_refusal_that_raced_a_read_showing_a_free_slot_wakes_at_once(engine, asking):
    clock, fleet, db, shared = coordinator(engine, cap=1)
    wp = Worker("wp", fleet)
    clock.advance(multimaster.SYNC_INTERVAL)  # a pass reads the slot free
    db.run(shared_tables.claim, Claim(OTHER, "x", "p", 1, 1000))  # another takes it
    db.held = {shared_tables.claim, multimaster._mirror_and_claim}
    d = getattr(shared, asking)(wp)
    results: list[bool] = []
    d.addCallback(results.append)
    # While the refusal is on its way back, the other master's instance ends: this
    # master reads the slot free, as its last read did, and had no refusal yet.
    freed_elsewhere(shared, db, "x")
    assert fleet.woken == 0
    db.held = set()
    db.answer()
    assert results == [False]
    assert fleet.woken == 1  # now, not at the next pass
    assert claimed(shared, wp)
    shared.stop()


def test_an_instance_stopped_for_reuse_frees_its_slot_for_the_other_masters_too():
    from buildbot_dockerami.fleet import ending

    fleet, told = told_fleet()
    woken: list[bool] = []
    fleet.after_release = lambda: woken.append(True)
    reuse = type("L", (), {"stop_for_reuse": lambda self, i: defer.succeed(True)})()
    ending.end(fleet, Ended(), reuse, "p", key="w0", reuse=True, log_prefix="w0")
    assert (told.keys, woken) == (["w0"], [True])
    ending.end(fleet, Ended(), reuse, None, key="w1", reuse=True, log_prefix="w1")
    assert (told.keys, woken) == (["w0"], [True, True])  # no pool: no cap, nobody to tell


def test_a_coordinator_stopped_within_the_turn_writes_and_sends_nothing_after(engine):
    clock, fleet, db, shared = coordinator(engine)
    j = Worker("j", fleet)
    j.active = True
    assert claimed(shared, j)
    shared.freed("j")
    j.active = False
    shared.stop()  # the master stops within the same reactor turn
    calls = len(db.calls)
    clock.advance(0)
    shared.freed("j")  # and an instance ending while the master stops
    clock.advance(multimaster.SYNC_INTERVAL)
    assert (len(db.calls), shared.master.mq.sent, owners(db)) == (calls, [], {"j"})


def reserved(shared: multimaster.Coordinator, worker: Worker) -> bool:
    results: list[bool] = []
    shared.reserve(worker).addCallback(results.append)  # type: ignore[arg-type]
    return results[0]


def test_a_pool_read_full_says_its_builds_wait_once_and_wakes_when_a_slot_frees(engine, logged):
    """No claim is even asked when the last read shows the pool full: the wait is said
    all the same, once, and the next free slot ends it."""
    clock, fleet, db, shared = coordinator(engine, cap=1)
    worker = Worker("w", fleet)
    db.run(shared_tables.claim, Claim(OTHER, "x", "p", 1, 1000))
    clock.advance(multimaster.SYNC_INTERVAL)  # a pass reads the pool full
    asked = len(db.calls)
    assert not reserved(shared, worker) and not reserved(shared, worker)
    assert len(db.calls) == asked  # refused from the read, the database not asked
    assert at_cap(logged, "p") == 1 and fleet.woken == 0
    freed_elsewhere(shared, db, "x")
    assert fleet.woken == 1 and reserved(shared, worker)
    shared.stop()
