"""The web server survives clients that drop their answers (issue 13): a real master, dozens
of REST and Fleet requests abandoned unread, mid-answer or before it, some at once; then the
REST API, the Fleet page (in chromium) and a forced build still work and the log is clean.

buildbot 4.2.0 to 4.3.0 write REST answers from a thread, which breaks the reactor under
exactly this traffic; ``buildbot_dockerami.patches.rest`` works around it. To see this test
fail without the workaround, run it with ``DOCKERAMI_DISABLE_RESTFIX=1`` in the environment.
"""

from __future__ import annotations

import http.client
import json
import socket
import struct
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests

from buildbot_dockerami.patches import rest as restfix
from tests.harness import PLUGIN_PATH, SUCCESS, master_cfg, unhandled_errors
from tests.helpers import ARTIFACTS, VIEWPORT

REST_PATHS = ["/api/v2/builders", "/api/v2/workers", "/api/v2/masters",
              "/api/v2/builders?field=name", "/api/v2/buildrequests"]
FLEET_PATHS = [f"{PLUGIN_PATH}/api/fleet", f"{PLUGIN_PATH}/metrics"]
#: How a client walks away: after the headers, unread (urllib's ``del r``); after a few
#: bytes; with a reset (SO_LINGER 0) once the answer starts; right after asking.
MODES = ["unread", "partial", "reset", "immediately"]
#: Answers long enough to be written in many pieces, as on a real master.
MORE_BUILDERS = """
c['builders'] += [util.BuilderConfig(name='other%d' % i, workernames=['w0'], factory=factory,
                                     tags=['other'], description='a builder ' * 20)
                  for i in range(30)]
c['schedulers'].append(schedulers.ForceScheduler(
    name='other', builderNames=[b.name for b in c['builders'][1:]]))
"""


def drop(port: int, path: str, mode: str) -> None:
    if mode == "unread":
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", path, headers={"Accept": "application/json"})
        response = conn.getresponse()
        del response
        conn.close()
        return
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                     f"Accept: text/html\r\n\r\n".encode())
        if mode == "partial":
            sock.recv(16)
        elif mode == "reset":
            sock.recv(1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()


def storm(port: int, paths: list[str], rounds: int, concurrency: int) -> tuple[int, list[str]]:
    """Drop ``rounds`` answers per (path, mode), first one by one then ``concurrency`` at
    once; returns how many were dropped and the errors seen while dropping (a refused or
    reset connection here is the web server already broken)."""
    jobs = [(path, mode) for _ in range(rounds) for path in paths for mode in MODES]

    def one(job: tuple[str, str]) -> str | None:
        try:
            drop(port, *job)
        except (OSError, http.client.HTTPException) as e:
            return f"{job}: {e!r}"
        return None

    half = len(jobs) // 2
    errors = [one(job) for job in jobs[:half]]
    with ThreadPoolExecutor(concurrency) as pool:
        errors += pool.map(one, jobs[half:])
    return len(jobs), [e for e in errors if e is not None]


def test_restfix_detects_the_threaded_writer_from_the_code(monkeypatch) -> None:
    monkeypatch.delenv(restfix.DISABLE_ENV, raising=False)
    class Buggy:
        def renderRest(self, request: Any) -> Any:
            from twisted.internet import threads
            return threads.deferToThread(Buggy._write_json_data, request, None, None)

        @staticmethod
        def _write_json_data(request: Any, encoder: Any, data: Any) -> None:
            request.write(b"")

    class Fixed(Buggy):
        @staticmethod
        def _write_json_data(request: Any, encoder: Any, data: Any) -> None:
            return None  # encodes only: the write happens on the reactor

    class OnReactor:
        def renderRest(self, request: Any) -> None:
            request.write(b"")

    assert restfix.has_thread_write_bug(Buggy)
    assert not restfix.has_thread_write_bug(Fixed)
    assert not restfix.has_thread_write_bug(OnReactor)
    assert restfix.install(Buggy)
    assert Buggy._write_json_data is restfix.encode_then_write
    assert restfix.install(Buggy)  # again: no double wrapping
    assert not restfix.install(OnReactor)


class FakeRequest:
    """Just the attributes write_body reads or sets (the real path is tested below)."""

    def __init__(self, gone: bool = False, method: bytes = b"GET") -> None:
        self.finished, self.channel, self.method = False, None if gone else object(), method
        self.headers: dict[bytes, bytes] = {}
        self.written: list[bytes] = []

    def setHeader(self, name: bytes, value: bytes) -> None:
        self.headers[name] = value

    def write(self, data: bytes) -> None:
        self.written.append(data)


def test_write_body_skips_a_request_whose_client_left() -> None:
    live, gone, head = FakeRequest(), FakeRequest(gone=True), FakeRequest(method=b"HEAD")
    for request in (live, gone, head):
        restfix.write_body(request, b'{"a":1}')
    assert live.written == [b'{"a":1}'] and live.headers[b"content-length"] == b"7"
    assert gone.written == [] and gone.headers == {}
    assert head.written == [] and head.headers[b"content-length"] == b"7"


@pytest.mark.integration
def test_dropped_answers_leave_the_web_server_working(make_master, cloud, browser):
    master = make_master(master_cfg(build_wait_timeout=600, plugins={"dockerami": {}})
                         + MORE_BUILDERS)
    port = master.www_port
    from buildbot.www.rest import V2RootResource
    buggy = restfix.has_thread_write_bug(V2RootResource)
    installed = "answers are now written on the reactor thread" in master.log()
    disabled = f"workaround disabled by {restfix.DISABLE_ENV}" in master.log()
    assert installed == (buggy and not disabled), master.log()[-3000:]

    dropped, errors = storm(port, REST_PATHS + FLEET_PATHS, rounds=3, concurrency=8)
    assert dropped >= 60
    assert errors == [], f"{len(errors)} of {dropped} dropped requests failed: {errors[:5]}"

    # A browser leaving the Fleet page while its polls are in flight, a few times.
    page = browser.new_page(viewport=VIEWPORT)
    try:
        for _ in range(5):
            with page.expect_request(lambda r: r.url.endswith(f"{PLUGIN_PATH}/api/fleet"),
                                     timeout=30_000):
                page.goto(f"http://127.0.0.1:{port}/#/dockerami", wait_until="commit")
            page.goto("about:blank")  # its poll is in flight, or just answered
    finally:
        page.close()

    for path in REST_PATHS:
        response = requests.get(f"http://127.0.0.1:{port}{path}", timeout=10)
        assert response.status_code == 200
        json.loads(response.text)
    assert [w["name"] for w in master.get("workers")] == ["w0"]
    assert [w["name"] for w in master.fleet()["workers"]] == ["w0"]

    brid = master.force()
    page = browser.new_page(viewport=VIEWPORT)
    try:
        page.goto(f"http://127.0.0.1:{port}/#/dockerami")
        page.locator("tr[data-worker='w0']").wait_for(timeout=30_000)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "fleet-after-dropped-answers.png"), full_page=True)
    finally:
        page.close()
    assert master.wait_request(brid, 120)["results"] == SUCCESS

    assert master.stop()  # anything still queued has reached the log
    log = master.log()
    assert unhandled_errors(log) == []
    assert "Unhandled error in Deferred" not in log
    assert "object has no attribute 'write'" not in log
