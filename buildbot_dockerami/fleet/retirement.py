"""Instances that retire themselves: the bootstrap found the disk too full even after
pruning (docs/isolation.md#disk-hygiene), started no new container, asked its workers
to shut down and said why in the worker info ``dockerami_retired``. The decisions:
what an instance reported, counted once per instance however many of its workers say
it, and that a retiring instance takes no new build and ends (terminated, never stopped
for reuse) once none of its builds runs.

And instances the master drains (docs/warm-capacity.md#retire-and-refresh): after
``max_builds_per_instance`` builds, past ``max_instance_age``, launched from an AMI
that ``ami_filters`` no longer pick (fleet/refresh.py), or running an image whose tag now
points at another digest (fleet/image_refresh.py). The same path: no new build, the
running ones finish (a busy worker is never killed), then the instance is terminated.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from twisted.internet import defer

from buildbot_dockerami.fleet.metrics import Metrics

#: The worker-info key (a file in the worker's info/ directory) the image links to the
#: bootstrap's word: "<reason>: <detail>".
RETIRED_INFO = "dockerami_retired"
#: Reasons the bootstrap gives; another is counted as "other".
SELF_REASONS = ("disk_full",)
#: Reasons the master drains an instance for (spot_rebalance: its bootstrap passes on
#: EC2's rebalance recommendation, a drain, not a failure; refresh_image: its image's
#: tag points at another digest, fleet/image_refresh.py).
DRAIN_REASONS = ("max_builds", "max_age", "refresh_ami", "refresh_image", "spot_rebalance")
REASONS = SELF_REASONS + DRAIN_REASONS
_REASON = re.compile(r"^([a-z_]{1,32}):")
_MAX_TEXT = 300


def reported(info: Mapping[str, Any] | None) -> str | None:
    """The retirement a worker's info reports ("disk_full: 0.41 GiB free ..."), or None."""
    text = (info or {}).get(RETIRED_INFO)
    if not isinstance(text, str):
        return None
    line = " ".join(text.strip().splitlines()[:1]).strip()
    if not line:
        return None
    return line if len(line) <= _MAX_TEXT else line[: _MAX_TEXT - 3] + "..."


def reason_code(text: str) -> str:
    """The metric's label for a reported retirement."""
    match = _REASON.match(text)
    return match.group(1) if match and match.group(1) in REASONS else "other"


def record(metrics: Metrics, instance: Any, text: str) -> bool:
    """Note that ``instance`` (fleet.launch.LaunchedInstance) retires; True the first time
    only, when it is counted (dockerami_retirements_total{reason})."""
    if retired(instance):
        return False
    instance.retired = text
    metrics.inc("dockerami_retirements_total", {"reason": reason_code(text)})
    return True


def planned(text: str) -> bool:
    """Whether a retirement's text is a drain the master planned (DRAIN_REASONS), no
    fault: not a failure of the worker, and shown apart on the Fleet page."""
    return reason_code(text) in DRAIN_REASONS


def message(instance: Any) -> str:
    """What the operator reads on the Fleet page and in the log."""
    if planned(instance.retired):
        return f"instance {instance.instance_id} drains: {instance.retired}"
    return f"instance {instance.instance_id} retired itself: {instance.retired}"


def build_started(instance: Any) -> None:
    """A build started on ``instance`` (told once per build, whichever slot runs it)."""
    instance.builds_started += 1


def due(instance: Any, now: float, max_builds: int | None,
        max_age: float | None) -> str | None:
    """Why the master drains ``instance`` now ("max_builds: ...", "max_age: ..."), or
    None: it serves on (or already retires, or there is none)."""
    if instance is None or retired(instance):
        return None
    if max_builds is not None and instance.builds_started >= max_builds:
        return (f"max_builds: {instance.builds_started} builds started on it "
                f"(max_builds_per_instance={max_builds})")
    launched = getattr(instance, "launched_at", 0.0) or 0.0
    if max_age is not None and launched and now - launched >= max_age:
        return (f"max_age: launched {now - launched:.0f}s ago "
                f"(max_instance_age={max_age:g})")
    return None


def retired(instance: Any) -> str:
    """Why ``instance`` retires ("" while it serves, or for no instance)."""
    return getattr(instance, "retired", "") or ""


def takes_builds(instance: Any) -> bool:
    """A retiring instance takes no new build (a worker with no instance may launch one)."""
    return not retired(instance)


#: Seconds an idle draining instance of a warm minimum waits for its replacement at
#: most (then it ends anyway: a launch that keeps failing must not keep it forever).
REPLACE_WAIT = 900.0


def may_end(instance: Any, busy: Iterable[bool]) -> bool:
    """A retiring instance ends once none of the builds on it runs (and, when it held a
    pool's warm minimum, once its replacement is ready: ``held``)."""
    return (bool(retired(instance)) and not getattr(instance, "held", False)
            and not any(busy))


@defer.inlineCallbacks
def ask(conn: Any) -> Any:
    """A connected worker's retirement, read again from its info (the image reads its
    info/ files on every request): the reason, or None (not retiring, or no answer)."""
    if conn is None:
        return None
    try:
        info = yield conn.remoteGetWorkerInfo()
    except Exception:
        return None
    return reported(info)
