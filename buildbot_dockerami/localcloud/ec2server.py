"""A moto EC2 server on loopback, behind a WSGI layer that counts calls and injects faults.

moto answers every call instantly and never fails; real EC2 throttles and runs
out of capacity. The wrapper lets tests and benchmarks ask for exactly that,
and counts calls per caller so a test can assert how often the master asked.
"""

from __future__ import annotations

import base64
import contextlib
import io
import re
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import BaseWSGIServer, make_server

from buildbot_dockerami.localcloud.timing import BootClock, image_of

#: Access key the hypervisor uses, so its own calls are not counted as the master's.
HYPERVISOR_ACCESS_KEY = "AKIDLOCALHYPERVISOR"
#: Calls that launch or start instances (timed from their arrival: BootClock).
LAUNCHES = ("RunInstances", "StartInstances")
_CREDENTIAL = re.compile(r"Credential=([^/,\s]+)/")
#: How many calls ``FaultInjector.history`` keeps (the oldest are dropped).
HISTORY = 10_000
_INSTANCE_ID = re.compile(rb"<instanceId>(i-[0-9a-f]+)</instanceId>")
#: An instance item's id up to its state, when that state is running (moto's XML puts
#: instanceState after instanceId, and never another instanceId between them).
_RUNNING_ITEM = re.compile(
    rb"<instanceId>(i-[0-9a-f]+)</instanceId>((?:(?!<instanceId>).)*?)"
    rb"<instanceState><code>16</code><name>running</name></instanceState>",
    re.DOTALL,
)
#: A spot price history item as moto writes it (zone, type, product, price, ...).
_SPOT_ITEM = re.compile(
    rb"<availabilityZone>([^<]*)</availabilityZone><instanceType>([^<]*)</instanceType>"
    rb"(<productDescription>[^<]*</productDescription>)<spotPrice>[^<]*</spotPrice>")


@dataclass
class Fault:
    action: str
    code: str
    message: str
    remaining: int
    status: int = 400


@dataclass(frozen=True)
class Call:
    """One call as the server saw it: when it arrived (``time.time()``, so that it
    compares with what the build machines and buildbot stamp), whose, which, and the
    instances it named (for RunInstances: the instances it launched)."""

    at: float
    access_key: str
    action: str
    instance_ids: tuple[str, ...] = ()
    ok: bool = True


@dataclass
class Stall:
    """An answer that comes late (``delay``), is lost after EC2 acted (``drop``), or
    never comes because EC2 never got the request (``hang``)."""

    action: str
    kind: str
    seconds: float
    remaining: int


