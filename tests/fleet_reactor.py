"""A stand-in reactor for a ``Fleet`` whose EC2 thread pool really runs, in tests that
have no reactor running: what the pool's threads hand back runs when the test says."""

from __future__ import annotations

import threading
import time
from typing import Any

from twisted.internet import task


class ThreadedReactor(task.Clock):
    def __init__(self) -> None:
        super().__init__()
        self.handed_back: list[Any] = []
        self._lock = threading.Lock()

    def callFromThread(self, f: Any, *args: Any, **kwargs: Any) -> None:
        with self._lock:
            self.handed_back.append(lambda: f(*args, **kwargs))

    def addSystemEventTrigger(self, *args: Any) -> None:
        pass  # the test stops the fleet's pool itself

    def run_handed_back(self, count: int) -> None:
        deadline = time.monotonic() + 10
        while len(self.handed_back) < count:
            assert time.monotonic() < deadline, "the pool thread never finished"
            time.sleep(0.01)
        with self._lock:
            calls, self.handed_back = self.handed_back, []
        for call in calls:
            call()
