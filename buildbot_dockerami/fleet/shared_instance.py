"""Instance groups: one instance shared by several slot workers (isolation='container'),
launched once for all of them and terminated when every slot has been idle long enough."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet import defer
from twisted.python import failure, log

from buildbot_dockerami.cloud.instances import InstanceStatus
from buildbot_dockerami.fleet import reconcile_plan, retirement
from buildbot_dockerami.fleet.holdings import Holdings
from buildbot_dockerami.fleet.termination import Terminator


class GroupMember(Protocol):
    """What an InstanceGroup needs of a slot worker."""

    name: str

    @property
    def busy(self) -> bool: ...

    def arm(self) -> None: ...

    def release(self) -> defer.Deferred: ...


class InstanceGroup:
    """One instance whose slots are served by several workers, each build in a fresh
    container (isolation='container'). The instance lives while any slot is busy, and
    ``idle_timeout`` seconds after the last build; then every slot is released and the
    instance terminated.

    It is given what it uses: a clock, the terminator, the holdings it is listed in, and
    ``released(pool, group)``, called when its instance is gone (the fleet then lets
    builds held back by a pool cap start)."""

    def __init__(self, name: str, reactor: Any, terminator: Terminator, holdings: Holdings,
                 released: Callable[[str | None, InstanceGroup], None]) -> None:
        self.name = name
        self.reactor = reactor
        self.terminator = terminator
        self.holdings = holdings
        self.released = released
        self.members: dict[str, GroupMember] = {}
        self.instance: Any = None
        self.launch_values: dict[str, Any] | None = None
        self.idle_timeout = 600.0
        self.terminating = False
        self._launch_waiters: list[defer.Deferred] | None = None
        self._gone_waiters: list[defer.Deferred] = []
        self._idle_timer: Any = None

    def join(self, member: GroupMember) -> None:
        self.members[member.name] = member

    def slot_of(self, name: str) -> int:
        return sorted(self.members).index(name)

    @defer.inlineCallbacks
    def acquire(self, launch: Callable[[], defer.Deferred]) -> Any:
        """The group's instance, launched by ``launch()`` (-> (instance, values)) if
        there is none; concurrent callers share one launch."""
        while self.terminating or not retirement.takes_builds(self.instance):
            yield self.when_gone()  # a retiring instance ends after its builds
        if self.instance is not None:
            return self.instance
        if self._launch_waiters is not None:
            waiter = defer.Deferred()
            self._launch_waiters.append(waiter)
            return (yield waiter)
        self._launch_waiters = []
        try:
            instance, values = yield launch()
        except Exception:
            error = failure.Failure()
            waiters, self._launch_waiters = self._launch_waiters, None
            for waiter in waiters:
                waiter.errback(error)
            raise
        self.instance, self.launch_values = instance, values
        waiters, self._launch_waiters = self._launch_waiters, None
        for waiter in waiters:
            waiter.callback(instance)
        self._start_idle_timer()
        for member in self.members.values():
            member.arm()
        return instance

    def build_started(self) -> None:
        self._cancel_idle_timer()

    def build_finished(self) -> None:
        if not any(member.busy for member in self.members.values()):
            self._start_idle_timer()
        self.end_if_retired()

    def end_if_retired(self) -> None:
        """A retiring instance (fleet/retirement.py) is terminated once no slot builds."""
        instance = self.instance
        if self.terminating or not retirement.may_end(
                instance, (member.busy for member in self.members.values())):
            return
        self.shutdown(retirement.message(instance)).addErrback(
            log.err, f"dockerami: terminating the retired instance of {self.name}")

    def when_gone(self) -> defer.Deferred:
        """Fires once the group has no instance (at once if it has none now)."""
        if self.instance is None and not self.terminating:
            return defer.succeed(None)
        waiter: defer.Deferred = defer.Deferred()
        self._gone_waiters.append(waiter)
        return waiter

    def _start_idle_timer(self) -> None:
        self._cancel_idle_timer()
        if self.idle_timeout < 0:  # buildbot's convention: never shut down
            return
        self._idle_timer = self.reactor.callLater(self.idle_timeout, self._idle)

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.cancel()
        self._idle_timer = None

    def _idle(self) -> None:
        self._idle_timer = None
        if any(member.busy for member in self.members.values()):
            return
        self.shutdown(f"idle for {self.idle_timeout:.0f}s").addErrback(
            log.err, f"dockerami: terminating the instance of {self.name}"
        )

    @defer.inlineCallbacks
    def shutdown(self, why: str) -> Any:
        """Release every slot, then terminate the instance. Never wait for this from a
        member's stop_instance: releasing that member waits for its stop to finish."""
        instance = self.instance
        if instance is None or self.terminating:
            return
        self.terminating = True
        self._cancel_idle_timer()
        log.msg(f"dockerami: {self.name}: terminating {instance.instance_id}: {why}")
        try:
            yield defer.DeferredList(
                [member.release() for member in list(self.members.values())], consumeErrors=True
            )
            yield self.terminator.terminate(instance.client, instance.instance_id)
        finally:
            self.instance = self.launch_values = None
            self.terminating = False
            self.released(next((m.pool for m in self.members.values()), None), self)
            waiters, self._gone_waiters = self._gone_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def instance_lost(self, status: InstanceStatus) -> None:
        """EC2 says the shared instance is gone: its slots' workers stop their builds
        (instance_lost on each), then every slot is released."""
        if self.instance is None or self.instance.instance_id != status.instance_id:
            return
        self.shutdown(reconcile_plan.lost_reason(status)).addErrback(
            log.err, f"dockerami: releasing the lost instance of {self.name}")

    @defer.inlineCallbacks
    def leave(self, member: GroupMember) -> Any:
        """A member's service stops (master shutdown, removed by reconfig)."""
        self.members.pop(member.name, None)
        if not self.members:
            self.holdings.groups.pop(self.name, None)
            yield self.shutdown("no workers left for it")