class FaultInjector:
    """The WSGI middleware: records ``(access key, action)`` and answers with a queued
    fault instead of moto when one is due for that action."""

    def __init__(self, app: Callable) -> None:
        self.app = app
        self.calls: Counter[tuple[str, str]] = Counter()
        #: The calls of everyone but the hypervisor, in arrival order, with their time
        #: (benchmarks time what a master did when from it).
        self.history: deque[Call] = deque(maxlen=HISTORY)
        self._faults: list[Fault] = []
        self._stalls: list[Stall] = []
        #: RunInstances answers by ClientToken: EC2 answers a repeated token with the
        #: instance the first call launched (moto does not).
        self._launches: dict[str, tuple[str, list, bytes]] = {}
        self._released = threading.Event()
        self._lock = threading.Lock()
        #: Serves GetConsoleOutput from what the local machine printed, when set.
        self.console: Callable[[str], str | None] | None = None
        #: Launch/start times: DescribeInstances says ``pending`` until they are due.
        self.clock = BootClock()
        #: Held while a launch or start is carried out and timed, so that a reader of
        #: moto's state (``Ec2Server.instance_states``) never sees an untimed instance.
        self.launching = threading.Lock()
        #: Spot prices DescribeSpotPriceHistory answers instead of moto's (which is
        #: 0.00001 for everything): (type, zone or None for every zone) -> USD/hour.
        self.spot_prices: dict[tuple[str, str | None], float] = {}

    def inject(self, action: str, code: str, message: str, count: int = 1,
               status: int = 400) -> None:
        """The next ``count`` calls of ``action`` (by anyone but the hypervisor) fail."""
        with self._lock:
            self._faults.append(Fault(action, code, message, count, status))

    def delay(self, action: str, seconds: float, count: int = 1) -> None:
        """The next ``count`` answers to ``action`` come ``seconds`` late."""
        self._stall(action, "delay", seconds, count)

    def drop(self, action: str, count: int = 1, hold: float = 30.0) -> None:
        """The next ``count`` calls of ``action`` are carried out, but their answer is
        lost: the connection is held for ``hold`` seconds, then closed with no answer."""
        self._stall(action, "drop", hold, count)

    def hang(self, action: str, count: int = 1, hold: float = 30.0) -> None:
        """The next ``count`` calls of ``action`` hang ``hold`` seconds unanswered and are
        not carried out."""
        self._stall(action, "hang", hold, count)

    def clear(self) -> None:
        """Forget every queued fault and stall: EC2 is healthy again."""
        with self._lock:
            self._faults.clear()
            self._stalls.clear()

    def release(self) -> None:
        """End every held connection now (at shutdown)."""
        self._released.set()

    def _stall(self, action: str, kind: str, seconds: float, count: int) -> None:
        with self._lock:
            self._stalls.append(Stall(action, kind, seconds, count))

    def throttle(self, action: str, count: int = 1) -> None:
        self.inject(action, "RequestLimitExceeded", "Request limit exceeded.", count, 503)

    def count(self, action: str, access_key: str | None = None) -> int:
        with self._lock:
            return sum(
                n for (key, act), n in self.calls.items()
                if act == action and (access_key is None or key == access_key)
                and key != HYPERVISOR_ACCESS_KEY
            )

    def timeline(self, action: str, instance_id: str | None = None, *,
                 ok: bool | None = None) -> list[Call]:
        """The recorded calls of ``action`` (naming ``instance_id``, if given; only those
        EC2 carried out, or only those that failed, with ``ok``), of the last HISTORY
        calls: to count calls, use ``count``."""
        with self._lock:
            return [c for c in self.history if c.action == action
                    and (instance_id is None or instance_id in c.instance_ids)
                    and (ok is None or c.ok == ok)]

    def _record(self, at: float, key: str, action: str, body: bytes, *, answer: bytes,
                ok: bool) -> None:
        if key == HYPERVISOR_ACCESS_KEY:
            return
        if action == "RunInstances":
            ids = tuple(m.decode() for m in _INSTANCE_ID.findall(answer)) if ok else ()
        else:
            params = parse_qs(body.decode("utf-8", "replace"))
            ids = tuple(v for k, vs in sorted(params.items()) if k.startswith("InstanceId")
                        for v in vs)
        with self._lock:
            self.history.append(Call(at, key, action, ids, ok))

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        arrived = self.clock.clock()
        arrived_at = time.time()
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        environ["wsgi.input"] = io.BytesIO(body)
        action = parse_qs(body.decode("utf-8", "replace")).get("Action", [""])[0]
        match = _CREDENTIAL.search(environ.get("HTTP_AUTHORIZATION", ""))
        key = match.group(1) if match else ""
        fault = stall = None
        with self._lock:
            self.calls[(key, action)] += 1
            if key != HYPERVISOR_ACCESS_KEY:
                fault = next((f for f in self._faults if f.action == action and f.remaining), None)
                if fault is not None:
                    fault.remaining -= 1
                stall = next((t for t in self._stalls if t.action == action and t.remaining),
                             None)
                if stall is not None and fault is None:
                    stall.remaining -= 1
                else:
                    stall = None
        if key != HYPERVISOR_ACCESS_KEY:
            self._answer_time(arrived)
        if stall is not None and stall.kind == "hang":
            self._released.wait(stall.seconds)
            raise ConnectionAbortedError(f"{action}: hung up without an answer")
        if stall is not None and stall.kind == "delay":
            self._released.wait(stall.seconds)  # on top of the answer time
        if fault is None and action == "GetConsoleOutput" and self.console is not None:
            instance_id = parse_qs(body.decode()).get("InstanceId", [""])[0]
            output = self.console(instance_id)
            if output is not None:
                return _console_response(instance_id, output, start_response)
        if fault is None:
            with self.launching if action in LAUNCHES else contextlib.nullcontext():
                status, headers, answer = self._answer(action, body, environ)
                if status.startswith("200"):
                    answer, headers = self._timed(action, body, answer, headers, arrived)
            self._record(arrived_at, key, action, body, answer=answer,
                         ok=status.startswith("200"))
            if stall is not None and stall.kind == "drop":
                self._released.wait(stall.seconds)
                raise ConnectionAbortedError(f"{action}: answer lost")
            start_response(status, headers)
            return [answer]
        self._record(arrived_at, key, action, body, answer=b"", ok=False)
        payload = (
            f"<?xml version='1.0' encoding='UTF-8'?><Response><Errors><Error>"
            f"<Code>{fault.code}</Code><Message>{fault.message}</Message></Error></Errors>"
            f"<RequestID>{uuid.uuid4()}</RequestID></Response>"
        ).encode()
        reason = "Service Unavailable" if fault.status == 503 else "Bad Request"
        start_response(
            f"{fault.status} {reason}",
            [("Content-Type", "text/xml"), ("Content-Length", str(len(payload)))],
        )
        return [payload]

    def _answer_time(self, arrived: float) -> None:
        """Wait out the ``api`` delay before the call is carried out, on this request's
        thread: calls overlap as on EC2, and a caller with fewer threads than calls
        waits as it would there."""
        remaining = arrived + self.clock.delays.api - self.clock.clock()
        if remaining > 0:
            self._released.wait(remaining)

    def _timed(self, action: str, body: bytes, answer: bytes,
               headers: list, arrived: float) -> tuple[bytes, list]:
        """Record launches and starts; answer ``pending`` for instances not yet due.

        A boot counts from when the call arrived: moto handles calls one at a time
        (~30 ms of CPU per RunInstances here), EC2 handles a burst's in parallel.
        """
        if action in LAUNCHES:
            params = parse_qs(body.decode("utf-8", "replace"))
            ids = [m.decode() for m in _INSTANCE_ID.findall(answer)]
            if action == "RunInstances":
                self.clock.launched(ids, image_of(params.get("UserData", [""])[0]),
                                    params.get("InstanceType", ["m1.small"])[0], at=arrived)
            else:
                self.clock.started(ids, at=arrived)
            return answer, headers
        if action == "DescribeSpotPriceHistory" and self.spot_prices:
            return self._priced(answer, headers)
        if action != "DescribeInstances" or self.clock.delays.pending <= 0:
            return answer, headers

        def pending(match: re.Match) -> bytes:
            if not self.clock.is_pending(match.group(1).decode()):
                return match.group(0)
            return (b"<instanceId>" + match.group(1) + b"</instanceId>" + match.group(2)
                    + b"<instanceState><code>0</code><name>pending</name></instanceState>")

        rewritten = _RUNNING_ITEM.sub(pending, answer)
        if rewritten is answer or rewritten == answer:
            return answer, headers
        headers = [(k, str(len(rewritten)) if k.lower() == "content-length" else v)
                   for k, v in headers]
        return rewritten, headers

    def _priced(self, answer: bytes, headers: list) -> tuple[bytes, list]:
        """moto's spot price history with the prices the test set (``spot_prices``)."""
        def price(match: re.Match) -> bytes:
            zone, instance_type = match.group(1).decode(), match.group(2).decode()
            value = self.spot_prices.get((instance_type, zone),
                                         self.spot_prices.get((instance_type, None)))
            if value is None:
                return match.group(0)
            return (match.group(0).rsplit(b"<spotPrice>", 1)[0]
                    + b"<spotPrice>" + repr(float(value)).encode() + b"</spotPrice>")

        rewritten = _SPOT_ITEM.sub(price, answer)
        headers = [(k, str(len(rewritten)) if k.lower() == "content-length" else v)
                   for k, v in headers]
        return rewritten, headers

    def _answer(self, action: str, body: bytes, environ: dict) -> tuple[str, list, bytes]:
        """moto's answer, or for a RunInstances whose ClientToken was seen, the answer
        the first call got."""
        token = ""
        if action == "RunInstances":
            token = parse_qs(body.decode("utf-8", "replace")).get("ClientToken", [""])[0]
            with self._lock:
                if token in self._launches:
                    return self._launches[token]
        captured: dict[str, Any] = {}

        def start_response(status: str, headers: list, exc_info: Any = None) -> None:
            captured["status"], captured["headers"] = status, headers

        answer = b"".join(self.app(environ, start_response))
        result = (captured["status"], captured["headers"], answer)
        if token and captured["status"].startswith("200"):
            with self._lock:
                self._launches.setdefault(token, result)
        return result


