"""The worker's glue for instances that retire: the master drains them (after
``max_builds_per_instance`` builds, past ``max_instance_age``, when ``ami_filters`` pick
a newer AMI or the image's tag points at another digest; fleet/retirement.py,
fleet/refresh.py and fleet/image_refresh.py decide and count), or they retire
themselves (the bootstrap found the disk too full after pruning, or passes on EC2's
spot rebalance recommendation, and says why in the worker info). Such an instance takes
no new build, its running builds finish (a busy worker is never killed), a warm
minimum gets its replacement first, then it is terminated.

A mixin of DockerAMILatentWorker (worker/latent.py), before buildbot's classes in its
bases so that ``canStartBuild`` and ``maybeShutdown`` wrap buildbot's.
"""

from __future__ import annotations

from typing import Any

from buildbot.interfaces import LatentWorkerFailedToSubstantiate
from twisted.internet import defer
from twisted.python import failure, log

from buildbot_dockerami.cloud import image_digests
from buildbot_dockerami.fleet import image_refresh, pools, refresh, retirement
from buildbot_dockerami.protocol import imagedigest
from buildbot_dockerami.worker.connections import ConnectionRefused


class Retiring:
    """What a worker does when its instance retires or is drained."""

    #: The retired instance whose containers this worker last refused.
    _retired_refused = ""

    def _refuse_if_retired(self, conn: Any) -> None:
        """A container of a retired instance connects (its bootstrap starts them only to
        say so): refused. If this worker waited for it, the substantiation fails (a build
        waiting for it is retried) and the instance ends once its other slots' builds
        have. Called first by Connections.attached."""
        text = retirement.reported(conn.info)
        if text is None:
            return
        instance = self.instance
        reported = str(conn.info.get("instance_id") or "").strip()
        if instance is None:
            # Its slot is no longer waiting; the container retries until the instance
            # ends: said once.
            if self._retired_refused != reported:
                self._retired_refused = reported
                log.msg(f"{self}: refusing the connections of {reported or 'an instance'}: "
                        "it retires")
            conn.loseConnection()
            raise ConnectionRefused(f"{self.name}: its instance retires")
        if reported and reported != instance.instance_id:
            return  # another instance's: the origin check refuses it
        self._connected = True  # it did connect: not a boot failure
        self._retire(instance, text, insubstantiate=False)
        # Fails the build waiting for it (retried), and ends this substantiation.
        self._substantiation_failed(failure.Failure(
            LatentWorkerFailedToSubstantiate(self.name, retirement.message(instance))))
        if self.group is None:
            self._deferwaiter.add(self._builds_after(self.insubstantiate()))
        self._refuse(conn, retirement.message(instance))

    def drain_if_due(self) -> None:
        """The master drains this worker's instance when it has taken
        max_builds_per_instance builds or is older than max_instance_age (decided by
        fleet/retirement.py; asked as builds start and on every reconciler pass)."""
        instance, text = self.instance, self._drain_due()
        if instance is not None and text is not None:
            self._retire(instance, text)

    @defer.inlineCallbacks
    def refresh_if_stale(self) -> Any:
        """The master drains this worker's instance when its ami_filters now pick another
        image than the one it was launched from (fleet/refresh.py, asked at most once
        per ami_refresh_interval). A fixed ``ami`` or a template's image never refresh."""
        instance = self.instance
        settings = getattr(self, "settings", None)
        if (instance is None or settings is None or settings.ami is not None
                or settings.ami_filters is None or retirement.retired(instance)):
            return
        newest = yield self.fleet.refresh.newest_for(instance, settings.ami_filters,
                                                     settings.ami_owners)
        if (instance is self.instance and newest is not None
                and refresh.stale(instance.ami, newest)):
            self._retire(instance, refresh.reason(instance.ami, newest))

    @defer.inlineCallbacks
    def refresh_image_if_stale(self) -> Any:
        """The master drains this worker's instance when its image's tag now points at
        another digest than the one the instance reported running (fleet/image_refresh.py,
        asked at most once per image_refresh_interval). An image that reported no digest,
        or a reference pinned by digest, never refreshes."""
        instance = self.instance
        settings = getattr(self, "settings", None)
        if (instance is None or settings is None or not instance.image_digest
                or retirement.retired(instance)):
            return
        # The instance's region (its client's, the worker's rendered one): where its
        # registry_credentials are stored.
        region = getattr(getattr(instance.client, "ec2", None), "region", None)
        if not isinstance(region, str):
            region = settings.region if isinstance(settings.region, str) else None
        auth = image_digests.Auth(settings.registry_credentials, region, settings.session)
        checker = self.fleet.image_refresh
        asked_at, current = yield checker.answer(instance.image, auth)
        if (instance is not self.instance
                or not image_refresh.stale(instance.image_digest, current)):
            return
        if not image_refresh.newer(asked_at, instance.image_digest_at):
            # The answer may predate what the instance pulled: wait for a newer one.
            checker.not_yet(instance.instance_id, instance.image, current)
            return
        self._retire(instance, image_refresh.reason(instance.image, instance.image_digest,
                                                    current))

    def _note_image_digest(self, instance: Any, info: Any) -> None:
        """The digest of the image a connecting worker runs (its info ``image_digest``,
        reported by the bootstrap): kept on its instance for the image refresh."""
        digest = imagedigest.from_info(info)
        if instance is None or digest is None or digest == instance.image_digest:
            return
        instance.image_digest = digest
        # When, on the image refresh's clock (the fleet's reactor): only a registry
        # answer asked after this may drain it.
        instance.image_digest_at = self.fleet.image_refresh.clock()
        log.msg(f"{self}: instance {instance.instance_id} runs {instance.image} at {digest}")

    def _drain_due(self) -> str | None:
        settings = getattr(self, "settings", None)
        if settings is None:
            return None
        return retirement.due(self.instance, self.master.reactor.seconds(),
                              settings.max_builds_per_instance, settings.max_instance_age)

    def _retire(self, instance: Any, text: str, insubstantiate: bool = True) -> None:
        if retirement.record(self.fleet.metrics, instance, text):
            log.msg(f"{self}: {retirement.message(instance)}; it takes no new build and "
                    "is terminated once its running builds end")
            if retirement.reason_code(text) == "spot_rebalance" and instance.market == "spot":
                self.fleet.cooldown.avoid(instance.instance_type, "spot",
                                          self.master.reactor.seconds())
                log.msg(f"{self}: {instance.instance_type} (spot) goes to the back of the "
                        f"capacity options for {self.fleet.cooldown.seconds:.0f}s")
            if self.group is not None:
                self._deferwaiter.add(self._builds_after(self.group.when_gone()))
            if self._holds_warm_minimum(instance):
                instance.held = True
                log.msg(f"{self}: {instance.instance_id} is kept until its pool {self.pool}'s "
                        "warm minimum has its replacement")
                self._end_when_replaced(instance, self.master.reactor.seconds())
        if not retirement.planned(text):
            self.last_failure = retirement.message(instance)  # a drain is no failure
        if self.group is not None:
            self.group.end_if_retired()
        elif not self.busy and insubstantiate and not getattr(instance, "held", False):
            self._deferwaiter.add(self._builds_after(self.insubstantiate()))

    def _holds_warm_minimum(self, instance: Any) -> bool:
        """An idle instance of a pool with a warm minimum, drained by the master: ended
        only once the keeper has its replacement (a retiring disk is not waited for)."""
        if (self.pool is None or self.fleet.keeper is None
                or not retirement.planned(instance.retired)):
            return False
        members = self.group.members.values() if self.group is not None else [self]
        if any(member.busy for member in members):
            return False
        return pools.warm_minimum(self.fleet, self.pool, self.master.reactor.seconds()) > 0

    def _end_when_replaced(self, instance: Any, since: float) -> None:
        """Checked as often as the keeper tops pools up: the held instance ends once the
        pool's warm minimum holds without it (or after retirement.REPLACE_WAIT)."""
        current = self.group.instance if self.group is not None else self.instance
        if not instance.held or current is not instance:
            return  # released, or gone meanwhile
        now = self.master.reactor.seconds()
        if (not pools.warm_without_draining(self.fleet, self.pool, now)
                and now - since < retirement.REPLACE_WAIT and not self.fleet.stopping):
            self.master.reactor.callLater(pools.KEEPER_INTERVAL, self._end_when_replaced,
                                          instance, since)
            return
        instance.held = False
        log.msg(f"{self}: {retirement.message(instance)}; its replacement is ready")
        if self.group is not None:
            self.group.end_if_retired()
        elif not self.busy:
            self._deferwaiter.add(self._builds_after(self.insubstantiate()))

    @defer.inlineCallbacks
    def _builds_after(self, gone: defer.Deferred) -> Any:
        """Once the retired instance is gone, builds it held back may start (on a new one)."""
        yield gone
        self.botmaster.maybeStartBuildsForAllBuilders()

    def canStartBuild(self) -> bool:
        if not retirement.takes_builds(self.instance):
            return False
        if self._drain_due() is not None:  # drained at once, not from inside buildbot's loop
            self.master.reactor.callLater(0, self.drain_if_due)
            return False
        return super().canStartBuild()

    def maybeShutdown(self) -> None:
        # Called as each build finishes: a retired instance ends when its last one has.
        if self.group is None and retirement.may_end(self.instance, [self.busy]):
            self._deferwaiter.add(self._builds_after(self.insubstantiate()))
        super().maybeShutdown()
