"""The "image ready" step of a worker's provisioning timeline, from what its image reports.

The base AMI's bootstrap tells the worker's container when the image was ready on the
instance and whether it was on the disk already (baked into the AMI, or kept by a stop)
or how long its pull took; the reference image passes both on as worker info, which
the master receives at connect. Images that do not (the seed's) have no such step.
Pure logic.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: Worker-info keys (files in the worker's info/ directory) written by the image.
READY_INFO = "image_ready"
PULL_INFO = "image_pull"
#: The timeline key of the step.
STEP = "image_ready"


@dataclass(frozen=True)
class ImageReady:
    at: float  # the master's clock
    already_present: bool
    pull_seconds: float | None  # None: present, or not reported


def _seconds(value: Any) -> float | None:
    try:
        seconds = float(str(value).strip())
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def from_info(info: Mapping[str, Any], launched_at: float, requested_at: float,
              connected_at: float) -> ImageReady | None:
    """The step for a worker that connected at ``connected_at``, or None.

    The instance's clock may be skewed, so the reported time is clamped between the
    launch (or start) and the connection, both on the master's clock. An instance not
    launched for this request (a shared one already up) readied its image for an
    earlier one: no step.
    """
    reported = _seconds(info.get(READY_INFO))
    if reported is None or launched_at < requested_at:
        return None
    pull = str(info.get(PULL_INFO) or "").strip()
    present = pull == "present"
    return ImageReady(
        at=min(max(reported, launched_at), max(launched_at, connected_at)),
        already_present=present,
        pull_seconds=None if present else _seconds(pull),
    )


def row(timeline: Mapping[str, float], ready: ImageReady | None) -> dict[str, Any] | None:
    """The Fleet API's ``image_ready`` field, if the current timeline has the step."""
    if ready is None or STEP not in timeline:
        return None
    return {"at": ready.at, "already_present": ready.already_present,
            "pull_seconds": ready.pull_seconds}
