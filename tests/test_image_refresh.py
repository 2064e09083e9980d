"""Image refresh (fleet/image_refresh.py) on a fake clock: what an instance reports it
runs (protocol/imagedigest.py), what the tag points at (asked at most once per interval
per image, the check in flight shared, a failure "unknown"), and the decision the worker
glue takes on the reconciler's pass: stale -> drained with reason refresh_image; unknown,
no digest reported or a pinned reference -> never."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, task

from buildbot_dockerami.cloud.image_digests import Auth, DigestError, challenge
from buildbot_dockerami.config.checks import fleet_problems
from buildbot_dockerami.config.model import FleetWide, WorkerSettings
from buildbot_dockerami.fleet import image_refresh, retirement
from buildbot_dockerami.fleet import metrics as metrics_module
from buildbot_dockerami.fleet.image_refresh import ImageRefresh
from buildbot_dockerami.fleet.launch import LaunchedInstance
from buildbot_dockerami.fleet.remembered import Remembered
from buildbot_dockerami.fleet.service import Fleet
from buildbot_dockerami.protocol import imagedigest
from buildbot_dockerami.worker.retiring import Retiring

OLD = "sha256:" + "a" * 64
NEW = "sha256:" + "b" * 64
IMAGE = "registry.example:5000/ci/linux:stable"


@pytest.mark.parametrize(("image", "expected"), [
    ("debian", ("docker.io", "library/debian", "latest", None)),
    ("debian:12", ("docker.io", "library/debian", "12", None)),
    ("docker.io/library/debian:12", ("docker.io", "library/debian", "12", None)),
    ("org/worker:2015-10-19b", ("docker.io", "org/worker", "2015-10-19b", None)),
    ("127.0.0.1:5000/dockerami/worker-linux:20261207",
     ("127.0.0.1:5000", "dockerami/worker-linux", "20261207", None)),
    ("localhost/w", ("localhost", "w", "latest", None)),
    ("ghcr.io/o/r@" + OLD, ("ghcr.io", "o/r", "latest", OLD)),
])
def test_references_are_read_as_docker_reads_them(image: str, expected: tuple) -> None:
    reference = imagedigest.parse(image)
    assert reference is not None
    assert (reference.registry, reference.repository, reference.tag,
            reference.digest) == expected


BOOTSTRAP = Path(__file__).resolve().parent.parent / "ami" / "dockerami-bootstrap.sh"


def test_the_bootstrap_names_repositories_as_the_master_does() -> None:
    """The bootstrap picks the RepoDigests entry of the repository it pulled with its own
    sh function; it reads each reference as protocol/imagedigest.py does (Docker Hub's
    names included), or an instance would report no digest, or another repository's."""
    script = BOOTSTRAP.read_text()
    function = re.search(r"^repository_of\(\) \{\n.*?^\}\n", script, re.M | re.S)
    assert function is not None
    images = ["debian", "debian:12", "library/debian:12", "docker.io/library/debian:12",
              "index.docker.io/debian", "registry-1.docker.io/library/debian:12",
              "registry-1.docker.io/debian", "org/worker:2015-10-19b", "docker.io/org/w",
              "127.0.0.1:5000/dockerami/worker-linux:1", "localhost/w", "localhost:5000/w:2",
              "ghcr.io/o/r@" + OLD, "ghcr.io/o/r:1@" + OLD, "registry.example:5000/ci/linux"]
    shown = subprocess.run(
        ["sh", "-c", function.group(0) + 'for i in "$@"; do repository_of "$i"; done', "sh",
         *images], capture_output=True, text=True, check=True).stdout.splitlines()
    for image, name in zip(images, shown, strict=True):
        reference = imagedigest.parse(image)
        assert reference is not None
        hub = reference.registry in imagedigest.HUB_NAMES
        expected = (reference.repository.removeprefix("library/") if hub
                    else f"{reference.registry}/{reference.repository}")
        assert name == expected, image


