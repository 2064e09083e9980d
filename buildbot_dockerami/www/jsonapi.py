"""JSON answers for the plugin's small API: one place for status codes and errors."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer
from twisted.python import log
from twisted.web import resource, server

#: Longest piece of a request's input an answer quotes.
QUOTE_CHARS = 40


class ApiError(Exception):
    """A refusal with an HTTP status (400, 403, 404, 409, 413, 415) and a message for people."""

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
            # Not the exception's text: it may quote the request.
            reply(request, 500, {"error": f"{what} failed; the master log says why"})

    d.addCallbacks(lambda result: reply(request, 200, result), failed)
    return server.NOT_DONE_YET


class AppResource(resource.Resource):
    """A leaf of the plugin, with the plugin application (master, settings) at hand."""

    isLeaf = True

    def __init__(self, app: Any) -> None:
        super().__init__()
        self.app = app


def quote(value: Any) -> str:
    """A short repr of untrusted input for an error message: never the whole body back."""
    try:
        text = repr(value)
    except RecursionError:  # parsed near the depth limit, then asked deeper in the stack
        text = f"<deeply nested {type(value).__name__}>"
    return text if len(text) <= QUOTE_CHARS else text[: QUOTE_CHARS - 3] + "..."


def parse_object(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object, or ApiError 400 for anything else: invalid JSON,
    bad UTF-8, a number Python will not parse, or nesting too deep for the parser."""
    try:
        body = json.loads(raw or b"{}")
    except RecursionError:
        raise ApiError(400, "body is not usable JSON: nested too deep") from None
    except ValueError:  # includes UnicodeDecodeError and int digit-limit errors
        raise ApiError(400, "body is not JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"body must be a JSON object, not {type(body).__name__}")
    return body


def body_size(request: Any) -> int:
    """Bytes in the request body (twisted has buffered it by the time we render)."""
    content = request.content
    content.seek(0, 2)
    size = content.tell()
    content.seek(0)
    return size
