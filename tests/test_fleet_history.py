"""The Fleet page's chart data: instances by state, sampled on the fleet's own clock into
a bounded buffer (fleet/history.py), and the per-pool gauge beside it; a fake clock, no
master, no EC2."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import task

from buildbot_dockerami.fleet import history
from buildbot_dockerami.fleet.history import History
from buildbot_dockerami.fleet.metrics import INSTANCE_STATES, pool_instances
from buildbot_dockerami.fleet.pools import PoolLimits
from buildbot_dockerami.fleet.service import Fleet


class Instance:
    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id


class Worker:
    """A FleetWorker as far as the instance counts look at one."""

    def __init__(self, name: str, pool: str | None = None) -> None:
        self.name, self.pool = name, pool
        self.instance: Any = None
        self.conn: Any = None
        self.busy = False
        self.group: Any = None


def test_samples_on_the_fleets_clock_and_keeps_only_the_span() -> None:
    clock = task.Clock()
    clock.advance(1000)
    counts = {"booting": 1}
    kept = History(clock, lambda: counts, interval=60, span=600)
    kept.start()
    assert kept.status()["samples"] == [[1000, 1, 0, 0, 0, 0, 0]]  # at once
    counts = {"building": 2, "connected": 1}
    clock.advance(30)
    # The present, counted at the read, ends the chart; the buffer is not touched.
    assert kept.status()["now"] == [1030, 0, 1, 2, 0, 0, 0]
    clock.advance(30)
    assert kept.status()["samples"][-1] == [1060, 0, 1, 2, 0, 0, 0]
    clock.pump([60] * 20)
    samples = kept.status()["samples"]
    assert len(samples) == 10  # 600 s of 60 s samples: the oldest are gone
    assert [s[0] for s in samples] == [1000 + 60 * i for i in range(12, 22)]
    kept.stop()
    clock.advance(600)
    assert len(kept.samples) == 10 and kept.samples[-1][0] == 2260


def test_a_failing_count_skips_a_sample_and_the_loop_goes_on() -> None:
    clock = task.Clock()
    answers: list[Any] = [{"idle": 1}, RuntimeError("boom"), {"idle": 3}]

    def counts() -> Any:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    kept = History(clock, counts, interval=60, span=600)
    kept.start()
    clock.advance(60)
    clock.advance(60)
    idle = INSTANCE_STATES.index("idle")
    assert [(t, counts[idle]) for t, counts in kept.samples] == [(0, 1), (120, 3)]
    kept.stop()


def test_the_fleet_samples_what_dockerami_instances_counts_from_start_to_stop() -> None:
    clock = task.Clock()
    fleet = Fleet(clock, "history-test")
    fleet.pool_limits.update({"linux": PoolLimits(), "arm": PoolLimits()})
    building, booting = Worker("w0", "linux"), Worker("w1", "linux")
    building.instance, building.conn, building.busy = Instance("i-0"), object(), True
    booting.instance = Instance("i-1")
    slot = Worker("s0", "linux")  # a slot between builds: its group holds the instance
    fleet.workers.update([building, booting, slot])
    fleet.group("slots").join(slot)
    fleet.group("slots").instance = Instance("i-2")
    fleet.startService()
    (sample,) = fleet.history.status()["samples"]
    assert dict(zip(INSTANCE_STATES, sample[1:], strict=True)) == {
        "booting": 1, "connected": 0, "building": 1, "idle": 1, "terminating": 0,
        "stopped": 0}
    assert pool_instances(fleet) == {"arm": 0, "linux": 3}
    booting.conn = object()
    clock.advance(history.INTERVAL)
    assert fleet.history.status()["samples"][-1][1:3] == [0, 1]  # booting 0, connected 1
    fleet.stopService()
    clock.advance(history.INTERVAL * 3)
    assert len(fleet.history.samples) == 2


def test_six_hours_of_samples_stay_small() -> None:
    clock = task.Clock()
    clock.advance(1_765_000_000)  # epoch seconds, as a real master's clock gives
    kept = History(clock, lambda: {"building": 120, "connected": 35, "booting": 8})
    kept.start()
    clock.pump([history.INTERVAL] * 1000)
    status = kept.status()
    assert len(status["samples"]) == history.SPAN / history.INTERVAL
    assert len(json.dumps(status)) < 16_000
    kept.stop()
