"""The insubstantiate override for a build buildbot 4.3 drops (see
test_faults.py::test_a_slow_instance_check_never_strands_the_next_build, which passes
with the connect-time wake-up alone): its three outcomes, on a worker with buildbot's
own insubstantiation replaced by the end state it reaches when an insubstantiation
queued ahead of it already ended the instance."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from buildbot.interfaces import LatentWorkerSubstantiatiationCancelled
from buildbot.util import Notifier
from buildbot.worker.latent import AbstractLatentWorker, States
from twisted.internet import defer

from buildbot_dockerami.worker.latent import DockerAMILatentWorker


@pytest.fixture
def worker(monkeypatch: pytest.MonkeyPatch) -> Any:
    def already_insubstantiated(self: Any, fast: bool = False,
                                force_substantiation_build: Any = None) -> defer.Deferred:
        self.state = States.NOT_SUBSTANTIATED  # and returns, forgetting the build
        return defer.succeed(None)

    monkeypatch.setattr(AbstractLatentWorker, "insubstantiate", already_insubstantiated)
    worker = object.__new__(DockerAMILatentWorker)
    worker.name = "w0"
    worker._substantiation_notifier = Notifier()
    worker.substantiated_for = []
    worker.launches = []

    def substantiate(wfb: Any, build: Any) -> defer.Deferred:
        worker.substantiated_for.append(build)
        launch: defer.Deferred = defer.fail(RuntimeError("launch failed"))
        worker.launches.append(launch)
        return launch

    worker.substantiate = substantiate
    return worker


def waiting(worker: Any) -> list[Any]:
    outcome: list[Any] = []
    worker._substantiation_notifier.wait().addBoth(outcome.append)
    return outcome


def test_the_dropped_build_is_substantiated_for(worker: Any) -> None:
    build = SimpleNamespace(stopped=False)
    outcome = waiting(worker)
    worker.insubstantiate(force_substantiation_build=build)
    assert worker.substantiated_for == [build]
    assert outcome == []  # still waiting: for the substantiation just started
    (launch,) = worker.launches
    assert launch.result is None  # its failure handled, not an "Unhandled error"


@pytest.mark.parametrize("why", ["build stopped", "worker stopping"])
def test_a_stopped_build_or_worker_is_cancelled_not_launched(worker: Any, why: str) -> None:
    build = SimpleNamespace(stopped=why == "build stopped")
    worker._stopping = why == "worker stopping"
    outcome = waiting(worker)
    worker.insubstantiate(force_substantiation_build=build)
    assert worker.substantiated_for == []
    assert len(outcome) == 1 and outcome[0].check(LatentWorkerSubstantiatiationCancelled)


def test_nothing_happens_when_no_build_waits(worker: Any) -> None:
    worker.insubstantiate(force_substantiation_build=SimpleNamespace(stopped=False))
    worker.insubstantiate()
    assert worker.substantiated_for == []
