"""The worker's glue for instances lost from under it: EC2 says the instance is gone
(fleet/lost.py decides and counts), a connection drops unasked, or a spot instance's
bootstrap asks to shut down on EC2's interruption notice. Its builds end as RETRY, so
buildbot builds them again elsewhere, and the worker lets go of the instance.

And for instances that retire themselves (fleet/retirement.py decides and counts): the
bootstrap found the disk too full after pruning, asks the workers to shut down and says
why in their worker info. Such an instance takes no new build, its running builds
finish, then it is terminated.

A mixin of DockerAMILatentWorker (worker/latent.py), before buildbot's classes in its
bases so that ``detached``, ``shutdownRequested``, ``canStartBuild`` and
``maybeShutdown`` wrap buildbot's.
"""

from __future__ import annotations

from typing import Any

from buildbot.interfaces import LatentWorkerFailedToSubstantiate
from buildbot.process.results import RETRY
from buildbot.worker.latent import States
from twisted.internet import defer
from twisted.python import failure, log

from buildbot_dockerami.cloud import image_digests, instances
from buildbot_dockerami.fleet import image_refresh, lost, pools, refresh, retirement
from buildbot_dockerami.fleet.launch import LaunchedInstance
from buildbot_dockerami.protocol import imagedigest
from buildbot_dockerami.worker.connections import ConnectionRefused


class Losses:
    """What a worker does when its instance is lost."""

    #: The instance whose loss this worker last recorded (see _record_lost).
    _lost_id = ""
    #: The retired instance whose containers this worker last refused.
    _retired_refused = ""

    def running_builds(self) -> list[Any]:
        return [build for builder in self.botmaster.builders.values()
                for build in builder.building if build.workername == self.name]

    def instance_lost(self, status: Any) -> None:
        """EC2 says this worker's connected instance is gone (spot reclaim, the console,
        a colleague): its builds end as RETRY with the reason, the worker lets go of it."""
        instance = self.instance
        if (instance is None or instance.instance_id != status.instance_id
                or self.state != States.SUBSTANTIATED):
            return  # booting: check_instance decides; terminating: our own doing
        self._let_go(self._record_lost(instance, status))

    def detached(self) -> Any:
        # A connection lost unasked may be the instance dying: ask EC2 once, now, so
        # the reason is known without waiting for the reconciler.
        instance = self.instance
        if (instance is not None and self.group is None and not self._stopping
                and self.state == States.SUBSTANTIATED and not self.fleet.stopping):
            self._deferwaiter.add(self._why_lost(instance))
        return super().detached()

    @defer.inlineCallbacks
    def _why_lost(self, instance: LaunchedInstance) -> Any:
        try:
            status = yield lost.gone(instance)
        except Exception as e:
            log.msg(f"{self}: connection lost; state of {instance.instance_id} unknown: {e}")
            return
        if status is not None:
            reason = self._record_lost(instance, status)
            log.msg(f"{self}: connection lost: {reason}")
            if self.instance is instance and self.state == States.SUBSTANTIATED:
                yield self.insubstantiate()

    def _record_lost(self, instance: LaunchedInstance, status: instances.InstanceStatus) -> str:
        """The reason ``instance`` is lost (fleet/lost.py counts it once); this worker
        shows it once, so a late report never hides a newer failure."""
        reason = lost.record(self.fleet.metrics, instance, status)
        if self._lost_id != instance.instance_id:
            self._lost_id = instance.instance_id
            self.last_failure = reason
        return reason

    def _let_go(self, reason: str) -> None:
        """The instance cannot serve any longer: builds RETRY with ``reason`` (built again
        elsewhere), the connection and the instance are released."""
        log.msg(f"{self}: {reason}; its builds are retried")
        for build in self.running_builds():
            build.stopBuild(reason, results=RETRY)
        if self.conn is not None:
            self.conn.loseConnection()
        if self.group is None:
            self._deferwaiter.add(self.insubstantiate())

    def shutdownRequested(self) -> None:
        self._deferwaiter.add(self._shutdown_requested())

    @defer.inlineCallbacks
    def _shutdown_requested(self) -> Any:
        """The worker asks to shut down: its instance retires if its info says so."""
        instance = self.instance
        text = yield retirement.ask(self.conn)
        if text is not None and instance is not None and instance is self.instance:
            self._retire(instance, text)
        else:
            self._asked_to_shut_down()

    def _asked_to_shut_down(self) -> None:
        """On a spot instance that is the bootstrap answering EC2's interruption notice:
        don't wait for the build (the instance has two minutes), retry it elsewhere now."""
        instance = self.instance
        if instance is None or instance.market != "spot":
            super().shutdownRequested()
            return
        self.fleet.metrics.inc("dockerami_spot_interruptions_total", {})
        reason = f"spot interruption: instance {instance.instance_id} is reclaimed by EC2"
        self.last_failure = reason
        self._let_go(reason)

    # -- instances that retire themselves (fleet/retirement.py) ----------------------

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
        if retirement.reason_code(text) not in retirement.DRAIN_REASONS:
            self.last_failure = retirement.message(instance)  # a drain is no failure
        if self.group is not None:
            self.group.end_if_retired()
        elif not self.busy and insubstantiate and not getattr(instance, "held", False):
            self._deferwaiter.add(self._builds_after(self.insubstantiate()))

    def _holds_warm_minimum(self, instance: Any) -> bool:
        """An idle instance of a pool with a warm minimum, drained by the master: ended
        only once the keeper has its replacement (a retiring disk is not waited for)."""
        if (self.pool is None or self.fleet.keeper is None
                or retirement.reason_code(instance.retired) not in retirement.DRAIN_REASONS):
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
