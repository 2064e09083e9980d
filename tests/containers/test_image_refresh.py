"""Image refresh against a real loopback registry (Debian's docker-registry): the
master's registry client (cloud/image_digests.py) anonymous, with HTTP basic auth (an
htpasswd user, the credentials also read from the local cloud's SSM and Secrets Manager)
and behind a Bearer token service; and end to end, with the real bootstrap and image on
the engine: the tag an instance runs is pushed again while its build runs, the master
drains it (refresh_image), the build finishes, then the instance is terminated."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import secrets
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import boto3
import docker
import pytest
import requests

from buildbot_dockerami.cloud.image_digests import (
    Auth,
    DigestError,
    ImageDigests,
    stored_credentials,
)
from buildbot_dockerami.localcloud.containers import QuietHandler
from tests.docker_support import Registry, only_instance, refresh_checks
from tests.harness import SUCCESS, free_port, master_cfg, wait_for
from tests.helpers import VIEWPORT, state_of
from tests.test_cost import scrape

pytestmark = pytest.mark.integration

USER = "ci-" + secrets.token_hex(4)
PASSWORD = "pw-" + secrets.token_urlsafe(18)
MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"


def push_manifest(address: str, repository: str, tag: str, label: str,
                  auth: tuple[str, str] | None = None) -> str:
    """A tiny image (a config and one blob) put on the registry through its API, as
    ``repository:tag``; its manifest's digest."""
    base = f"http://{address}/v2/{repository}"

    def blob(data: bytes) -> dict[str, Any]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        started = requests.post(f"{base}/blobs/uploads/", auth=auth, timeout=10)
        assert started.status_code == 202, started.text
        location = started.headers["Location"]
        if location.startswith("/"):
            location = f"http://{address}{location}"
        put = requests.put(location, params={"digest": digest}, data=data, auth=auth,
                           headers={"Content-Type": "application/octet-stream"}, timeout=10)
        assert put.status_code == 201, put.text
        return {"mediaType": "application/octet-stream", "size": len(data), "digest": digest}

    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "config": {"Labels": {"test": label}},
                         "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    layer = blob(label.encode())
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": MANIFEST_TYPE,
        "config": {**blob(config), "mediaType": "application/vnd.docker.container.image.v1+json"},
        "layers": [{**layer, "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip"}],
    }).encode()
    put = requests.put(f"{base}/manifests/{tag}", data=manifest, auth=auth,
                       headers={"Content-Type": MANIFEST_TYPE}, timeout=10)
    assert put.status_code == 201, put.text
    return "sha256:" + hashlib.sha256(manifest).hexdigest()


@pytest.fixture(scope="module")
def open_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    registry = Registry(tmp_path_factory.mktemp("digest-registry")).start()
    yield registry
    registry.stop()


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    registry = Registry(tmp_path_factory.mktemp("digest-basic"), {USER: PASSWORD}).start()
    yield registry
    registry.stop()


def test_the_digest_a_tag_points_at_anonymously(open_registry: Registry) -> None:
    image = f"{open_registry.address}/refresh/anonymous:stable"
    first = push_manifest(open_registry.address, "refresh/anonymous", "stable", "one")
    client = ImageDigests(timeout=5)
    assert client.digest(image) == first
    second = push_manifest(open_registry.address, "refresh/anonymous", "stable", "two")
    assert second != first and client.digest(image) == second
    with pytest.raises(DigestError, match=r"manifests/missing: HTTP 404"):
        client.digest(f"{open_registry.address}/refresh/anonymous:missing")
    assert client.digest(f"{open_registry.address}/refresh/anonymous@{first}") == first
    port = free_port()  # nothing listens there
    with pytest.raises(DigestError, match=f"^127.0.0.1:{port}: .*refused"):
        client.digest(f"127.0.0.1:{port}/refresh/nobody:1")


def test_basic_auth_with_the_workers_registry_credentials(basic_registry: Registry) -> None:
    image = f"{basic_registry.address}/refresh/private:1"
    pushed = push_manifest(basic_registry.address, "refresh/private", "1", "p", (USER, PASSWORD))
    with pytest.raises(DigestError, match=r"wants credentials .* no registry_credentials"):
        ImageDigests(timeout=5).digest(image)
    given = ImageDigests(timeout=5, credentials=lambda reference, auth: (USER, PASSWORD))
    assert given.digest(image) == pushed
    # A wrong password, really sent (Basic) and refused: the error names neither it nor
    # the header that carried it.
    sent = "pw-" + secrets.token_urlsafe(18)
    wrong = ImageDigests(timeout=5, credentials=lambda reference, auth: (USER, sent))
    with pytest.raises(DigestError) as refused:
        wrong.digest(image)
    header = base64.b64encode(f"{USER}:{sent}".encode()).decode()
    assert "HTTP 401" in str(refused.value)
    assert sent not in str(refused.value) and header not in str(refused.value)


