"""Batched instance-state checks: however many workers wait for their instances to
boot, one DescribeInstances per EC2 client per interval answers them all."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.python import log

from buildbot_dockerami.cloud.ec2 import AsyncEc2
from buildbot_dockerami.cloud.instances import InstanceStatus


class StateMonitor:
    """Answers "what state is instance X in?" with at most one DescribeInstances per
    client per ``max_age`` however many workers ask, and shares in-flight calls."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._watched: dict[str, tuple[AsyncEc2, float]] = {}
        self._watchers: dict[str, set[str]] = {}
        self._cache: dict[str, InstanceStatus] = {}
        self._polled_at: dict[AsyncEc2, float] = {}
        self._waiters: dict[AsyncEc2, list[defer.Deferred]] = {}

    def watch(self, client: AsyncEc2, instance_id: str, watcher: str = "") -> None:
        """Start checking ``instance_id``; several watchers (slots) may share one instance."""
        if instance_id not in self._watched:
            self._watched[instance_id] = (client, self._clock())
        self._watchers.setdefault(instance_id, set()).add(watcher)

    def unwatch(self, instance_id: str, watcher: str | None = None) -> None:
        """Stop checking for ``watcher`` (None: for everyone)."""
        watchers = self._watchers.get(instance_id, set())
        if watcher is None:
            watchers.clear()
        watchers.discard(watcher or "")
        if not watchers:
            self._watchers.pop(instance_id, None)
            self._watched.pop(instance_id, None)
            self._cache.pop(instance_id, None)

    def seconds_since_watch(self, instance_id: str) -> float:
        _, since = self._watched.get(instance_id, (None, self._clock()))
        return self._clock() - since

    @defer.inlineCallbacks
    def status(self, instance_id: str, max_age: float) -> Any:
        """The instance's latest status, or None if EC2 does not (yet) know it."""
        if instance_id not in self._watched:
            return None
        client, _ = self._watched[instance_id]
        stale = self._clock() - self._polled_at.get(client, float("-inf")) > max_age
        if stale or client in self._waiters:
            yield self._poll(client)
        return self._cache.get(instance_id)

    def _poll(self, client: AsyncEc2) -> defer.Deferred:
        waiter: defer.Deferred = defer.Deferred()
        waiting = self._waiters.setdefault(client, [])
        waiting.append(waiter)
        if len(waiting) == 1:
            self._polled_at[client] = self._clock()
            ids = [iid for iid, (c, _) in self._watched.items() if c is client]
            d = client.describe(ids)
            d.addBoth(self._poll_done, client, ids)
        return waiter

    def _poll_done(self, result: Any, client: AsyncEc2, ids: list[str]) -> None:
        if isinstance(result, dict):
            for iid in ids:
                if iid in result:
                    self._cache[iid] = result[iid]
                else:
                    self._cache.pop(iid, None)
        else:
            # A failed poll must be retried by the next caller, not cached as fresh.
            self._polled_at.pop(client, None)
            log.msg(f"dockerami: DescribeInstances failed: {result.getErrorMessage()}")
        for waiter in self._waiters.pop(client, []):
            if isinstance(result, dict):
                waiter.callback(None)
            else:
                waiter.errback(result)
