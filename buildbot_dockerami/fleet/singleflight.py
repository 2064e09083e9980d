"""One pass at a time, for periodic loops whose pass may outlast the interval: a tick
while a pass runs is skipped, not queued, so that a slow EC2 or database never piles
passes up, and the loop keeps its beat instead of waiting for the pass. Event-driven
passes (``again=True``) instead run once more after a pass that events arrived during,
so that the last event is always looked at."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer


class SingleFlight:
    """Starts ``work()`` unless a run of it is still going; each run's outcome (its
    result or Failure) goes to ``finished``, which must not raise."""

    def __init__(self, work: Callable[[], defer.Deferred],
                 finished: Callable[[Any], None], *, again: bool = False) -> None:
        self._work = work
        self._finished = finished
        self._running: defer.Deferred | None = None
        self._again = again
        self._wanted = False

    @property
    def running(self) -> bool:
        return self._running is not None

    def tick(self) -> defer.Deferred:
        """For a LoopingCall: returns at once, fired, whether or not a run started."""
        if self._running is None:
            self._running = defer.maybeDeferred(self._work)
            self._running.addBoth(self._done)
        elif self._again:
            self._wanted = True
        return defer.succeed(None)

    def _done(self, result: Any) -> None:
        self._running = None
        self._finished(result)
        if self._wanted:
            self._wanted = False
            self.tick()
