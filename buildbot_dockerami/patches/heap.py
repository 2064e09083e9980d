"""Keeps CPython's full garbage collections short in a master that runs a fleet.

A buildbot master with the web UI holds about a million start-up objects (config,
www, SQLAlchemy, boto3's models). Every full collection walks all of them, with the
reactor stopped, and one that comes during a burst of launches stalls the burst.
``gc.freeze()`` moves what exists at the end of start-up into a permanent generation
that collections skip; garbage created later is collected as before.

When: as the master says it has started (its ``masters/<id>/started`` event, sent once
its configuration is loaded and its services reconfigured), because a restart with
build requests queued hands out a burst right after; or FREEZE_DELAY seconds after the
first worker is configured, for a worker added to a running master by a reconfig.
How: only the young generations are collected first (cheap), not a full collection,
which would itself be the stall this avoids. The cost: start-up objects that are
already cyclic garbage, or become garbage later (after a reconfig), are never freed;
small and bounded for a master that is reconfigured rarely.
"""

from __future__ import annotations

import gc
import time
from typing import Any

from twisted.python import log

#: Seconds after the first worker is configured, if the master's start is never heard.
FREEZE_DELAY = 10.0
_state = {"scheduled": False, "frozen": False}


def freeze_when_started(master: Any) -> None:
    """Once per process: freeze the start-up heap when the master has started."""
    if _state["scheduled"]:
        return
    _state["scheduled"] = True
    timer = master.reactor.callLater(FREEZE_DELAY, freeze)
    masterid = getattr(master, "masterid", None)
    if masterid is None or getattr(master, "mq", None) is None:
        return

    def started(key: Any, message: Any) -> None:
        if timer.active():
            timer.cancel()
        freeze()

    d = master.mq.startConsuming(started, ("masters", str(masterid), "started"))
    d.addCallback(lambda consumer: master.reactor.callLater(
        FREEZE_DELAY, consumer.stopConsuming))
    d.addErrback(log.err, "dockerami: waiting for the master's start")


def freeze() -> None:
    if _state["frozen"]:
        return
    _state["frozen"] = True
    started = time.perf_counter()
    gc.collect(1)
    gc.freeze()
    log.msg(f"dockerami: froze the start-up heap ({gc.get_freeze_count()} objects, "
            f"{(time.perf_counter() - started) * 1000:.0f} ms): full collections skip it")
