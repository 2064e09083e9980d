"""The last hours of the fleet, from the master's own memory: instances by state, sampled
on the fleet's clock, for the Fleet page's chart.

Prometheus keeps the long history (see the Grafana dashboard); this is what the page
can show without one. A sample is the same count as ``dockerami_instances`` (metrics.py),
taken every ``interval`` seconds and kept for ``span`` seconds in a bounded ring buffer:
a few kilobytes, whatever the fleet's size. Sampling reads the master's state only, never
EC2, and so does reading the samples.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from twisted.internet import task
from twisted.python import log

from buildbot_dockerami.fleet.metrics import INSTANCE_STATES, instance_states

if TYPE_CHECKING:
    from buildbot_dockerami.fleet.service import Fleet

#: Seconds between two samples, and how long they are kept.
INTERVAL = 60.0
SPAN = 6 * 3600.0


class History:
    """A ring buffer of ``(time, counts by state)``, filled by a loop on ``clock``."""

    def __init__(self, clock: Any, counts: Callable[[], Mapping[str, int]],
                 interval: float = INTERVAL, span: float = SPAN) -> None:
        self.clock = clock
        self.counts = counts
        self.interval = interval
        self.span = span
        self.samples: deque[tuple[float, tuple[int, ...]]] = deque(
            maxlen=max(1, int(span // interval)))
        self._loop: task.LoopingCall | None = None

    @classmethod
    def of(cls, fleet: Fleet) -> History:
        """The history of ``fleet``'s instances, on its clock."""
        return cls(fleet.reactor, lambda: instance_states(fleet))

    def start(self) -> None:
        """Sample now (the page has a point at once) and every ``interval`` after."""
        if self._loop is not None and self._loop.running:
            return
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True).addErrback(log.err, "dockerami history")

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def _tick(self) -> None:
        try:
            self.sample()
        except Exception:  # a bad sample never ends the loop
            log.err(None, "dockerami: fleet history sample")

    def sample(self) -> None:
        self.samples.append((self.clock.seconds(), self._row(self.counts())))

    @staticmethod
    def _row(counts: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(int(counts.get(s, 0)) for s in INSTANCE_STATES)

    def status(self) -> dict[str, Any]:
        """For the Fleet API, compact: one ``[t, n_state1, n_state2, ...]`` row per sample
        in the order of ``states`` (6 h are ~10 kB of JSON), and ``now``, the same row
        counted at this read (from memory too), so the chart ends at the present."""
        return {
            "interval": self.interval,
            "span": self.span,
            "states": list(INSTANCE_STATES),
            "samples": [[round(t, 1), *counts] for t, counts in self.samples],
            "now": [round(self.clock.seconds(), 1), *self._row(self.counts())],
        }
