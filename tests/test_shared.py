"""The shared tables on their own: slot claims under racing masters (threads on real
PostgreSQL, and SQLite), mirrors, reclaim ownership; and the pure decisions."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from buildbot_dockerami.fleet import multimaster, shared_tables
from buildbot_dockerami.fleet.shared_tables import Claim, MasterRow, Row


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sa.Engine]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'state.sqlite'}"
    else:
        url = request.getfixturevalue("postgres").new_database()
    eng = sa.create_engine(url, pool_size=20) if request.param != "sqlite" else sa.create_engine(
        url, connect_args={"timeout": 60})
    with eng.connect() as conn:
        if request.param == "sqlite":  # buildbot's schema is in the PostgreSQL template
            conn.execute(sa.text("CREATE TABLE masters (id INTEGER PRIMARY KEY, name TEXT, "
                                 "active INTEGER, last_active INTEGER)"))
            conn.commit()
        shared_tables.create_tables(conn)
        shared_tables.create_tables(conn)  # a second master finds them made
    yield eng
    eng.dispose()


def run(engine: sa.Engine, fn, *args, **kwargs):
    with engine.connect() as conn:
        return fn(conn, *args, **kwargs)


def test_racing_masters_never_take_more_slots_than_the_cap(engine):
    results: list[bool] = []
    lock = threading.Lock()
    barrier = threading.Barrier(12)

    def master(masterid: int) -> None:
        barrier.wait()
        for n in range(4):
            ok = run(engine, shared_tables.claim, Claim(masterid, f"w{n}", "pool", 5, 100))
            with lock:
                results.append(ok)

    threads = [threading.Thread(target=master, args=(i,)) for i in range(1, 13)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows, _ = run(engine, shared_tables.read)
    assert results.count(True) == 5 == len(rows)
    assert sorted(r.slot for r in rows) == [0, 1, 2, 3, 4]
    # Asking again for a held slot is a yes, and takes no second slot.
    held = rows[0]
    assert run(engine, shared_tables.claim, Claim(held.masterid, held.owner, "pool", 5, 101))
    assert len(run(engine, shared_tables.read)[0]) == 5


def test_mirror_gives_back_unused_claims_and_records_running_instances(engine):
    assert run(engine, shared_tables.claim, Claim(1, "a", "pool", 2, 100))
    assert run(engine, shared_tables.claim, Claim(1, "b", "pool", 2, 100))
    assert not run(engine, shared_tables.claim, Claim(2, "a", "pool", 2, 100))
    local = {"a": {"pool": "pool", "state": "idle", "instance_id": "i-1",
                   "instance_type": "t3.micro", "workers": ["a"]},
             "solo": {"pool": None, "state": "building", "instance_id": "i-2",
                      "instance_type": "t3.micro", "workers": ["solo"]}}
    run(engine, shared_tables.mirror, 1, local, 110, 30.0)  # b's claim is 10 s old: kept
    rows = {r.owner: r for r in run(engine, shared_tables.read)[0]}
    assert set(rows) == {"a", "b", "solo"}
    assert (rows["a"].state, rows["a"].instance_id, rows["a"].workers) == ("idle", "i-1", ("a",))
    assert (rows["solo"].pool, rows["solo"].slot) == (None, None)
    run(engine, shared_tables.mirror, 1, local, 200, 30.0)  # b never launched: given back
    assert {r.owner for r in run(engine, shared_tables.read)[0]} == {"a", "solo"}
    assert run(engine, shared_tables.claim, Claim(2, "a", "pool", 2, 200))  # master 2 gets b's slot


def test_mirror_gives_back_at_once_the_claim_of_an_instance_that_came_and_went(engine):
    # Claimed right before its launch, ended before any mirror saw it running: its row
    # still says "claimed", but its master knows it ended; the slot is free now.
    assert run(engine, shared_tables.claim, Claim(1, "a", "pool", 1, 100))
    assert run(engine, shared_tables.claim, Claim(1, "b", "pool", 2, 100))
    run(engine, shared_tables.mirror, 1, {}, 101, 30.0, ended={"a"})
    assert {r.owner for r in run(engine, shared_tables.read)[0]} == {"b"}  # b: within grace
    assert run(engine, shared_tables.claim, Claim(2, "c", "pool", 2, 101))


def test_one_live_master_reclaims_a_dead_one_and_a_dead_reclaimer_is_taken_over(engine):
    dead = MasterRow(7, "host:/dead", False, 1000)
    assert run(engine, shared_tables.take_reclaim, dead, 1, {1, 2})
    assert not run(engine, shared_tables.take_reclaim, dead, 2, {1, 2})
    assert run(engine, shared_tables.take_reclaim, dead, 1, {1, 2})  # its own unfinished one
    assert run(engine, shared_tables.take_reclaim, dead, 2, {2})  # master 1 died meanwhile
    assert run(engine, shared_tables.claim, Claim(7, "x", "pool", 1, 900))
    run(engine, shared_tables.reclaimed, 7, 2, ["i-1", "i-2"], 1050)
    assert run(engine, shared_tables.reclaims_done) == {7: 1000}
    # Every master reads what was reclaimed, from the database (kept across restarts).
    assert run(engine, shared_tables.reports) == {
        7: shared_tables.ReclaimReport(2, 1050, ("i-1", "i-2"))}
    assert run(engine, shared_tables.read)[0] == []  # its slot is free again
    assert not run(engine, shared_tables.take_reclaim, dead, 1, {1, 2})  # done with this death
    again = MasterRow(7, "host:/dead", False, 5000)  # restarted, then died again
    assert run(engine, shared_tables.take_reclaim, again, 1, {1, 2})


def test_dead_leader_and_counts_decisions():
    masters = [MasterRow(1, "a", False, 0), MasterRow(2, "b", True, 990),
               MasterRow(3, "c", True, 995), MasterRow(4, "d", False, 985)]
    assert multimaster.leader(masters) == 2
    assert [m.masterid for m in multimaster.dead_masters(masters, 2, 1000, 60)] == [1]
    assert multimaster.stopped_masters(masters, 2, 1000, 60) == [4]
    rows = [Row(2, "a", "p", 0, "i-1", "", "idle", ("a",), 0),
            Row(3, "b", "p", 1, "", "", "claimed", (), 0),
            Row(3, "c", "q", None, "i-3", "", "building", ("c",), 0)]
    assert multimaster.count(rows, "p") == multimaster.PoolCounts(in_use=2, idle=1, starting=1)


def test_every_series_carries_the_master_label_when_asked():
    from prometheus_client.exposition import generate_latest

    from buildbot_dockerami.fleet.metrics import Metrics, families, labelled

    metrics = Metrics()
    metrics.inc("dockerami_instance_launches_total", {"worker": "w0"})
    metrics.observe("dockerami_provisioning_seconds", 3, {"isolation": "none"})
    gauges = {"dockerami_instances": {(("state", "idle"),): 1}}
    found = labelled(families(metrics, gauges, ["w0"]), {"master": "m-1"})

    class Registry:
        def collect(self):
            return found

    text = generate_latest(Registry()).decode()  # type: ignore[arg-type]
    series = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert series and all('master="m-1"' in line for line in series)
    assert any(line.startswith("dockerami_instance_launches_total{") and 'worker="w0"' in line
               and line.endswith(" 1.0") for line in series), series


def test_a_message_queue_that_cannot_work_is_named():
    wamp = {"type": "wamp", "router_url": "ws://127.0.0.1:1/ws", "realm": "r"}
    assert multimaster.mq_problem(wamp, joined=True, waited=100) == ""
    assert multimaster.mq_problem(wamp, joined=False, waited=multimaster.MQ_GRACE - 1) == ""
    late = multimaster.mq_problem(wamp, joined=False, waited=multimaster.MQ_GRACE)
    assert "not connected to the WAMP router 'ws://127.0.0.1:1/ws' (realm 'r')" in late
    assert "'simple'" in multimaster.mq_problem({}, joined=False, waited=0)
