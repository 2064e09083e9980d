"""Image refresh: an instance whose image reported the digest it runs (worker info
``image_digest``, protocol/imagedigest.py) while its image's tag now points at another
digest is drained (fleet/retirement.py, reason ``refresh_image``): no new build, it ends
after its running ones, and the next launch pulls the tag again.

Checked on the master's own schedule (the reconciler's pass asks each worker), never per
page read, and bounded: at most one registry check (cloud/image_digests.py: one HEAD,
plus a token request where the registry wants one) per (image reference, credentials)
per ``interval`` seconds, however many workers and instances ask; askers share the check
in flight; at most CHECKS_AT_ONCE checks run at once (each within the client's deadline).
A failed check is remembered as "unknown" for the interval too, and logged once: not
knowing is no reason to drain. A reference pinned by digest never refreshes, nor does an
instance whose image reported no digest.

An answer drains only the instances that reported their digest before it was asked
(``newer``): a cached answer older than an instance's report may predate what it pulled
(the tag moved after the check, the instance pulled the new image), so that instance
waits for the next check rather than being drained for running the newest image.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.python import log

from buildbot_dockerami.fleet.remembered import Remembered
from buildbot_dockerami.protocol import imagedigest

#: Seconds between two checks of the same image reference (FleetSettings'
#: ``image_refresh_interval``).
DEFAULT_INTERVAL = 600.0
#: Registry checks at once (they run in the fleet's thread pool, which EC2 calls share).
CHECKS_AT_ONCE = 4


def stale(running: str | None, current: str | None) -> bool:
    """Whether an instance running ``running`` is due for refresh: the tag now points
    at another digest (unknown, or an instance that reported none: no)."""
    return (imagedigest.valid(running) and imagedigest.valid(current)
            and running != current)


def newer(asked_at: float | None, reported_at: float) -> bool:
    """Whether an answer asked of the registry at ``asked_at`` is newer than what an
    instance that reported its digest at ``reported_at`` pulled (same clock)."""
    return asked_at is not None and asked_at > reported_at


def reason(image: str, running: str, current: str) -> str:
    """The drain's text (retirement.reason_code reads ``refresh_image``)."""
    return (f"refresh_image: runs {imagedigest.short(running)}; {image} now points at "
            f"{imagedigest.short(current)}")


class ImageRefresh:
    """The digest each image tag points at, asked at most once per ``interval`` seconds
    on ``clock`` (the fleet's reactor) through ``source`` (an object with
    ``digest(image, auth) -> Deferred[str]``, cloud/image_digests.AsyncImageDigests)."""

    def __init__(self, clock: Callable[[], float], source: Any,
                 interval: float = DEFAULT_INTERVAL) -> None:
        self.clock = clock
        self.source = source
        self.interval = interval
        #: key -> (asked at, the digest or None: unknown).
        self._answers = Remembered(clock)
        #: instance id -> the answer it was told it is not drained for (logged once).
        self._told: dict[str, str] = {}
        self._at_once = defer.DeferredSemaphore(CHECKS_AT_ONCE)

    @property
    def calls(self) -> int:
        """Registry checks made (for tests and the bound)."""
        return self._answers.calls

    def current(self, image: str, auth: Any = None) -> defer.Deferred:
        """What ``image``'s tag points at now, or None when unknown (or pinned)."""
        return self.answer(image, auth).addCallback(lambda answer: answer[1])

    def answer(self, image: str, auth: Any = None) -> defer.Deferred:
        """``(asked_at, digest)``: what ``image``'s tag points at (None when unknown or
        pinned) and when the registry was asked it (None: never), on ``clock``."""
        if not image or imagedigest.pinned(image):
            return defer.succeed((None, None))
        key = (image, auth.key() if auth is not None else None)
        return self._answers.get(key, self.interval, lambda: self._at_once.run(
            self._check, image, auth))

    def _check(self, image: str, auth: Any) -> defer.Deferred:
        asked_at = self.clock()  # when the check really starts, not when it queued

        def unknown(f: Any) -> None:
            log.msg(f"dockerami: image refresh: what {image} points at is unknown "
                    f"({f.getErrorMessage()}); no instance drains for it, asked again in "
                    f"{self.interval:g}s")

        d = defer.maybeDeferred(self.source.digest, image, auth)
        d.addErrback(unknown)
        return d.addCallback(
            lambda digest: (asked_at, digest if imagedigest.valid(digest) else None))

    def not_yet(self, instance_id: str, image: str, current: str) -> None:
        """Log (once per instance and answer) that an instance is not drained because
        the answer predates its report."""
        if self._told.get(instance_id) == current:
            return
        if len(self._told) > 4096:  # instance ids of a long-lived master
            self._told.clear()
        self._told[instance_id] = current
        log.msg(f"dockerami: image refresh: {instance_id} reported its digest after "
                f"{image} was last asked ({imagedigest.short(current)}); no drain before "
                "a newer answer")
