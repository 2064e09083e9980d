"""SingleFlight: one pass at a time, ticks during a pass skipped, outcomes handed on."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, task
from twisted.python import failure

from buildbot_dockerami.fleet.service import Fleet
from buildbot_dockerami.fleet.singleflight import SingleFlight


class Work:
    """Passes that end when the test says so."""

    def __init__(self) -> None:
        self.started: list[defer.Deferred] = []
        self.outcomes: list[Any] = []

    def __call__(self) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.started.append(d)
        return d

    def finished(self, result: Any) -> None:
        self.outcomes.append(result)


def test_ticks_during_a_pass_are_skipped_and_the_next_tick_after_it_runs_again() -> None:
    work = Work()
    flight = SingleFlight(work, work.finished)
    first = flight.tick()
    assert first.called, "a LoopingCall must not wait for the pass"
    flight.tick()
    flight.tick()
    assert len(work.started) == 1 and flight.running
    work.started[0].callback("one")
    assert not flight.running and work.outcomes == ["one"]
    flight.tick()
    assert len(work.started) == 2


def test_a_failed_pass_goes_to_finished_and_does_not_stop_later_passes() -> None:
    work = Work()
    flight = SingleFlight(work, work.finished)
    flight.tick()
    work.started[0].errback(RuntimeError("EC2 said no"))
    [outcome] = work.outcomes
    assert isinstance(outcome, failure.Failure) and outcome.check(RuntimeError)
    flight.tick()
    work.started[1].callback(None)
    assert len(work.started) == 2 and work.outcomes[1] is None


def test_a_pass_that_ends_at_once_leaves_room_for_the_next() -> None:
    calls: list[Any] = []
    flight = SingleFlight(lambda: defer.succeed(len(calls)), calls.append)
    flight.tick()
    flight.tick()
    assert calls == [0, 1] and not flight.running


def test_the_reconciler_runs_one_pass_at_a_time() -> None:
    """A pass waiting on EC2 is not joined by a second one at the next tick."""
    asked: list[defer.Deferred] = []

    class SlowWorker:
        name = "w"

        def ec2_client(self) -> defer.Deferred:
            asked.append(defer.Deferred())
            return asked[-1]

    fleet, worker = Fleet(task.Clock(), "host:/basedir"), SlowWorker()
    fleet.workers.add(worker)
    reconciler = fleet.reconciler
    reconciler.tick()
    reconciler.tick()
    assert len(asked) == 1 and reconciler.passes == 0
    asked[0].errback(RuntimeError("no client"))  # the pass ends with nothing to poll
    assert reconciler.passes == 1
    reconciler.tick()
    assert len(asked) == 2


def test_with_again_ticks_during_a_pass_bring_exactly_one_more_pass() -> None:
    work = Work()
    flight = SingleFlight(work, work.finished, again=True)
    flight.tick()
    flight.tick()
    flight.tick()
    assert len(work.started) == 1
    work.started[0].callback("one")
    assert len(work.started) == 2, "the events during the pass were not looked at"
    work.started[1].callback("two")
    assert len(work.started) == 2 and work.outcomes == ["one", "two"]
