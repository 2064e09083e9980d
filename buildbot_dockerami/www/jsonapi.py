"""JSON answers for the plugin's small API: one place for status codes and errors."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer
from twisted.python import log
from twisted.web import resource, server


class ApiError(Exception):
    """A refusal with an HTTP status (400, 403, 404, 409, 415) and a message for people."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def reply(request: Any, status: int, payload: Any) -> None:
    if request.finished or request.channel is None:
        return  # the client left before the answer was ready (finish() would raise)
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.write(json.dumps(payload).encode())
    request.finish()


def answer(request: Any, d: defer.Deferred, what: str) -> Any:
    """Finish ``request`` with the Deferred's result, an ApiError's status, or a 500."""

    def failed(failure: Any) -> None:
        if failure.check(ApiError):
            reply(request, failure.value.status, {"error": str(failure.value)})
        else:
            log.err(failure, f"dockerami: {what}")
            reply(request, 500, {"error": failure.getErrorMessage()})

    d.addCallbacks(lambda result: reply(request, 200, result), failed)
    return server.NOT_DONE_YET


class AppResource(resource.Resource):
    """A leaf of the plugin, with the plugin application (master, settings) at hand."""

    isLeaf = True

    def __init__(self, app: Any) -> None:
        super().__init__()
        self.app = app
