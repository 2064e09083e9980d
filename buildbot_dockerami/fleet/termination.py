"""Reliable termination: terminate and confirm, retry with backoff, and keep what still
fails on a list retried in the background, so that no instance is forgotten running."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from botocore.exceptions import ClientError
from twisted.internet import defer, task
from twisted.python import failure, log

from buildbot_dockerami.cloud import instances
from buildbot_dockerami.cloud.ec2 import AsyncEc2, CloudError
from buildbot_dockerami.fleet.monitor import StateMonitor

#: How often instances whose termination failed are tried again.
UNDEAD_RETRY_SECONDS = 60.0
#: Attempts at a termination while the master stops: the reconciler of its next life
#: ends what these miss, and a stopping master must not wait for an outage to end.
STOPPING_ATTEMPTS = 2
#: Ended instances remembered (a few hundred bytes each), so that a worker reconnecting
#: from one while EC2 shuts it down is refused without asking EC2 about it.
ENDED_MEMORY = 1000


def retry_delays(
    first: float = 1.0, factor: float = 2.0, cap: float = 30.0, attempts: int = 6
) -> Iterator[float]:
    """Delays between attempts of a call that must eventually succeed (terminate)."""
    delay = first
    for _ in range(attempts - 1):
        yield delay
        delay = min(delay * factor, cap)


def _is_not_found(error: BaseException) -> bool:
    return isinstance(error, ClientError) and error.response.get("Error", {}).get(
        "Code", ""
    ).startswith("InvalidInstanceID")


class Terminator:
    """Ends one master's instances. Terminating stops the monitor's checks of the
    instance; ``stopping`` (the master is shutting down) shortens the retries."""

    def __init__(self, reactor: Any, monitor: StateMonitor,
                 stopping: Callable[[], bool]) -> None:
        self.reactor = reactor
        self._monitor = monitor
        self._stopping = stopping
        self._undead: dict[str, AsyncEc2] = {}
        self._undead_loop: task.LoopingCall | None = None
        #: Instance id -> the callers waiting for its termination in progress.
        self._waiters: dict[str, list[defer.Deferred]] = {}
        #: The last ENDED_MEMORY instances this master ended (oldest first).
        self._ended: dict[str, None] = {}

    def terminate(self, client: AsyncEc2, instance_id: str) -> defer.Deferred:
        """Terminate and confirm, retrying with backoff. If it still fails, the instance
        is kept on a list retried every minute and the error is raised to the caller.
        Callers asking while a termination is in progress share it."""
        mine: defer.Deferred = defer.Deferred()
        waiters = self._waiters.get(instance_id)
        if waiters is not None:
            waiters.append(mine)
            return mine
        waiters = self._waiters[instance_id] = [mine]

        def finish(result: Any) -> None:
            self._waiters.pop(instance_id, None)
            for waiter in waiters:
                if isinstance(result, failure.Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(result)
        self._terminate(client, instance_id).addBoth(finish)
        return mine

    def in_progress(self, instance_id: str) -> bool:
        """Whether this master is already ending the instance (or retrying to)."""
        return instance_id in self._waiters or instance_id in self._undead

    def ending_or_ended(self, instance_id: str) -> bool:
        """Whether this master is ending the instance or has ended it: its worker may
        still reconnect while EC2 shuts it down, and nothing is left to find out."""
        return self.in_progress(instance_id) or instance_id in self._ended

    def _record_ended(self, instance_id: str) -> None:
        self._undead.pop(instance_id, None)
        self._ended[instance_id] = None
        if len(self._ended) > ENDED_MEMORY:
            del self._ended[next(iter(self._ended))]

    @defer.inlineCallbacks
    def _terminate(self, client: AsyncEc2, instance_id: str) -> Any:
        self._monitor.unwatch(instance_id)
        delays = retry_delays(attempts=STOPPING_ATTEMPTS if self._stopping() else 6)
        while True:
            try:
                states = yield client.terminate([instance_id])
                state = states.get(instance_id)
                if state not in instances.GONE_STATES:
                    status = (yield client.describe([instance_id])).get(instance_id)
                    state = status.state if status else "terminated"
                if state in instances.GONE_STATES:
                    self._record_ended(instance_id)
                    return state
                error = f"instance is still {state} after TerminateInstances"
            except Exception as e:
                if _is_not_found(e):
                    self._record_ended(instance_id)
                    return "terminated"
                error = str(e)
            delay = next(delays, None)
            if delay is None:
                if self._stopping():
                    raise CloudError(f"could not terminate {instance_id} while stopping "
                                     f"({error}); the next start's reconciler will")
                self._remember_undead(client, instance_id)
                raise CloudError(f"could not terminate {instance_id}: {error}")
            log.msg(
                f"dockerami: terminating {instance_id} failed ({error}); retrying in {delay:.0f}s"
            )
            yield task.deferLater(self.reactor, delay, lambda: None)

    def _remember_undead(self, client: AsyncEc2, instance_id: str) -> None:
        self._undead[instance_id] = client
        log.msg(
            f"dockerami: ERROR: {instance_id} could not be terminated; it stays on the "
            f"retry list (every {UNDEAD_RETRY_SECONDS:.0f}s) until it is"
        )
        if self._undead_loop is None:
            self._undead_loop = task.LoopingCall(self._retry_undead)
            self._undead_loop.clock = self.reactor
            self._undead_loop.start(UNDEAD_RETRY_SECONDS, now=False)

    @defer.inlineCallbacks
    def _retry_undead(self) -> Any:
        for instance_id, client in list(self._undead.items()):
            try:
                states = yield client.terminate([instance_id])
                if states.get(instance_id) in instances.GONE_STATES:
                    log.msg(f"dockerami: {instance_id} finally terminated")
                    self._record_ended(instance_id)
            except Exception as e:
                if _is_not_found(e):
                    self._record_ended(instance_id)
                else:
                    log.msg(f"dockerami: {instance_id} still not terminated: {e}")

    @property
    def undead(self) -> list[str]:
        return sorted(self._undead)

    def stop(self) -> None:
        """The master stops: say what is still running, and stop retrying."""
        if self._undead:
            log.msg(
                "dockerami: master stopping with instances whose termination failed: "
                + ", ".join(sorted(self._undead))
            )
        if self._undead_loop is not None and self._undead_loop.running:
            self._undead_loop.stop()
