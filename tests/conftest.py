from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from buildbot_dockerami.localcloud import LocalCloud
from tests.harness import Master, unhandled_errors


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


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    from tests.docker_support import SKIPPED_FOR_DOCKER

    if SKIPPED_FOR_DOCKER:
        terminalreporter.write_sep(
            "!", "DOCKER TESTS SKIPPED: " + SKIPPED_FOR_DOCKER[0] + " (run dev/engine as root)",
            red=True, bold=True,
        )
