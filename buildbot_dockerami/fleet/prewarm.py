"""How long a pre-warmed instance waits for a build: as long as an idle one would
(the worker's build_wait_timeout), and longer while its pool's warm minimum needs it;
when a scheduled minimum's period has just ended, that long from the period's end."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class PrewarmTimer:
    """``expire()`` is called when the wait is over, unless ``keeps_warm()`` says the
    pool still needs the instance: then the wait starts again. ``warm_ended(within)``
    says when the period that kept it warm ended (if within that many seconds): the
    instance then waits until the idle timeout after that end."""

    def __init__(self, reactor: Any, idle_timeout: Callable[[], float],
                 keeps_warm: Callable[[], bool], expire: Callable[[], None],
                 warm_ended: Callable[[float], float | None] | None = None) -> None:
        self._reactor = reactor
        self._idle_timeout = idle_timeout
        self._keeps_warm = keeps_warm
        self._expire = expire
        self._warm_ended = warm_ended
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
            return
        idle_timeout = self._idle_timeout()
        ended = self._warm_ended(idle_timeout) if self._warm_ended is not None else None
        wait = 0.0 if ended is None else ended + idle_timeout - self._reactor.seconds()
        if wait > 0:
            self._call = self._reactor.callLater(wait, self._fired)
        else:
            self._expire()
