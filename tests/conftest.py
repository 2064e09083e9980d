from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from buildbot_dockerami.cloud.ec2 import AsyncEc2
from buildbot_dockerami.cloud.testing import FakeEc2, InlineThreads
from buildbot_dockerami.localcloud import LocalCloud
from tests.harness import Master, unhandled_errors


@pytest.fixture
def fake() -> FakeEc2:
    """The in-memory EC2 (cloud/testing.py), held to moto by the conformance tests."""
    return FakeEc2()


@pytest.fixture
def client(fake: FakeEc2) -> AsyncEc2:
    """An AsyncEc2 over ``fake`` whose calls answer at once (InlineThreads)."""
    return InlineThreads().client(fake)


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[LocalCloud]:
    with LocalCloud(state_dir=tmp_path / "cloud") as local_cloud:
        yield local_cloud


@pytest.fixture(scope="session")
def masters_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("masters")


@pytest.fixture
def make_master(masters_root: Path, cloud: LocalCloud, request: pytest.FixtureRequest):
    started: list[Master] = []

    def make(config: str, start: bool = True) -> Master:
        master = Master(masters_root, f"{request.node.name}-{len(started)}", cloud.env())
        master.write_config(config)
        started.append(master)
        return master.start() if start else master

    yield make
    unclean = [master.basedir.name for master in started if not master.stop()]
    unhandled = [(master.basedir.name, errors) for master in started
                 if (errors := unhandled_errors(master.log()))]
    assert not unclean, f"masters that did not shut down cleanly within 30 s: {unclean}"
    assert not unhandled, f"masters that logged 'Unhandled Error': {unhandled}"


@pytest.fixture(scope="session")
def postgres(masters_root: Path) -> Iterator[Any]:
    """A throwaway PostgreSQL cluster on 127.0.0.1 with buildbot's schema in a template."""
    from tests.harness import BIN
    from tests.services import Postgres

    server = Postgres()
    try:
        server.start()
        server.make_template(BIN / "buildbot")
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def crossbar() -> Iterator[Any]:
    """A Crossbar.io WAMP router on 127.0.0.1 (from .venv-crossbar, see dev/multimaster)."""
    from tests.services import Crossbar

    router = Crossbar()
    try:
        yield router.start()
    finally:
        router.stop()


@pytest.fixture
def make_fleet(make_master, postgres, crossbar):
    """``make_fleet(n, **env)``: n masters running multimaster.cfg.example against one
    fresh PostgreSQL database, the router and the local cloud, as an operator would;
    ``extra`` is Python appended to the example (a test's own builders)."""
    from tests.services import MULTIMASTER_CFG, fleet_env

    def make(count: int, start: bool = True, extra: str = "", **env: str) -> list[Master]:
        db_url = postgres.new_database()
        config = MULTIMASTER_CFG.read_text() + extra
        masters = []
        for _ in range(count):
            master = make_master(config, start=False)
            master.env.update({**fleet_env(db_url, crossbar), **env})
            masters.append(master)
        for master in masters if start else []:
            master.start(timeout=180)
        return masters

    return make


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Debian's chromium driven by Playwright, headless."""
    from tests.helpers import CHROMIUM

    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None or not shutil.which(CHROMIUM):
        why = "playwright or chromium is missing (dev/browser installs chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {why}")
        pytest.skip(f"NO BROWSER: {why}")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"],
        )
        yield browser
        browser.close()


#: Modules whose tests share a costly module-scoped fixture (an installed wheel, one
#: checkconfig of many bad settings, a browser): one worker makes it once.
WHOLE_MODULES = ("tests/test_packaging.py", "tests/test_checkconfig.py",
                 "tests/test_fleet_page.py")


def xdist_group(nodeid: str) -> str | None:
    """The pytest-xdist worker a test must share with others (with --dist loadgroup):
    the Docker engine's tests (one worker builds the image once; no two change the
    engine's images or the host's firewall at once), those that need PostgreSQL and
    Crossbar (one worker starts them once), and WHOLE_MODULES'."""
    if nodeid.startswith("tests/containers/"):
        return "docker"
    if nodeid.startswith("tests/test_multimaster.py") or (
            nodeid.startswith("tests/test_shared.py") and "[postgresql]" in nodeid):
        return "services"
    module = nodeid.split("::", 1)[0]
    return module if module in WHOLE_MODULES else None


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """--dist loadgroup by ``xdist_group`` above, not by xdist_group marks: pytest-xdist
    3.8 puts a mark's group in the test's node id, which pytest 9.2 no longer lets it
    change (pytest-dev/pytest-xdist#1386), and the groups were silently lost."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Grouped(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_group(nodeid) or nodeid

    return Grouped(config, log)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    from tests.docker_support import SKIPPED_FOR_DOCKER
    from tests.services import SKIPPED_FOR_SERVICES

    if SKIPPED_FOR_SERVICES:
        terminalreporter.write_sep(
            "!", "MULTI-MASTER TESTS SKIPPED: " + SKIPPED_FOR_SERVICES[0], red=True, bold=True)

    if SKIPPED_FOR_DOCKER:
        terminalreporter.write_sep(
            "!", "DOCKER TESTS SKIPPED: " + SKIPPED_FOR_DOCKER[0] + " (run dev/engine as root)",
            red=True, bold=True,
        )
