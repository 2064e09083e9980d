"""How long the local cloud's instances take to come up, so benchmarks can model EC2.

moto makes an instance ``running`` the moment RunInstances answers, and the
hypervisor used to start its worker right then. EC2 does neither: an instance
is ``pending`` for a while, the OS boots for a while longer, then the base AMI
pulls the image (unless it is baked into the AMI) and starts it. A stopped
instance that is started again skips most of the OS boot and all of the pull.

``Delays`` are the knobs (all seconds, all 0 by default: the demo stays fast);
``BootClock`` remembers when each instance was launched or started and with
which image and type, as the EC2 server's WSGI layer sees the calls, and says
when the instance is ``running`` and when its worker starts. Pure logic.
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

#: Key of a per-size pull table that applies to every instance type not named.
ANY_SIZE = "*"

PullTable = Mapping[str, "float | Mapping[str, float]"]


@dataclass
class Delays:
    """``pending``: DescribeInstances says ``pending`` this long after RunInstances or
    StartInstances (then ``running``). ``boot``: from RunInstances until the base AMI
    runs its bootstrap. ``pull``: image -> seconds, or image -> {instance type: seconds,
    "*": seconds}, added to ``boot`` for a launch; images not named take
    ``default_pull``. ``start``: from StartInstances of a stopped instance until its
    bootstrap runs (the image is on its disk already: no pull); None means ``boot``.
    ``api``: how long every EC2 call takes to be answered, from its arrival (calls
    are answered in parallel, as EC2 does; moto answers at once)."""

    pending: float = 0.0
    boot: float = 0.0
    pull: PullTable = field(default_factory=dict)
    default_pull: float = 0.0
    start: float | None = None
    api: float = 0.0

    def pull_delay(self, image: str, instance_type: str) -> float:
        entry = self.pull.get(image)
        if entry is None:
            return self.default_pull
        if isinstance(entry, Mapping):
            return float(entry.get(instance_type, entry.get(ANY_SIZE, self.default_pull)))
        return float(entry)

    def validate(self) -> None:
        values = [("pending", self.pending), ("boot", self.boot),
                  ("default_pull", self.default_pull), ("start", self.start or 0.0),
                  ("api", self.api)]
        for image, entry in self.pull.items():
            sizes = entry if isinstance(entry, Mapping) else {ANY_SIZE: entry}
            values += [(f"pull[{image!r}][{size!r}]", v) for size, v in sizes.items()]
        bad = [f"{name}={value!r}" for name, value in values
               if isinstance(value, bool) or not isinstance(value, int | float) or value < 0]
        if bad:
            raise ValueError("local cloud delays must be seconds >= 0: " + ", ".join(bad))


@dataclass(frozen=True)
class Boot:
    """One launch or start of an instance, as the EC2 server saw it."""

    at: float  # monotonic
    started: bool  # StartInstances (from stopped), not RunInstances
    image: str = ""
    instance_type: str = ""


def image_of(user_data_b64: str) -> str:
    """Line 2 of the user data (the image), or "" if there is none."""
    try:
        text = base64.b64decode(user_data_b64).decode("utf-8", "replace")
    except ValueError:
        return ""
    lines = text.split("\n")
    return lines[1].strip() if len(lines) > 1 else ""


class BootClock:
    """When each instance was launched or started, and so when it is running and
    when its worker starts under the current ``delays`` (which may change at any time:
    tests do, and an already booting instance follows)."""

    def __init__(self, delays: Delays | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.delays = delays or Delays()
        self.clock = clock
        self._boots: dict[str, Boot] = {}
        self._lock = threading.Lock()

    def launched(self, instance_ids: list[str], image: str, instance_type: str,
                 at: float | None = None) -> None:
        now = self.clock() if at is None else at
        with self._lock:
            for iid in instance_ids:
                self._boots.setdefault(iid, Boot(now, False, image, instance_type))

    def started(self, instance_ids: list[str], at: float | None = None) -> None:
        """StartInstances: the image stays what the instance was launched with (its disk)."""
        now = self.clock() if at is None else at
        with self._lock:
            for iid in instance_ids:
                old = self._boots.get(iid, Boot(now, True))
                self._boots[iid] = Boot(now, True, old.image, old.instance_type)

    def boot(self, instance_id: str) -> Boot | None:
        with self._lock:
            return self._boots.get(instance_id)

    def running_at(self, instance_id: str) -> float | None:
        """When DescribeInstances starts saying ``running`` (None: never launched here)."""
        boot = self.boot(instance_id)
        return None if boot is None else boot.at + self.delays.pending

    def is_pending(self, instance_id: str) -> bool:
        at = self.running_at(instance_id)
        return at is not None and self.clock() < at

    def pull_seconds(self, instance_id: str) -> float:
        """The emulated image pull of the instance's latest boot: 0 when the image was on
        its disk already (a start from stopped, or a pull delay of 0: a baked image)."""
        boot = self.boot(instance_id)
        if boot is None or boot.started:
            return 0.0
        return self.delays.pull_delay(boot.image, boot.instance_type)

    def worker_due(self, instance_id: str) -> float | None:
        """When the base AMI starts the instance's image (None: never launched here)."""
        boot = self.boot(instance_id)
        if boot is None:
            return None
        d = self.delays
        if boot.started:
            return boot.at + (d.boot if d.start is None else d.start)
        return boot.at + d.boot + d.pull_delay(boot.image, boot.instance_type)
