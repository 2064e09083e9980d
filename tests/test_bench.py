"""The benches' master.cfg files load with the env each bench gives its masters.

A bench that borrows another's config must also set every variable that config reads;
a missing one (KeyError at load) only showed after minutes of set-up otherwise.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from bench import burst, coldstart
from buildbot_dockerami.localcloud import LocalCloud
from tests.harness import REPO, Master

#: name -> (the bench's master.cfg, the env the bench starts that master with)
CONFIGS: dict[str, tuple[Callable[[], str], Callable[[dict[str, str], str], dict[str, str]]]] = {
    **{f"burst-{kind}": (lambda kind=kind: burst.master_config(kind, 1.0),
                         lambda cloud_env, ami: burst.master_env(cloud_env, ami, 1))
       for kind in burst.WORKERS},
    **{f"coldstart-{kind}": (lambda kind=kind: coldstart.config(kind), coldstart.master_env)
       for kind in ("dockerami", "pool", "ec2")},
}


@pytest.mark.integration
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_bench_config_loads_with_the_bench_env(name: str, cloud: LocalCloud, masters_root: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    config, master_env = CONFIGS[name]
    master = Master(masters_root, f"bench-{name}", master_env(cloud.env(), cloud.base_ami_id))
    master.write_config(config())
    monkeypatch.chdir(master.basedir)  # burst's probe writes probe.txt where it runs
    result = master.checkconfig()
    assert result.returncode == 0, result.stdout + result.stderr


def test_force_helper_prints_its_usage() -> None:
    shown = subprocess.run([sys.executable, "-m", "bench.force", "--help"], cwd=REPO,
                           capture_output=True, text=True, timeout=60, check=False)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("usage: python -m bench.force"), shown.stdout
