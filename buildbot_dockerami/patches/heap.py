"""Keeps CPython's full garbage collections short in a master that runs a fleet.

A buildbot master with the web UI holds about a million start-up objects (config,
www, SQLAlchemy, boto3's models). Every full collection walks all of them: the burst
benchmark measured 240-290 ms with the reactor stopped, every time one ran during a
burst of launches. ``gc.freeze()`` moves what exists at the end of start-up into a
permanent generation that collections skip; garbage created later is collected as
before. Start-up objects that become cyclic garbage later (after a reconfig) are then
never freed: a small, bounded cost for a master that is reconfigured rarely.
"""

from __future__ import annotations

import gc
import time
from typing import Any

from twisted.python import log

#: Seconds after the first worker is configured: the rest of start-up is done by then.
FREEZE_DELAY = 10.0
_scheduled = False


def freeze_after_startup(reactor: Any) -> None:
    """Once per process: collect, then freeze the start-up heap, FREEZE_DELAY s from now."""
    global _scheduled
    if _scheduled:
        return
    _scheduled = True
    reactor.callLater(FREEZE_DELAY, _freeze)


def _freeze() -> None:
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    log.msg(f"dockerami: froze the start-up heap ({gc.get_freeze_count()} objects, "
            f"{(time.perf_counter() - started) * 1000:.0f} ms): full collections skip it")
