"""Answers to slow questions (EC2, a registry), remembered for an interval on the fleet's
clock: askers within the interval get the remembered answer, askers while the question
is on its way share it, so however many workers ask, the question is asked at most
once per key per interval. What a failed question gives is remembered the same way
(``ask`` turns a failure into its answer, e.g. "unknown"), so a failing service is not
asked harder."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

from twisted.internet import defer


class Remembered:
    """Answers by key, each remembered for the ``interval`` given when it is asked."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        #: key -> (answered at, the answer).
        self._answers: dict[Hashable, tuple[float, Any]] = {}
        #: key -> callers waiting for the question on its way.
        self._asking: dict[Hashable, list[defer.Deferred]] = {}
        #: Questions asked (for tests and the bound).
        self.calls = 0

    def get(self, key: Hashable, interval: float,
            ask: Callable[[], defer.Deferred]) -> defer.Deferred:
        """The answer to ``key``: remembered if answered less than ``interval`` seconds
        ago, else ``ask()``'s (which must not fail), shared with whoever asks meanwhile."""
        known = self._answers.get(key)
        if known is not None and self.clock() - known[0] < interval:
            return defer.succeed(known[1])
        waiter: defer.Deferred = defer.Deferred()
        if key in self._asking:
            self._asking[key].append(waiter)
            return waiter
        self._asking[key] = [waiter]
        self.calls += 1

        def answered(answer: Any) -> None:
            self._answers[key] = (self.clock(), answer)
            for each in self._asking.pop(key, []):
                each.callback(answer)

        defer.maybeDeferred(ask).addCallback(answered)
        return waiter
