"""MirroredGit (steps/mirror.py) on a real Docker engine with the real bootstrap and
reference image: with the mirrors in a cache, a builder's second build, in a fresh
container, finds the mirror its first build made, updates it (no second clone) and
clones borrowing from it. The origin is served by ``git daemon`` on 127.0.0.1, which
the containers reach (host networking)."""

from __future__ import annotations

import pytest

from buildbot_dockerami.steps import mirror
from tests.docker_support import facts
from tests.harness import SUCCESS, master_cfg
from tests.helpers import MIRRORED_BUILDER, git_commit, git_daemon, git_origin, mirrored_build

pytestmark = pytest.mark.integration

MIRRORS = "/home/builder/git-mirrors"
#: The default factory's step, so that docker_support.facts() finds the container.
PROBE = ("echo container=$(grep -o 'containers/[0-9a-f]*' /proc/self/mountinfo | head -n 1 "
         "| cut -d/ -f2) instance=$DOCKERAMI_INSTANCE_ID")
ALSO_PROBE = """
c['builders'][-1].factory.addStep(steps.ShellCommand(name='run', command=['sh', '-c', {probe!r}]))
"""


def test_a_second_build_in_a_fresh_container_updates_and_borrows_the_first_ones_mirror(
        make_master, cloud, worker_image, tmp_path):
    _, work = git_origin(tmp_path)
    with git_daemon(tmp_path) as base_url:
        url = f"{base_url}/origin.git"
        target = f"{MIRRORS}/{mirror.mirror_name(url)}"
        master = make_master(
            master_cfg(image=worker_image, build_wait_timeout=60,
                       worker_extra=f"isolation='container', caches={{'git': {MIRRORS!r}}},")
            + MIRRORED_BUILDER.format(repourl=repr(url), mirrors=MIRRORS)
            + ALSO_PROBE.format(probe=PROBE))

        first, git_log, show = mirrored_build(master, 240)
        assert first["results"] == SUCCESS, git_log + show
        assert f"mirror: creating {target} (first clone)" in git_log, git_log
        assert f"alternates={target}/objects\n" in show, show

        second_commit = git_commit(work, "two")
        second, git_log, show = mirrored_build(master, 240)
        assert second["results"] == SUCCESS, git_log + show
        assert f"mirror: updating {target}" in git_log, git_log
        assert f"mirror: creating {target}" not in git_log, git_log
        assert f"--reference {target}" in git_log, git_log
        assert f"alternates={target}/objects\n" in show, show
        assert f"head={second_commit} two\n" in show, show
        containers = {facts(master, build)["container"] for build in (first, second)}
        assert len(containers) == 2  # each build in a fresh container
