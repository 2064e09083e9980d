"""The reconciler and a shared instance, each made alone from what it uses (a clock,
the holdings, the terminator, the metrics), on FakeEc2 and a fake clock: no fleet
service, no master."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

from twisted.internet import defer, task

from buildbot_dockerami.cloud import instances
from buildbot_dockerami.cloud.ec2 import LaunchSpec
from buildbot_dockerami.cloud.testing import FakeEc2, InlineThreads
from buildbot_dockerami.fleet.holdings import Holdings
from buildbot_dockerami.fleet.metrics import Metrics
from buildbot_dockerami.fleet.monitor import StateMonitor
from buildbot_dockerami.fleet.reconciler import Reconciler
from buildbot_dockerami.fleet.shared_instance import InstanceGroup
from buildbot_dockerami.fleet.termination import Terminator

FLEET = Path(__file__).resolve().parent.parent / "buildbot_dockerami" / "fleet"
MASTER = instances.master_id("host:/basedir")


class Worker:
    """A FleetWorker as far as the holdings look at one."""

    def __init__(self, name: str, client: Any) -> None:
        self.name, self.client, self.instance = name, client, None
        self.lost: list[Any] = []

    def ec2_client(self) -> defer.Deferred:
        return defer.succeed(self.client)

    def instance_lost(self, status: Any) -> None:
        self.lost.append(status)


class Launched:
    def __init__(self, client: Any, instance_id: str) -> None:
        self.client, self.instance_id = client, instance_id


def parts() -> tuple[task.Clock, FakeEc2, Any, Holdings, Terminator, Metrics]:
    clock, fake, threads = task.Clock(), FakeEc2(), InlineThreads()
    terminator = Terminator(clock, StateMonitor(clock=clock.seconds), lambda: False)
    return clock, fake, threads.client(fake), Holdings(), terminator, Metrics()


def launch(fake: FakeEc2, worker: str) -> str:
    tags = instances.instance_tags(worker, MASTER, {})
    return fake.run_instance(LaunchSpec(ami="ami-1", instance_type="t3.micro",
                                        user_data="u", tags=tags)).instance_id


def test_the_reconciler_alone_ends_what_nobody_holds_and_tells_holders_of_losses() -> None:
    clock, fake, client, holdings, terminator, metrics = parts()
    held, untracked, lost = launch(fake, "w0"), launch(fake, "w1"), launch(fake, "w2")
    worker, loser = Worker("w0", client), Worker("w2", client)
    worker.instance, loser.instance = Launched(client, held), Launched(client, lost)
    holdings.workers.update([worker, loser])
    fake.terminated_elsewhere([lost])
    reconciler = Reconciler(clock, MASTER, holdings, terminator=terminator, metrics=metrics,
                            stopping=lambda: False)
    reconciler.start(30, first_delay=1)
    clock.advance(1)  # first pass: the untracked one is a suspect only
    assert fake.status(untracked).state == "running"
    assert [s.instance_id for s in loser.lost] == [lost]
    clock.advance(30)  # second pass: still untracked, so ended
    assert fake.status(untracked).state in instances.GONE_STATES
    assert fake.status(held).state == "running"
    assert metrics.counter("dockerami_untracked_terminated_total", {}) == 1
    reconciler.stop()


def test_a_shared_instance_alone_launches_once_and_ends_when_idle() -> None:
    clock, fake, client, holdings, terminator, _ = parts()
    released: list[tuple[str | None, Any]] = []
    group = InstanceGroup("g", clock, terminator, holdings,
                          lambda pool, g: released.append((pool, g)))
    holdings.groups["g"] = group
    group.idle_timeout = 60
    launches = []

    class Slot:
        busy, pool = False, None

        def __init__(self, name: str) -> None:
            self.name, self.armed = name, 0

        def arm(self) -> None:
            self.armed += 1

        def release(self) -> defer.Deferred:
            return defer.succeed(None)

    def launch_one() -> defer.Deferred:
        launches.append(1)
        return defer.succeed((Launched(client, launch(fake, "g")), {}))

    slots = [Slot("a"), Slot("b")]
    for slot in slots:
        group.join(slot)
    first, second = group.acquire(launch_one), group.acquire(launch_one)
    assert first.result is second.result and len(launches) == 1
    assert [s.armed for s in slots] == [1, 1]
    iid = group.instance.instance_id
    clock.advance(59)
    assert fake.status(iid).state == "running"
    clock.advance(1)
    assert fake.status(iid).state in instances.GONE_STATES
    assert released == [(None, group)] and group.instance is None


def test_the_parts_the_fleet_is_made_of_do_not_know_the_fleet() -> None:
    """No cycle: the reconciler, shared instances, termination and holdings import
    nothing of the fleet service, not even for type checking."""
    for name in ("reconciler", "shared_instance", "termination", "holdings"):
        tree = ast.parse((FLEET / f"{name}.py").read_text())
        imported = {node.module for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.module}
        assert "buildbot_dockerami.fleet.service" not in imported, name