def test_where_the_manifest_is_asked_for() -> None:
    hub = imagedigest.parse("debian:12")
    assert hub is not None and hub.manifest_url() == (
        "https://registry-1.docker.io/v2/library/debian/manifests/12")
    v6 = imagedigest.parse("[::1]:5000/a/b:c")
    assert v6 is not None and v6.scheme == "http"
    local = imagedigest.parse("127.0.0.1:5000/a/b:c")
    assert local is not None and local.manifest_url() == "http://127.0.0.1:5000/v2/a/b/manifests/c"
    ghcr = imagedigest.parse("ghcr.io/o/r:1")
    assert ghcr is not None and ghcr.manifest_url() == "https://ghcr.io/v2/o/r/manifests/1"
    for bad in ("", " x", "Upper/Case:1", "a/b:" + "t" * 200, "a@sha256:short"):
        assert imagedigest.parse(bad) is None, bad
    assert imagedigest.pinned("a/b@" + OLD) and not imagedigest.pinned(IMAGE)


def test_the_reported_digest_is_validated() -> None:
    assert imagedigest.from_info({"image_digest": OLD}) == OLD
    assert imagedigest.from_info({"image_digest": OLD + "\n"}) == OLD
    assert imagedigest.from_info({"image_digest": OLD.encode()}) == OLD
    for bad in ("", "sha256:" + "A" * 64, "sha256:abc", "md5:" + "a" * 64, None, 3):
        assert imagedigest.from_info({"image_digest": bad}) is None
    assert imagedigest.from_info({}) is None and imagedigest.from_info(None) is None
    assert imagedigest.short(OLD) == "sha256:aaaaaaaaaaaa…"


def test_authentication_challenges_are_read() -> None:
    assert challenge('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
                     'scope="repository:library/debian:pull"') == ("bearer", {
                         "realm": "https://auth.docker.io/token",
                         "service": "registry.docker.io",
                         "scope": "repository:library/debian:pull"})
    assert challenge('Basic realm="test"') == ("basic", {"realm": "test"})
    assert challenge("") == ("", {})


