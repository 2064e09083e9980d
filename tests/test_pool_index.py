"""pools.InUse (the O(1) cap check) agrees with a full recount, whatever the order of
changes. Fakes stand for workers here; the real ones are in test_pools.py."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from buildbot.worker.latent import States

from buildbot_dockerami.fleet import pools


@dataclass(eq=False)
class Group:
    name: str
    instance: Any = None


@dataclass(eq=False)
class Worker:
    name: str
    pool: str | None
    group: Group | None = None
    busy: bool = False
    instance: Any = None
    state: Any = States.NOT_SUBSTANTIATED

    @property
    def active(self) -> bool:  # as DockerAMILatentWorker.active (fleet.members)
        return self.busy or self.instance is not None or self.state != States.NOT_SUBSTANTIATED


def recount(workers: list[Worker], pool: str) -> set[str]:
    return set(pools.instances_in_use(w for w in workers if w.pool == pool))


def test_index_follows_every_change() -> None:
    rng = random.Random(7)
    groups = [Group(f"g{i}") for i in range(3)]
    workers = [Worker(f"w{i}", rng.choice(["a", "b", None]),
                      rng.choice([None, None, *groups])) for i in range(30)]
    index = pools.InUse()
    index.resync(workers)
    for _ in range(2000):
        worker = rng.choice(workers)
        change = rng.randrange(5)
        if change == 0:
            worker.busy = not worker.busy
        elif change == 1:
            worker.instance = None if worker.instance else object()
        elif change == 2:
            worker.state = rng.choice(list(States))
        elif change == 3:
            worker.pool = rng.choice(["a", "b", None])
        else:
            group = rng.choice(groups)
            group.instance = None if group.instance else object()
            index.group_changed(group)
            continue
        index.note(worker)
        for pool in ("a", "b"):
            expected = recount(workers, pool)
            assert index.count(pool, 0.0) == len(expected)
            assert all(index.uses(pool, key, 0.0) for key in expected)


def test_forgotten_workers_free_their_instance() -> None:
    worker = Worker("w", "a", instance=object())
    index = pools.InUse()
    index.note(worker)
    assert index.count("a", 0.0) == 1 and index.uses("a", "w", 0.0)
    index.forget(worker)
    assert index.count("a", 0.0) == 0


def test_a_reservation_counts_until_its_worker_starts_or_it_lapses() -> None:
    """buildbot approved w1 for a build but has not started it yet: a launch decided
    in between must count it (else a cap of 1 lets two instances run)."""
    w1, w2 = Worker("w1", "a"), Worker("w2", "a")
    index = pools.InUse()
    index.resync([w1, w2])
    index.reserve("a", "w1", until=30.0)
    assert index.count("a", 1.0) == 1 and index.uses("a", "w1", 1.0)
    assert not index.uses("a", "w2", 1.0)
    w1.state = States.SUBSTANTIATING  # started: the reservation is served
    index.note(w1)
    assert index.count("a", 1.0) == 1
    w1.state = States.NOT_SUBSTANTIATED
    index.note(w1)
    assert index.count("a", 1.0) == 0  # not held again by the served reservation
    index.reserve("a", "w2", until=30.0)
    assert index.count("a", 29.0) == 1
    assert index.count("a", 31.0) == 0  # buildbot dropped the build: it lapses


def test_a_builder_holds_one_reservation_at_a_time() -> None:
    """buildbot approved w1 for builder X, then turned it down (a lock) and approves
    w2 for X's next try: w1's reservation must not keep holding the cap."""
    w1, w2 = Worker("w1", "a"), Worker("w2", "a")
    index = pools.InUse()
    index.resync([w1, w2])
    index.reserve("a", "w1", until=30.0, holder="X")
    index.reserve("a", "w2", until=30.0, holder="X")
    assert index.count("a", 1.0) == 1 and index.uses("a", "w2", 1.0)
    assert not index.uses("a", "w1", 1.0)
    index.reserve("a", "w1", until=30.0, holder="Y")  # another builder's, kept
    assert index.count("a", 1.0) == 2
