"""The worker's glue for instances lost from under it: EC2 says the instance is gone
(fleet/lost.py decides and counts), a connection drops unasked, or a spot instance's
bootstrap asks to shut down on EC2's interruption notice. Its builds end as RETRY, so
buildbot builds them again elsewhere, and the worker lets go of the instance.

A worker asked to shut down whose info says its instance retires is not lost: that
is worker/retiring.py's (``_retire``).

A mixin of DockerAMILatentWorker (worker/latent.py), before buildbot's classes in its
bases so that ``detached`` and ``shutdownRequested`` wrap buildbot's.
"""

from __future__ import annotations

from typing import Any

from buildbot.process.results import RETRY
from buildbot.worker.latent import States
from twisted.internet import defer
from twisted.python import log

from buildbot_dockerami.cloud import instances
from buildbot_dockerami.fleet import lost, retirement
from buildbot_dockerami.fleet.launch import LaunchedInstance


class Losses:
    """What a worker does when its instance is lost."""

    #: The instance whose loss this worker last recorded (see _record_lost).
    _lost_id = ""

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