class Source:
    """A registry stand-in: answers held until the test gives them; counts the checks."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, Any]] = []
        self.pending: list[defer.Deferred] = []

    def digest(self, image: str, auth: Any = None) -> defer.Deferred:
        self.asked.append((image, auth))
        d: defer.Deferred = defer.Deferred()
        self.pending.append(d)
        return d


def test_the_registry_is_asked_at_most_once_per_interval_and_a_failure_is_unknown() -> None:
    clock, source = task.Clock(), Source()
    clock.advance(1000)
    checker = ImageRefresh(clock.seconds, source, interval=600)
    auth = Auth("ssm:/ci/registry", "eu-west-1")
    # Two workers asking at once share one check.
    first, second = checker.current(IMAGE, auth), checker.current(IMAGE, auth)
    assert len(source.asked) == 1 and not first.called
    source.pending.pop().callback(OLD)
    assert first.result == second.result == OLD and checker.calls == 1
    clock.advance(599)
    assert checker.current(IMAGE, auth).result == OLD and checker.calls == 1
    clock.advance(1)
    moved = checker.current(IMAGE, auth)
    source.pending.pop().callback(NEW)
    assert moved.result == NEW and checker.calls == 2
    # No answer: unknown, remembered (and logged) for the interval too.
    clock.advance(600)
    failed = checker.current(IMAGE, auth)
    source.pending.pop().errback(DigestError("registry.example:5000: HTTP 503"))
    assert failed.result is None
    assert checker.current(IMAGE, auth).result is None and checker.calls == 3
    # An answer that is no digest is unknown as well.
    other = checker.current("other/image:1")
    source.pending.pop().callback("latest")
    assert other.result is None
    # A pinned reference is never asked for.
    assert checker.current("a/b@" + OLD).result is None and checker.calls == 4


def test_at_most_a_few_registry_checks_run_at_once() -> None:
    """Checks run in the fleet's thread pool, shared with EC2 calls: however many images
    are due, at most CHECKS_AT_ONCE are asked at once; the others wait their turn, and
    their answer counts as asked when the registry was asked."""
    clock, source = task.Clock(), Source()
    checker = ImageRefresh(clock.seconds, source, interval=600)
    images = [f"registry.example/ci/image{n}:1" for n in range(7)]
    answers = [checker.answer(image) for image in images]
    assert image_refresh.CHECKS_AT_ONCE == 4
    assert [image for image, _ in source.asked] == images[:4]
    clock.advance(30)
    source.pending[0].callback(OLD)
    source.pending[1].errback(DigestError("registry.example: HTTP 503"))  # a failure too
    assert [image for image, _ in source.asked] == images[:6]
    for d in source.pending[2:]:
        d.callback(NEW)
    assert [image for image, _ in source.asked] == images
    source.pending[-1].callback(NEW)
    assert answers[0].result == (0, OLD) and answers[1].result == (0, None)
    assert answers[4].result == (30, NEW) and answers[6].result == (30, NEW)


def test_workers_with_other_aws_sessions_share_no_answer() -> None:
    clock, source = task.Clock(), Source()
    checker = ImageRefresh(clock.seconds, source, interval=600)
    one, other = object(), object()
    for session in (one, other, one, None):
        checker.current(IMAGE, Auth("ssm:/ci/registry", "eu-west-1", session))
    assert [auth.session for _, auth in source.asked] == [one, other, None]
    assert Auth("ssm:/x", "r", one).key() == Auth("ssm:/x", "r", one).key()
    assert Auth("ssm:/x", "r", one).key() != Auth("ssm:/x", "r", other).key()


def test_the_decision_and_its_reason() -> None:
    assert image_refresh.stale(OLD, NEW)
    assert not image_refresh.stale(OLD, OLD)
    assert not image_refresh.stale(OLD, None)  # unknown: no reason to drain
    assert not image_refresh.stale("", NEW) and not image_refresh.stale(None, NEW)
    text = image_refresh.reason(IMAGE, OLD, NEW)
    assert text == (f"refresh_image: runs sha256:aaaaaaaaaaaa…; {IMAGE} now points at "
                    "sha256:bbbbbbbbbbbb…")
    assert retirement.reason_code(text) == "refresh_image"
    assert "refresh_image" in retirement.DRAIN_REASONS
    assert "refresh_image" in metrics_module.FAMILIES["dockerami_retirements_total"].seeds


class Worker(Retiring):
    """The glue's decision (worker/retiring.py) with what it reads of a worker."""

    def __init__(self, checker: ImageRefresh, image: str, digest: str) -> None:
        self.fleet = type("FleetView", (), {"image_refresh": checker})()
        self.settings = WorkerSettings(image=image, registry_credentials="ssm:/ci/registry",
                                       region="eu-west-1")
        self.instance = LaunchedInstance(None, "i-1", "t3.micro", image, "ami-1",  # type: ignore[arg-type]
                                         image_digest=digest)
        self.drained: list[str] = []

    def _retire(self, instance: Any, text: str, insubstantiate: bool = True) -> None:
        instance.retired = text
        self.drained.append(text)


def test_the_glue_drains_only_an_instance_whose_tag_moved() -> None:
    clock, source = task.Clock(), Source()
    checker = ImageRefresh(clock.seconds, source, interval=5)
    busy, unknown, silent, pinned = (Worker(checker, IMAGE, OLD), Worker(checker, "x/y:1", OLD),
                                     Worker(checker, IMAGE, ""),
                                     Worker(checker, "x/y@" + OLD, OLD))
    for worker in (busy, unknown, silent, pinned):
        worker.refresh_image_if_stale()
    # One check per image reference (the silent one and the pinned one ask nothing).
    assert [image for image, _ in source.asked] == [IMAGE, "x/y:1"]
    assert source.asked[0][1] == Auth("ssm:/ci/registry", "eu-west-1")
    source.pending[1].errback(DigestError("x: no answer"))
    source.pending[0].callback(OLD)
    assert busy.drained == unknown.drained == []
    clock.advance(5)
    source.pending.clear()
    busy.refresh_image_if_stale()
    source.pending.pop().callback(NEW)
    assert busy.drained == [image_refresh.reason(IMAGE, OLD, NEW)]
    # Draining already: asked no more.
    busy.refresh_image_if_stale()
    assert len(source.asked) == 3
    assert silent.drained == pinned.drained == unknown.drained == []


