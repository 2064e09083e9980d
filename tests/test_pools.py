"""Pool caps and warm minimums set at runtime: held under a burst, kept in the DB."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import pytest
import requests

from tests.harness import SUCCESS, master_cfg, wait_for
from tests.test_ec2_worker import instances

pytestmark = pytest.mark.integration


def pool_master(make_master, count: int, **kwargs):
    config = master_cfg(pool=f"'pool', count={count}", **kwargs).replace(
        "'plugins': {}", "'plugins': {'dockerami': {'anonymous_control': True}}")
    return make_master(config)


def set_pool(master, **body) -> requests.Response:
    return requests.post(f"http://127.0.0.1:{master.www_port}/plugins/dockerami/api/control",
                         json={"action": "set_pool", "pool": "pool", **body}, timeout=30)


def pools(master) -> dict:
    url = f"http://127.0.0.1:{master.www_port}/plugins/dockerami/api/fleet"
    return requests.get(url, timeout=10).json()["pools"]


def live(cloud) -> int:
    return sum(1 for i in instances(cloud) if i["State"]["Name"] in ("pending", "running"))


@contextlib.contextmanager
def peak_of_live(cloud) -> Iterator[list[int]]:
    """The most instances pending or running at once while the block runs (peak[0])."""
    peak, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], live(cloud))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        stop.set()
        sampler.join()


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
    time.sleep(4)  # longer than build_wait_timeout: the warm one is kept
    assert pools(master)["pool"]["idle"] == 1 and live(cloud) == 1

    assert master.stop(timeout=30)
    assert live(cloud) == 0
    master.start()
    status = wait_for(lambda: (p := pools(master)["pool"])["idle"] == 1 and p, 30,
                      "the warm instance to come back after the restart")
    assert (status["cap"], status["min_warm"]) == (2, 1)


def test_bad_pool_settings_are_refused(make_master, cloud):
    master = pool_master(make_master, count=2)
    assert set_pool(master, cap=1, min_warm=2).status_code == 400
    assert set_pool(master, cap=-1).status_code == 400
    assert set_pool(master, cap="3").status_code == 400
    wrong = requests.post(f"http://127.0.0.1:{master.www_port}/plugins/dockerami/api/control",
                          json={"action": "set_pool", "pool": "nope", "cap": 1}, timeout=10)
    assert wrong.status_code == 404
    assert pools(master)["pool"]["cap"] is None
