"""How long each pool takes to provision an instance, as this master measured it: the
lead by which a scheduled warm minimum starts warming before its period (schedule.py,
pools.py), so the capacity is ready at the period's start, not minutes after.

A duration runs from a substantiation's request to its worker's connection, counted
only when the instance was launched (or started from the stopped pool) for that
request: a slot's fresh container on an instance already up is no provisioning.
"""

from __future__ import annotations

import math
from collections import deque

#: Recent durations kept per pool: enough for a stable high percentile, few enough
#: that a change (a bigger image, another AMI) shows within a day's launches.
SAMPLES = 20
#: The share of recent provisionings the lead covers.
PERCENTILE = 0.9
#: The lead before anything is measured: an EC2 boot plus an image pull of a few GB
#: take a few minutes; starting early costs minutes of one idle instance, starting
#: late is what the schedule is there to avoid.
DEFAULT_LEAD = 300.0
#: A lead measured from a boot that hung for long is not believed beyond this.
MAX_LEAD = 3600.0


def percentile(values: list[float], share: float) -> float:
    """The nearest-rank percentile: the smallest value at least ``share`` of them reach."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


class ProvisioningTimes:
    """Per pool, the last SAMPLES provisioning durations."""

    def __init__(self) -> None:
        self._recent: dict[str, deque[float]] = {}

    def record(self, pool: str | None, seconds: float) -> None:
        if pool is None or not math.isfinite(seconds) or seconds < 0:
            return
        self._recent.setdefault(pool, deque(maxlen=SAMPLES)).append(seconds)

    def samples(self, pool: str) -> int:
        return len(self._recent.get(pool, ()))

    def lead(self, pool: str) -> float:
        """The PERCENTILE of the pool's recent durations, or DEFAULT_LEAD before any."""
        recent = self._recent.get(pool)
        if not recent:
            return DEFAULT_LEAD
        return min(MAX_LEAD, percentile(list(recent), PERCENTILE))
