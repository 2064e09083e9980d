"""A stand-in reactor for a ``Fleet`` whose EC2 thread pool really runs, in tests that
have no reactor running: what the pool's threads hand back runs when the test says."""

from __future__ import annotations

import threading
from typing import Any

from twisted.internet import task


class ThreadedReactor(task.Clock):
    def __init__(self) -> None:
        super().__init__()
        self.handed_back: list[Any] = []
        self._handed = threading.Condition()

    def callFromThread(self, f: Any, *args: Any, **kwargs: Any) -> None:
        with self._handed:
            self.handed_back.append(lambda: f(*args, **kwargs))
            self._handed.notify_all()

    def addSystemEventTrigger(self, *args: Any) -> None:
        pass  # the test stops the fleet's pool itself

    def run_handed_back(self, count: int) -> None:
        with self._handed:
            handed = self._handed.wait_for(lambda: len(self.handed_back) >= count, timeout=10)
            assert handed, "the pool thread never finished"
            calls, self.handed_back = self.handed_back, []
        for call in calls:
            call()
