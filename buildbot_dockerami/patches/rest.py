"""Workaround for a buildbot bug that kills the web server: REST responses written from a
thread. Installed by the ``dockerami`` www plugin; remove this module (and its one call in
``www/__init__.py``) once no supported buildbot has the bug.

buildbot 4.2.0 to 4.3.0 (at least) encode each REST API answer in the reactor's thread
pool, ``threads.deferToThread(V2RootResource._write_json_data, request, encoder, data)``,
and ``_write_json_data`` calls ``request.write`` from that thread. Twisted is not
thread-safe: when a client drops the connection meanwhile, the pool thread writes to a
transport the reactor is tearing down (``'NoneType' object has no attribute 'write'``)
or re-registers a closed descriptor with epoll; the reactor's descriptor table and epoll
then disagree, every new connection fails in ``epollreactor._add`` (``FileNotFoundError``,
``Bad file descriptor``) and the web server resets all connections until restart.

The replacement keeps the encoding in the thread (large answers still don't block the
reactor) but hands the bytes to the reactor thread, which sets ``Content-Length`` and
writes only if the connection is still there.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor
from twisted.python import log

#: Set (to anything but "" or "0") to leave buildbot's code alone: only for showing that
#: the regression test fails without the workaround.
DISABLE_ENV = "DOCKERAMI_DISABLE_RESTFIX"

_INSTALLED = "_dockerami_restfix"


def _names(function: Any) -> tuple[str, ...]:
    code = getattr(getattr(function, "__wrapped__", function), "__code__", None)
    return code.co_names if code is not None else ()


def has_thread_write_bug(resource_class: Any) -> bool:
    """Whether ``resource_class`` (buildbot's ``V2RootResource``) runs a function that
    writes to the request in a thread: decided from the code itself, not the version, so a
    fixed buildbot (writing on the reactor, or not deferring to a thread) is left alone."""
    render = getattr(resource_class, "renderRest", None)
    write_json = getattr(resource_class, "_write_json_data", None)
    if render is None or write_json is None:
        return False
    render_names, write_names = _names(render), _names(write_json)
    return ("deferToThread" in render_names and "_write_json_data" in render_names
            and "write" in write_names)


def _gone(request: Any) -> bool:
    return bool(request.finished) or request.channel is None


def encode_then_write(request: Any, encoder: Any, data: Any) -> None:
    """Runs in the pool thread in place of ``_write_json_data``: only encodes; never
    touches the request except to read whether the client is still there."""
    chunks = []
    for chunk in encoder.iterencode(data):
        if _gone(request):  # a read only: stops a long encoding for a client that left
            return
        chunks.append(chunk.encode("utf-8"))
    # Queued before the pool's own callFromThread that resumes renderRest (the reactor runs
    # them in order), so the body is written before buildbot finishes the request.
    reactor.callFromThread(write_body, request, b"".join(chunks))  # type: ignore[attr-defined]


def write_body(request: Any, body: bytes) -> None:
    """On the reactor thread: the answer, unless the connection is gone."""
    if _gone(request):
        return
    request.setHeader(b"content-length", str(len(body)).encode())
    if request.method != b"HEAD":
        request.write(body)


def install(resource_class: Any = None) -> bool:
    """Replace the thread-side writer if this buildbot has the bug; True if it is (now)
    replaced. Safe to call on every reconfig."""
    if resource_class is None:
        from buildbot.www.rest import V2RootResource as resource_class
    if getattr(resource_class, _INSTALLED, False):
        return True
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        log.msg(f"dockerami: REST write workaround disabled by {DISABLE_ENV}")
        return False
    if not has_thread_write_bug(resource_class):
        return False
    resource_class._write_json_data = staticmethod(encode_then_write)
    setattr(resource_class, _INSTALLED, True)
    log.msg("dockerami: this buildbot writes REST answers from a thread, which can break "
            "its web server when clients disconnect; answers are now written on the "
            "reactor thread (buildbot_dockerami.patches.rest)")
    return True