def test_credentials_read_from_ssm_and_secrets_manager(basic_registry: Registry, cloud,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The master reads registry_credentials with its own credential chain (here the
    local cloud's endpoint and keys), and never says the password."""
    for name, value in cloud.env().items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)
    session = boto3.session.Session(region_name=cloud.region)
    value = json.dumps({"username": USER, "password": PASSWORD})
    session.client("ssm").put_parameter(Name="/ci/refresh-registry", Value=value,
                                        Type="SecureString")
    session.client("secretsmanager").create_secret(Name="ci/refresh-registry", SecretString=value)
    image = f"{basic_registry.address}/refresh/stored:1"
    pushed = push_manifest(basic_registry.address, "refresh/stored", "1", "s", (USER, PASSWORD))
    for where in ("ssm:/ci/refresh-registry", "secretsmanager:ci/refresh-registry"):
        auth = Auth(where, cloud.region)
        assert stored_credentials(auth) == (USER, PASSWORD)
        assert ImageDigests(timeout=5).digest(image, auth) == pushed
    with pytest.raises(DigestError) as missing:
        ImageDigests(timeout=5).digest(image, Auth("ssm:/ci/none", cloud.region))
    assert "reading ssm:/ci/none: ParameterNotFound" in str(missing.value)


class TokenGate:
    """A registry front that wants a Bearer token, as Docker Hub, GHCR or Quay do: a
    request without one gets a challenge naming this server's /token, which gives a
    token (anonymously, or to the registry credentials when asked with them)."""

    def __init__(self, registry: Registry, want_basic: tuple[str, str] | None = None) -> None:
        self.token = "tok-" + secrets.token_hex(8)
        self.token_requests: list[dict[str, str]] = []
        gate = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                self.answer()

            def do_HEAD(self) -> None:
                self.answer()

            def answer(self) -> None:
                if self.path.startswith("/token"):
                    query = dict(parse_qsl(urlsplit(self.path).query))
                    query["authorization"] = self.headers.get("Authorization", "")
                    gate.token_requests.append(query)
                    if want_basic is not None:
                        expected = "Basic " + base64.b64encode(
                            ":".join(want_basic).encode()).decode()
                        if query["authorization"] != expected:
                            return self.send(401, b"{}")
                    return self.send(200, json.dumps({"token": gate.token}).encode())
                if self.headers.get("Authorization") != f"Bearer {gate.token}":
                    realm = f"http://127.0.0.1:{gate.port}/token"
                    return self.send(401, b"{}", {"WWW-Authenticate": (
                        f'Bearer realm="{realm}",service="gate.test",'
                        f'scope="repository:{self.path.split("/")[2]}/x:pull"')})
                upstream = requests.request(
                    self.command, f"http://{registry.address}{self.path}", timeout=10,
                    headers={"Accept": self.headers.get("Accept", "")})
                self.send(upstream.status_code, upstream.content, {
                    "Docker-Content-Digest": upstream.headers.get("Docker-Content-Digest", "")})

            def send(self, status: int, body: bytes, headers: dict | None = None) -> None:
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_bearer_challenge_fetches_a_token(open_registry: Registry) -> None:
    pushed = push_manifest(open_registry.address, "refresh/bearer", "1", "b")
    anonymous = TokenGate(open_registry)
    try:
        image = f"127.0.0.1:{anonymous.port}/refresh/bearer:1"
        assert ImageDigests(timeout=5).digest(image) == pushed
        (asked,) = anonymous.token_requests
        assert asked == {"service": "gate.test", "scope": "repository:refresh/x:pull",
                         "authorization": ""}
    finally:
        anonymous.close()
    private = TokenGate(open_registry, want_basic=(USER, PASSWORD))
    try:
        image = f"127.0.0.1:{private.port}/refresh/bearer:1"
        with pytest.raises(DigestError, match="token service answered HTTP 401"):
            ImageDigests(timeout=5).digest(image)
        with_credentials = ImageDigests(timeout=5,
                                        credentials=lambda reference, auth: (USER, PASSWORD))
        assert with_credentials.digest(image) == pushed
    finally:
        private.close()


# -- end to end --------------------------------------------------------------------------

FAST_REFRESH = """
from buildbot_dockerami import FleetSettings
c['services'] = [FleetSettings(reconcile_interval=5, image_refresh_interval=5)]
"""


class Go:
    """A loopback URL the build polls: 404 until the test lets it finish."""

    def __init__(self) -> None:
        self.ready = False
        go = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                self.send_response(200 if go.ready else 404)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/go"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_tag_pushed_again_drains_the_busy_instance_after_its_build(
        make_master, cloud, *, engine: docker.DockerClient, registry: Registry,
        worker_image: str, browser) -> None:
    repository = worker_image.rsplit(":", 1)[0]
    tag = f"refresh-{secrets.token_hex(4)}"
    image = f"{repository}:{tag}"
    engine.images.pull(worker_image)  # from the loopback registry
    engine.images.get(worker_image).tag(repository, tag)
    engine.images.push(repository, tag=tag)
    engine.images.remove(image)  # so that the instance really pulls it
    go = Go()
    changed = None
    try:
        command = (f"echo started; until python3 -c \"import urllib.request as u; "
                   f"u.urlopen('{go.url}', timeout=2)\" 2>/dev/null; do sleep 0.2; done")
        master = make_master(master_cfg(image=image, command=command, build_wait_timeout=600,
                                        plugins={"dockerami": {}}) + FAST_REFRESH)
        brid = master.force()
        build = wait_for(lambda: master.builds_for(brid), 180, "the build to start")[0]
        wait_for(lambda: "started" in master.step_log(build["buildid"]), 180, "the step to run")
        instance_id = only_instance(cloud)["InstanceId"]
        running = ImageDigests(timeout=5).digest(image)
        # The instance reported the digest it runs (bootstrap -> worker info -> master).
        wait_for(lambda: f"instance {instance_id} runs {image} at {running}" in master.log(),
                 30, "the master to record the reported digest")
        assert f"dockerami-bootstrap: image {image} is {running}" in \
            cloud.runtime.console(instance_id)
        assert master.fleet()["workers"][0]["instance"]["image_digest"] == running

        # Readers never drive the registry: the checks follow the fleet's schedule.
        path = f"/v2/{repository.split('/', 1)[1]}/manifests/{tag}"
        wait_for(lambda: refresh_checks(registry, path) >= 1, 30, "a first registry check")
        before, started = refresh_checks(registry, path), time.monotonic()
        url = master.plugin_url("api/fleet")

        def get(number: int) -> int:
            return requests.get(url if number % 2 else master.plugin_url("metrics"),
                                timeout=10).status_code
        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(get, range(400))) == {200}
        elapsed = time.monotonic() - started
        assert refresh_checks(registry, path) - before <= elapsed / 5 + 2, elapsed
        assert not master.fleet()["workers"][0]["instance"]["retired"]

        # The tag now points at another image: a label more, pushed with the engine.
        dockerfile = f"FROM {image}\nLABEL dockerami.test=refreshed-{tag}\n"
        changed, _ = engine.images.build(fileobj=io.BytesIO(dockerfile.encode()), pull=False,
                                         rm=True, tag=image)
        engine.images.push(repository, tag=tag)
        moved = ImageDigests(timeout=5).digest(image)
        assert moved != running
        retiring = wait_for(lambda: master.fleet()["workers"][0]["instance"]["retired"], 60,
                            "the Fleet API to show the instance draining")
        assert retiring == (f"refresh_image: runs {running[:19]}…; {image} now points at "
                            f"{moved[:19]}…"), retiring
        assert state_of(cloud, instance_id) == "running"
        assert not master.get(f"buildrequests/{brid}")[0]["complete"]
        # The Fleet page shows the digest it runs and why it drains (not as a fault).
        page = browser.new_page(viewport=VIEWPORT)
        try:
            page.goto(f"http://127.0.0.1:{master.www_port}/#/dockerami")
            row = page.locator("tr[data-worker='w0']")
            row.locator(".dockerami-draining").wait_for(timeout=30_000)
            assert row.locator(".dockerami-draining").inner_text() == "draining: " + retiring
            assert row.locator(".dockerami-image-digest").inner_text() == running[:19] + "…"
            assert row.locator(".dockerami-image").get_attribute("title") == running
        finally:
            page.close()

        # The running build is never killed: it finishes, then the instance ends.
        go.ready = True
        final = master.wait_request(brid, 120)
        assert final["results"] == SUCCESS and final["buildid"] == build["buildid"]
        wait_for(lambda: state_of(cloud, instance_id) == "terminated", 60, "the termination")
        assert scrape(master)[("dockerami_retirements_total",
                               frozenset({("reason", "refresh_image")}))] == 1
        assert f"instance {instance_id} drains: refresh_image: " in master.log()
    finally:
        go.close()
        for leftover in (image, *([changed.id] if changed is not None else [])):
            with contextlib.suppress(docker.errors.ImageNotFound):
                engine.images.remove(leftover, force=True)

