"""How long a pre-warmed instance waits for a build: as long as an idle one would
(the worker's build_wait_timeout), and longer while its pool's warm minimum needs it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class PrewarmTimer:
    """``expire()`` is called when the wait is over, unless ``keeps_warm()`` says the
    pool still needs the instance: then the wait starts again."""

    def __init__(self, reactor: Any, idle_timeout: Callable[[], float],
                 keeps_warm: Callable[[], bool], expire: Callable[[], None]) -> None:
        self._reactor = reactor
        self._idle_timeout = idle_timeout
        self._keeps_warm = keeps_warm
        self._expire = expire
        self._call: Any = None

    def start(self) -> None:
        self.cancel()
        idle_timeout = self._idle_timeout()  # as configured now (a reconfig may change it)
        if idle_timeout >= 0:  # buildbot's convention: negative is never
            self._call = self._reactor.callLater(max(idle_timeout, 1), self._fired)

    def cancel(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _fired(self) -> None:
        self._call = None
        if self._keeps_warm():
            self.start()
        else:
            self._expire()
