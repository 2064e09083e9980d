"""The newcomer's path, as the README gives it: `./dev/demo --once` starts the local
cloud and a master from master.cfg.example, forces a build and exits with its status.
Run here on free ports and in a directory of the test's own, with the suite's .venv."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from tests.harness import REPO, free_port

pytestmark = pytest.mark.integration


def test_the_demo_builds_once_and_stops_everything(tmp_path: Path) -> None:
    demo, cloud_port = tmp_path / "demo", free_port()
    env = {**os.environ, "DEMO_DIR": str(demo), "DEMO_SKIP_INSTALL": "1",
           "CLOUD_PORT": str(cloud_port), "BUILDBOT_PB_PORT": str(free_port()),
           "BUILDBOT_WWW_PORT": str(free_port())}
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "AWS_PROFILE", "AWS_DEFAULT_REGION"):
        env.pop(name, None)  # the demo's cloud gives its own
    done = subprocess.run([str(REPO / "dev" / "demo"), "--once"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "build 1 on worker" in output and ": SUCCESS after" in output, output[-4000:]
    assert "step hello printed: building as" in output
    # Its trap stopped the master and the local cloud.
    assert not (demo / "master" / "twistd.pid").exists(), "the demo's master still runs"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", cloud_port), timeout=2).close()
