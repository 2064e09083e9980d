"""AMI refresh: an instance launched from an AMI that its worker's ``ami_filters`` no
longer pick (a newer image was registered, or its own no longer matches) is drained
(fleet/retirement.py, reason ``refresh_ami``): no new build, it ends after its running
ones, and the next launch takes the newest image.

Checked on the master's own schedule (the reconciler's pass asks each worker), never per
page read, and bounded: at most one DescribeImages per (EC2 client, filters, owners,
architecture) per ``interval`` seconds, however many workers and instances ask, plus one
per AMI ever to learn its architecture (which never changes). A failed answer is
remembered as "unknown" for the interval too: not knowing is no reason to drain.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

from twisted.internet import defer

from buildbot_dockerami.fleet import architecture
from buildbot_dockerami.fleet.remembered import Remembered

#: Seconds between two DescribeImages for the same filters (FleetSettings'
#: ``ami_refresh_interval``).
DEFAULT_INTERVAL = 600.0


def stale(launched_from: str, newest: str | None) -> bool:
    """Whether an instance launched from ``launched_from`` is due for refresh: the
    filters now pick another image (unknown, or an instance of no known AMI: no)."""
    return bool(launched_from) and newest is not None and newest != launched_from


def reason(launched_from: str, newest: str) -> str:
    """The drain's text (retirement.reason_code reads ``refresh_ami``)."""
    return f"refresh_ami: launched from {launched_from}; ami_filters now pick {newest}"


def _key(client: Any, filters: Sequence[Mapping[str, Any]], owners: Sequence[str] | None,
         arch: str) -> Hashable:
    return (id(client), repr(list(filters)), tuple(owners or ()), arch)


class AmiRefresh:
    """The newest image per (client, filters, owners, architecture), asked at most once
    per ``interval`` seconds on ``clock`` (the fleet's reactor)."""

    def __init__(self, clock: Callable[[], float], interval: float = DEFAULT_INTERVAL) -> None:
        self.interval = interval
        #: key -> the newest image id, or None: unknown.
        self._newest = Remembered(clock)

    @property
    def calls(self) -> int:
        """DescribeImages calls made (for tests and the bound)."""
        return self._newest.calls

    @defer.inlineCallbacks
    def newest_for(self, instance: Any, filters: Sequence[Mapping[str, Any]],
                   owners: Sequence[str] | None) -> Any:
        """The image ``filters`` pick now for ``instance``'s architecture (that of the
        AMI it was launched from), or None when unknown."""
        arch = yield self._arch(instance.client, instance.ami)
        return (yield self.newest(instance.client, filters, owners, arch))

    @defer.inlineCallbacks
    def _arch(self, client: Any, ami: str) -> Any:
        memo = client.memo.setdefault(architecture.IMAGE_MEMO, {})
        if ami and ami not in memo:
            try:
                found = yield client.image_architectures([ami])
            except Exception:
                found = {}
            if found.get(ami):
                memo[ami] = found[ami]  # an image's architecture never changes
        return memo.get(ami, "")

    def newest(self, client: Any, filters: Sequence[Mapping[str, Any]],
               owners: Sequence[str] | None, arch: str) -> defer.Deferred:
        def ask() -> defer.Deferred:
            d = client.newest_image(filters, owners, arch or None)
            return d.addErrback(lambda _: None)  # no image, or no answer: unknown

        return self._newest.get(_key(client, filters, owners, arch), self.interval, ask)
