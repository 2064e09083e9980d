"""The stopped warm pool: which idle instances to stop instead of terminate, and which
stopped instance a launch may start again.

A stopped instance keeps its disk, so the image's layers are already there and a
start takes seconds instead of a boot plus a pull. It is reused only by the worker it
was launched for, only while it still matches what that worker would launch now
(AMI, image, instance type, launch settings), and never with its old credential: the
master writes a fresh password into its user data before starting it. Pure except
for the bookkeeping; launch.py does the EC2 calls.

How many are kept (``max_stopped``) may follow the week (schedule.py): e.g. none over
the weekend. Outside a period the surplus is terminated by the next reconciler pass.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from buildbot_dockerami.fleet import schedule

#: ``idle_action=`` values.
IDLE_ACTIONS = ("terminate", "stop")
#: Defaults for the fleet-wide limits.
DEFAULT_MAX_STOPPED = 10
DEFAULT_MAX_STOPPED_AGE = 24 * 3600.0


def launch_key(values: Mapping[str, Any]) -> str:
    """A digest of everything an instance was launched with; a stopped instance whose
    key differs from what would be launched now is stale."""
    text = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class StoppedInstance:
    owner: str
    instance: Any  # launch.LaunchedInstance
    key: str
    stopped_at: float

    @property
    def instance_id(self) -> str:
        return self.instance.instance_id


def reusable(entry: StoppedInstance | None, key: str, now: float, max_age: float) -> bool:
    return entry is not None and entry.key == key and now - entry.stopped_at <= max_age


def to_retire(entries: Iterable[StoppedInstance], now: float, max_count: int,
              max_age: float) -> list[StoppedInstance]:
    """Stopped instances past the maximum age, and the oldest beyond the maximum count."""
    fresh = sorted((e for e in entries if now - e.stopped_at <= max_age),
                   key=lambda e: e.stopped_at, reverse=True)
    old = [e for e in entries if now - e.stopped_at > max_age]
    return old + fresh[max(0, max_count):]


class StoppedPool:
    """The master's stopped instances, at most one per worker (its own)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.entries: dict[str, StoppedInstance] = {}
        self._clock = clock
        self._limit = schedule.Schedule((), DEFAULT_MAX_STOPPED)
        self._limit_spec: Any = DEFAULT_MAX_STOPPED
        self.max_age = DEFAULT_MAX_STOPPED_AGE

    @property
    def max_count(self) -> int:
        """``max_stopped`` now (a number, or the value of its period in force)."""
        return self._limit.value(self._clock())

    @max_count.setter
    def max_count(self, spec: Any) -> None:
        """A whole number or periods (checked at checkconfig)."""
        if spec != self._limit_spec:
            self._limit = schedule.parse(spec)
            self._limit_spec = spec

    def add(self, entry: StoppedInstance) -> None:
        self.entries[entry.owner] = entry

    def take(self, owner: str) -> StoppedInstance | None:
        return self.entries.pop(owner, None)

    def by_instance(self) -> dict[str, StoppedInstance]:
        return {e.instance_id: e for e in self.entries.values()}

    def instance_lost(self, status: Any) -> None:
        """The reconciler found a stopped instance gone (terminated from outside)."""
        if status.state in ("shutting-down", "terminated"):
            self.drop(status.instance_id)

    def drop(self, instance_id: str) -> StoppedInstance | None:
        for owner, entry in list(self.entries.items()):
            if entry.instance_id == instance_id:
                return self.entries.pop(owner)
        return None
