"""The master's registry client (cloud/image_digests.py) against small loopback HTTP
servers that play a registry and its token service the way a hostile or broken one
could: where the registry credentials may go (token realms, redirects), and how long
and how much one check may take. The real registry (Debian's docker-registry) is in
tests/containers/test_image_refresh.py."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import ThreadingHTTPServer
from typing import Any

import pytest

from buildbot_dockerami.cloud import image_digests
from buildbot_dockerami.cloud.image_digests import (
    DigestError,
    ImageDigests,
    realm_gets_credentials,
)
from buildbot_dockerami.config.checks import fleet_problems
from buildbot_dockerami.config.model import FleetWide
from buildbot_dockerami.localcloud.containers import QuietHandler

DIGEST = "sha256:" + "c" * 64
TOKEN = "tok-test"
CREDENTIALS = ("ci", "pw-secret")
BASIC = "Basic Y2k6cHctc2VjcmV0"  # ci:pw-secret


class Server:
    """A loopback HTTP server whose answers a test writes (``answer(handler)``); it
    records each request (method, path, Authorization header)."""

    def __init__(self, answer: Callable[[Any], None]) -> None:
        self.requests: list[tuple[str, str, str]] = []
        self.answer = answer
        server = self

        class Handler(QuietHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                self.handle_one()

            def do_HEAD(self) -> None:
                self.handle_one()

            def handle_one(self) -> None:
                server.requests.append((self.command, self.path,
                                        self.headers.get("Authorization", "")))
                server.answer(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def send(handler: Any, status: int, body: bytes = b"", headers: dict | None = None) -> None:
    handler.send_response(status)
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    if handler.command != "HEAD":
        handler.wfile.write(body)


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    made: list[Server] = []
    yield made
    for server in made:
        server.close()


def token_service(servers: list[Server]) -> Server:
    token = Server(lambda h: send(h, 200, json.dumps({"token": TOKEN}).encode()))
    servers.append(token)
    return token


def bearer_registry(servers: list[Server], realm: str) -> Server:
    """A registry that wants a Bearer token from ``realm``."""
    def answer(h: Any) -> None:
        if h.headers.get("Authorization") != f"Bearer {TOKEN}":
            return send(h, 401, b"{}", {"WWW-Authenticate": f'Bearer realm="{realm}"'})
        send(h, 200, b"", {"Docker-Content-Digest": DIGEST})
    registry = Server(answer)
    servers.append(registry)
    return registry


def with_credentials() -> ImageDigests:
    return ImageDigests(timeout=5, credentials=lambda reference, auth: CREDENTIALS)


@pytest.mark.parametrize(("registry", "realm", "gets"), [
    ("registry-1.docker.io", "https://auth.docker.io/token", True),
    ("ghcr.io", "https://ghcr.io/token", True),
    ("registry.gitlab.com", "https://gitlab.com/jwt/auth", True),
    ("quay.io", "https://quay.io/v2/auth", True),
    ("registry.example:5000", "https://registry.example/token", True),
    ("registry.example:5000", "https://REGISTRY.example:5001/token?x=1", True),
    ("registry.example", "https://auth.example/token", False),
    ("registry-1.docker.io", "https://auth.docker.io.example/token", False),
    ("registry-1.docker.io", "https://ghcr.io/token", False),
    ("ghcr.io", "https://auth.docker.io/token", False),
    ("127.0.0.1:5000", "http://127.0.0.1:5001/token", True),
    ("127.0.0.1:5000", "http://localhost:5001/token", False),
    ("[::1]:5000", "http://[::1]:5001/token", True),
])
def test_which_token_services_get_the_registry_credentials(registry: str, realm: str,
                                                           gets: bool) -> None:
    assert realm_gets_credentials(registry, realm) is gets


def test_the_operators_token_services_get_the_credentials_too() -> None:
    """FleetSettings(registry_token_services=...): a self-hosted GitLab's registry and
    token service on two host names; still only over HTTPS, never for another registry."""
    gitlab = image_digests.token_services({"registry.example.com": "gitlab.example.com",
                                           "harbor.example": ["a.example", "b.example"]})
    assert gitlab == {"registry.example.com": ("gitlab.example.com",),
                      "harbor.example": ("a.example", "b.example")}
    realm = "https://gitlab.example.com/jwt/auth"
    assert not realm_gets_credentials("registry.example.com", realm)
    assert realm_gets_credentials("registry.example.com", realm, gitlab)
    assert realm_gets_credentials("harbor.example:8443", "https://b.example/t", gitlab)
    assert not realm_gets_credentials("other.example", realm, gitlab)
    with pytest.raises(DigestError, match="not HTTPS"):
        realm_gets_credentials("registry.example.com", "http://gitlab.example.com/t", gitlab)


@pytest.mark.parametrize(("services", "fragment"), [
    (None, None),
    ({"registry.example.com": "gitlab.example.com"}, None),
    ({"registry.example.com": ["a.example", "b.example"]}, None),
    ("gitlab.example.com", "must be a dict of registry host -> token service host"),
    ({"registry.example.com": []}, "must be a host name or a list of them"),
    ({"registry.example.com:5000": "gitlab.example.com"}, "'registry.example.com:5000' is not"),
    ({"registry.example.com": "https://gitlab.example.com"}, "'https://gitlab.example.com'"),
    ({"Registry.Example.com": "gitlab.example.com"}, "'Registry.Example.com' is not a host"),
])
def test_registry_token_services_are_checked(services: Any, fragment: str | None) -> None:
    problems = fleet_problems(FleetWide(registry_token_services=services))
    if fragment is None:
        assert problems == []
    else:
        assert len(problems) == 1 and fragment in problems[0], problems
        assert problems[0].startswith("registry_token_services: ")


@pytest.mark.parametrize(("registry", "realm"), [
    ("registry.example", "http://registry.example/token"),
    ("registry-1.docker.io", "http://auth.docker.io/token"),
    ("127.0.0.1:5000", "http://auth.example/token"),
    ("registry.example", "ftp://registry.example/token"),
])
def test_a_token_realm_in_plain_http_is_refused_off_loopback(registry: str, realm: str) -> None:
    with pytest.raises(DigestError, match="token realm"):
        realm_gets_credentials(registry, realm)


def test_a_token_service_on_another_host_never_gets_the_credentials(
        servers: list[Server]) -> None:
    token = token_service(servers)
    # Named "localhost": another host than the registry's 127.0.0.1, on the same machine.
    registry = bearer_registry(servers, f"http://localhost:{token.port}/token")
    image = f"127.0.0.1:{registry.port}/a/b:1"
    assert with_credentials().digest(image) == DIGEST
    assert [auth for _, _, auth in token.requests] == [""]
    # The registry's own host gets them (as Harbor, GHCR or Quay ask).
    own = bearer_registry(servers, f"http://127.0.0.1:{token.port}/token")
    assert with_credentials().digest(f"127.0.0.1:{own.port}/a/b:1") == DIGEST
    assert [auth for _, _, auth in token.requests] == ["", BASIC]
    # ... and a token service the operator names for that registry host.
    named = with_credentials()
    named.token_services = image_digests.token_services({"127.0.0.1": "localhost"})
    assert named.digest(image) == DIGEST
    assert [auth for _, _, auth in token.requests] == ["", BASIC, BASIC]


def test_a_redirect_to_another_origin_is_not_followed(servers: list[Server]) -> None:
    elsewhere = Server(lambda h: send(h, 200, b"", {"Docker-Content-Digest": DIGEST}))
    servers.append(elsewhere)

    def answer(h: Any) -> None:
        if not h.headers.get("Authorization"):
            return send(h, 401, b"", {"WWW-Authenticate": 'Basic realm="r"'})
        if h.path.startswith("/moved/"):
            return send(h, 200, b"", {"Docker-Content-Digest": DIGEST})
        host = "localhost" if "/a/" in h.path else "127.0.0.1"
        port = elsewhere.port if "/a/" in h.path or "/b/" in h.path else registry.port
        send(h, 307, b"", {"Location": f"http://{host}:{port}/moved{h.path}"})
    registry = Server(answer)
    servers.append(registry)
    client = with_credentials()
    # Another host, or the same host on another port: refused, nothing sent there.
    for repository in ("a", "b"):
        with pytest.raises(DigestError, match="HTTP 307 to another origin"):
            client.digest(f"127.0.0.1:{registry.port}/{repository}/x:1")
    assert elsewhere.requests == []
    # The same origin: followed, as the same method, with the credentials.
    assert client.digest(f"127.0.0.1:{registry.port}/c/x:1") == DIGEST
    assert registry.requests[-1] == ("HEAD", "/moved/v2/c/x/manifests/1", BASIC)


def test_a_manifest_hashed_from_its_body_is_whole_or_unknown(servers: list[Server]) -> None:
    """A registry that leaves Docker-Content-Digest out is asked with GET and the body
    hashed; a body too large to be a manifest is no digest (never a hash of its start)."""
    sizes = {"small": 100, "huge": 4 * 1024 * 1024 + 1}

    def answer(h: Any) -> None:
        send(h, 200, b"m" * sizes[h.path.split("/")[2]])
    registry = Server(answer)
    servers.append(registry)
    client = ImageDigests(timeout=5)
    expected = "sha256:" + hashlib.sha256(b"m" * 100).hexdigest()
    assert client.digest(f"127.0.0.1:{registry.port}/small/x:1") == expected
    with pytest.raises(DigestError, match="larger than"):
        client.digest(f"127.0.0.1:{registry.port}/huge/x:1")


def test_one_check_ends_by_its_deadline_however_slowly_the_registry_answers(
        servers: list[Server]) -> None:
    """Each socket operation has the request timeout; the whole check (a body trickled a
    byte at a time included) has one deadline."""
    stop = threading.Event()

    def answer(h: Any) -> None:
        if h.command == "HEAD":
            return send(h, 200)  # no Docker-Content-Digest: the body is asked for
        h.send_response(200)
        h.send_header("Content-Length", "100000")
        h.end_headers()
        while not stop.wait(0.02):
            try:
                h.wfile.write(b"m")
                h.wfile.flush()
            except OSError:
                return
    registry = Server(answer)
    servers.append(registry)
    client = ImageDigests(timeout=5, deadline=0.5)
    started = time.monotonic()
    try:
        with pytest.raises(DigestError, match=r"no answer within the check's 0.5s"):
            client.digest(f"127.0.0.1:{registry.port}/slow/x:1")
    finally:
        stop.set()
    assert time.monotonic() - started < 3  # far below the 5 s a socket read may take