def _console_response(instance_id: str, output: str, start_response: Callable) -> list[bytes]:
    encoded = base64.b64encode(output[-64 * 1024:].encode()).decode()
    payload = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<GetConsoleOutputResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">'
        f"<requestId>{uuid.uuid4()}</requestId><instanceId>{instance_id}</instanceId>"
        f"<timestamp>{time.strftime('%Y-%m-%dT%H:%M:%S.000Z', time.gmtime())}</timestamp>"
        f"<output>{encoded}</output></GetConsoleOutputResponse>"
    ).encode()
    start_response("200 OK", [("Content-Type", "text/xml"),
                              ("Content-Length", str(len(payload)))])
    return [payload]


class Ec2Server:
    """moto's server app (all services, EC2 is what we use) on 127.0.0.1 in a thread."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1") -> None:
        self.faults = FaultInjector(DomainDispatcherApplication(create_backend_app))
        self._server: BaseWSGIServer = make_server(
            host, port, self.faults, threaded=True, request_handler=_QuietHandler
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="moto-ec2", daemon=True
        )

    @property
    def endpoint_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> None:
        self._thread.start()

    def instance_states(self, region: str) -> dict[str, tuple[str, str]]:
        """Instance id -> (state, HttpTokens), as DescribeInstances would answer, read
        from moto in this process: a DescribeInstances of 50 instances costs moto
        ~0.3 s of CPU, which the hypervisor's polling would take from the master's
        machine (on EC2 it is AWS's)."""
        from moto.core import DEFAULT_ACCOUNT_ID  # the account every caller here uses
        from moto.ec2.models import ec2_backends

        clock = self.faults.clock
        with self.faults.launching:
            instances = list(ec2_backends[DEFAULT_ACCOUNT_ID][region].all_instances())
        states: dict[str, tuple[str, str]] = {}
        for instance in instances:
            state = instance.state
            if state == "running" and clock.delays.pending > 0 \
                    and clock.is_pending(instance.id):
                state = "pending"
            states[instance.id] = (state, instance.metadata_options.http_tokens or "optional")
        return states

    def stop(self) -> None:
        self.faults.release()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


class _QuietHandler(MotoRequestHandler):
    """No access log line per request (a burst makes hundreds)."""

    def log_request(self, *args: Any, **kwargs: Any) -> None:
        pass
