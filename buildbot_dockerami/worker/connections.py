"""The worker's connection glue: who may connect (the origin check), the wait for a
slot's fresh container, the one-time password hand-over, and what a connection tells
the fleet (provisioning time, image readiness, the end of check_instance's wait).

A mixin of DockerAMILatentWorker (worker/latent.py), before buildbot's classes in its
bases so that ``attached`` wraps buildbot's. It uses the worker's ``instance``,
``group``, ``fleet``, ``timeline`` and the passwords set by ``renew_password``.
"""

from __future__ import annotations

import contextlib
import secrets
from typing import Any

from buildbot.worker.latent import States
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.python import log
from twisted.spread import pb

from buildbot_dockerami.protocol import imageready, limits
from buildbot_dockerami.protocol.passwords import OneTimeCredentials

#: States in which a slot worker is on its way to expecting its next container.
REARMING_STATES = (States.INSUBSTANTIATING_SUBSTANTIATING, States.SUBSTANTIATING)
CONNECTION_WAIT_SECONDS = 30
#: The worker-info key (a file in the worker's info/ directory) carrying the id of the
#: instance the worker runs on; images that do not report it are accepted
#: (docs/what-happens-when.md).
INSTANCE_ID_INFO = "instance_id"


class ConnectionRefused(pb.Error, UnauthorizedLogin):
    """A worker connection the master turns away: a pb.Error, so not logged as a crash,
    and an UnauthorizedLogin, so a worker that is merely early retries."""


class Connections:
    """Accepting (or refusing) a worker's connection, and the passwords it brings."""

    #: A container slot's one-time passwords (protocol/passwords.py), with a fresh password.
    one_time: OneTimeCredentials | None = None
    #: Fired when the worker connects while check_instance waits for EC2.
    _on_connect: defer.Deferred | None = None
    #: The resource limits the connected container reported (None: it did not).
    limits_reported: dict[str, Any] | None = None

    @defer.inlineCallbacks
    def renew_password(self, one_time: bool = False) -> Any:
        """A fresh password per instance when none is configured; with ``one_time``
        (container slots), a fresh secret whose passwords each serve one container."""
        self.one_time = OneTimeCredentials.fresh() if (
            one_time and self.random_password) else None
        if self.random_password:
            self.password = self.one_time.password if self.one_time else secrets.token_hex(16)
            yield self.registration.update(self, self.master.config)
        return self.password

    def _refuse(self, conn: Any, why: str) -> None:
        log.msg(f"{self}: refusing a connection: {why}")
        conn.loseConnection()
        raise ConnectionRefused(f"{self.name}: {why}")

    def _check_origin(self, conn: Any) -> None:
        """A connection is accepted only from the instance launched for this worker.

        Images that report no instance id (the seed's) are let in; the reconciler
        ends any instance this master does not track within its interval.
        """
        reported = str(conn.info.get(INSTANCE_ID_INFO) or "").strip()
        expected = self.instance.instance_id if self.instance is not None else None
        if reported and reported != expected:
            self.fleet.metrics.inc("dockerami_connections_refused_total", {})
            if reported not in self.fleet.tracked():
                self.fleet.reconciler.terminate_untracked(reported, self.name)
            self._refuse(conn, f"it runs on {reported}, not on this worker's instance "
                               f"{expected or '(none)'}")
        if (self.group is None and self.state != States.SUBSTANTIATING_STARTING
                and self.build_wait_timeout >= 0):
            # e.g. the worker of an instance being terminated reconnects: buildbot would
            # refuse it with a logged RuntimeError; refuse it quietly (it may retry).
            self._refuse(conn, f"not expecting a connection ({self.state.name.lower()})")

    @defer.inlineCallbacks
    def attached(self, conn: Any) -> Any:
        self._refuse_if_retired(conn)  # worker/retiring.py
        self._check_origin(conn)
        recycling = self.state in REARMING_STATES or (
            self.state == States.SUBSTANTIATED and self.conn is None  # lost, not yet cleaned up
        )
        if self.group is not None and recycling:
            # A fresh container can connect before buildbot has finished recycling the
            # last one's substantiation; buildbot would turn it away. Wait for it.
            with contextlib.suppress(defer.TimeoutError):
                yield self._expecting_connection.wait().addTimeout(
                    CONNECTION_WAIT_SECONDS, self.master.reactor
                )
        # buildbot forgets a graceful Stop when a worker connects; one asked for while
        # the instance booted still stands.
        graceful = self._graceful
        yield super().attached(conn)
        if graceful and not self._graceful:
            self._graceful = True
            self._update_graceful()
        if self.one_time is not None and self.conn is not None:
            # This container's password is spent: accepted once, never again.
            self.password = self.one_time.spend()
            yield self.registration.update(self, self.master.config)
        if self.instance is not None and self.conn is not None:
            self.timeline["connected"] = self.master.reactor.seconds()
            self.image_ready = imageready.from_info(
                conn.info, self.instance.launched_at, self._requested_at,
                self.timeline["connected"])
            if self.image_ready is not None:
                self.timeline[imageready.STEP] = self.image_ready.at
            self.limits_reported = limits.from_info(conn.info)
            self._note_image_digest(self.instance, conn.info)
            if self.busy:  # the build that asked for this instance starts now
                self.timeline["build_started"] = self.timeline["connected"]
            elif self._prewarming and self.group is None:
                self._prewarm_timer.start()
            self._prewarming = False
            self.recycling = False
            provisioning = self.master.reactor.seconds() - self._requested_at
            self.fleet.metrics.observe(
                "dockerami_provisioning_seconds", provisioning, {"isolation": self.isolation},
            )
            if self._launched_for_request:  # not a slot's fresh container
                self.fleet.provisioning.record(self.pool, provisioning)
                self._launched_for_request = False
            self._connected = True
            self.fleet.monitor.unwatch(self.instance.instance_id, self.name)
        if self.conn is not None and self._on_connect is not None:
            # check_instance's wait ends, and with it buildbot's lock: last, so that an
            # insubstantiation queued on the lock sees this connection fully recorded.
            connected, self._on_connect = self._on_connect, None
            connected.callback(None)