def test_a_cached_answer_older_than_an_instances_report_never_drains_it() -> None:
    """The tag moves after a check: an instance that boots and pulls the new image before
    the next check runs the newest image, however the cached (older) answer reads."""
    clock, source = task.Clock(), Source()
    clock.advance(1000)
    checker = ImageRefresh(clock.seconds, source, interval=600)
    old = Worker(checker, IMAGE, "")
    old._note_image_digest(old.instance, {"image_digest": OLD})
    old.refresh_image_if_stale()
    source.pending.pop().callback(OLD)  # cached: OLD, asked at 1000
    clock.advance(10)  # the tag moves to NEW; a fresh instance pulls it, reports at 1060
    clock.advance(50)
    fresh = Worker(checker, IMAGE, "")
    fresh._note_image_digest(fresh.instance, {"image_digest": NEW})
    assert fresh.instance.image_digest_at == 1060
    fresh.refresh_image_if_stale()
    fresh.refresh_image_if_stale()
    assert fresh.drained == [] and checker.calls == 1
    # The next check (asked after its report) says NEW: the fresh one stays, the old drains.
    clock.advance(600)
    for worker in (fresh, old):
        worker.refresh_image_if_stale()
    source.pending.pop().callback(NEW)
    assert fresh.drained == [] and old.drained == [image_refresh.reason(IMAGE, OLD, NEW)]
    # A check in flight when an instance reports is no newer than its report either.
    clock.advance(600)
    late = Worker(checker, IMAGE, "")
    late.refresh_image_if_stale()  # no digest yet: asks nothing
    fresh.refresh_image_if_stale()  # asks at 2260
    late._note_image_digest(late.instance, {"image_digest": OLD})
    late.refresh_image_if_stale()  # shares the check asked before its report
    source.pending.pop().callback(NEW)
    assert late.drained == [] and checker.calls == 3
    assert image_refresh.newer(2.0, 1.0) and not image_refresh.newer(1.0, 1.0)
    assert not image_refresh.newer(None, 0.0)


def test_image_refresh_interval_is_a_fleet_setting_checked_like_the_ami_one() -> None:
    assert "image_refresh_interval: 0 must be a number of seconds >= 5" in fleet_problems(
        FleetWide(image_refresh_interval=0))
    assert "image_refresh_interval: 'x' must be a number of seconds >= 5" in fleet_problems(
        FleetWide(image_refresh_interval="x"))
    assert not fleet_problems(FleetWide(image_refresh_interval=5))
    fleet = Fleet(task.Clock(), "host:/basedir")
    assert fleet.image_refresh.interval == 600
    fleet.configure(FleetWide(image_refresh_interval=30))
    assert fleet.image_refresh.interval == 30
    fleet.configure(None)
    assert fleet.image_refresh.interval == 600
    fleet.reconciler.stop()


def test_remembered_answers_are_shared_while_asked_and_kept_for_the_interval() -> None:
    """fleet/remembered.py, the bound of both refreshes, alone on a fake clock."""
    clock = task.Clock()
    remembered = Remembered(clock.seconds)
    pending: list[defer.Deferred] = []

    def ask() -> defer.Deferred:
        pending.append(defer.Deferred())
        return pending[-1]

    first, second = remembered.get("k", 10, ask), remembered.get("k", 10, ask)
    other = remembered.get("other", 10, ask)
    assert len(pending) == 2 and remembered.calls == 2 and not first.called
    pending[0].callback("a")
    assert first.result == second.result == "a" and not other.called
    clock.advance(9.9)
    assert remembered.get("k", 10, ask).result == "a" and remembered.calls == 2
    # An asker with a shorter interval finds it too old: asked again, then remembered.
    again = remembered.get("k", 5, ask)
    assert remembered.calls == 3 and not again.called
    pending[2].callback("b")
    assert again.result == "b" and remembered.get("k", 10, ask).result == "b"
