"""pools.InUse (the O(1) cap check) agrees with a full recount, whatever the order of
changes. Fakes stand for workers here; the real ones are in test_pools.py."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from buildbot.worker.latent import States

from buildbot_dockerami import pools


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
            assert index.count(pool) == len(expected)
            assert all(index.uses(pool, key) for key in expected)


def test_forgotten_workers_free_their_instance() -> None:
    worker = Worker("w", "a", instance=object())
    index = pools.InUse()
    index.note(worker)
    assert index.count("a") == 1 and index.uses("a", "w")
    index.forget(worker)
    assert index.count("a") == 0
