"""Pool caps and warm minimums set at runtime: held under a burst, kept in the DB."""

from __future__ import annotations

import time

import pytest

from tests.harness import SUCCESS, wait_for
from tests.helpers import ids, instances, live, peak_of_live, pool_master, pools, set_pool

pytestmark = pytest.mark.integration


def test_cap_holds_under_a_burst_of_fifty_builds(make_master, cloud):
    master = pool_master(make_master, count=50, build_wait_timeout=0, command="sleep 1")
    assert set_pool(master, cap=3).status_code == 200
    with peak_of_live(cloud) as peak:
        requests_ = [master.force() for _ in range(50)]
        results = [master.wait_request(brid, 600)["results"] for brid in requests_]
    assert results == [SUCCESS] * 50
    assert 1 <= peak[0] <= 3, f"{peak[0]} instances ran at once with a cap of 3"
    assert len(instances(cloud)) >= 17  # each build had its own instance (no reuse at 0 s)


def test_warm_minimum_and_cap_survive_a_master_restart(make_master, cloud):
    master = pool_master(make_master, count=3, build_wait_timeout=2)
    assert pools(master)["pool"] == {"cap": None, "min_warm": 0, "instances": 0, "idle": 0}
    assert set_pool(master, cap=2, min_warm=1).status_code == 200
    wait_for(lambda: pools(master)["pool"]["idle"] == 1, 30, "one instance kept warm")
    (warm,) = ids(live(cloud))
    # Its idle timer (build_wait_timeout, 2 s) runs from the connection and, when the
    # pool keeps the instance, starts again without a word: nothing to wait for but that
    # moment (the Fleet page's connection time), plus a second for the termination it
    # would have begun.
    (row,) = [w for w in master.fleet()["workers"] if w["state"] == "connected"]
    timed_out = row["timeline"]["connected"] + 2 + 1
    wait_for(lambda: time.time() > timed_out, 30, "the warm instance's idle timeout")
    assert pools(master)["pool"]["idle"] == 1 and ids(live(cloud)) == [warm]
    assert cloud.faults.count("RunInstances") == 1
    assert "pre-warmed instance had no build" not in master.log()

    assert master.stop(timeout=30)
    assert len(live(cloud)) == 0
    master.start()
    status = wait_for(lambda: (p := pools(master)["pool"])["idle"] == 1 and p, 30,
                      "the warm instance to come back after the restart")
    assert (status["cap"], status["min_warm"]) == (2, 1)


def test_bad_pool_settings_are_refused(make_master, cloud):
    master = pool_master(make_master, count=2)
    assert set_pool(master, cap=1, min_warm=2).status_code == 400
    assert set_pool(master, cap=-1).status_code == 400
    assert set_pool(master, cap="3").status_code == 400
    wrong = master.control(action="set_pool", pool="nope", cap=1)
    assert wrong.status_code == 404
    assert pools(master)["pool"]["cap"] is None
