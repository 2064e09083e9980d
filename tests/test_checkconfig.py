"""`buildbot checkconfig` on the shipped example and on bad input, as an operator runs it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.harness import REPO, Master

pytestmark = pytest.mark.integration

BAD_WORKERS = {
    # worker name: (keyword arguments, expected fragment of the error)
    "shell": ("image='org/worker;rm -rf /'", "'image: ", "shell-active characters"),
    "subst": ("image='org/worker:$(id)'", "'image: ", "shell-active"),
    "upper": ("image='Org/Worker:1'", "'image: ", "not a valid Docker image reference"),
    "spacepw": ("image='org/w:1', password='two words'", "'password: ", "whitespace"),
    "badami": ("image='org/w:1', ami='ami-xyz', ami_filters=None", "'ami: ", "is not an AMI id"),
    "bothami": ("image='org/w:1', ami='ami-0123456789abcdef0'", "'ami: ", "exactly one of"),
    "noimage": ("", "'image: ", "is required"),
    "awstag": ("image='org/w:1', tags={'aws:x': '1'}", "'tags: ", "reserved by AWS"),
    "nametag": ("image='org/w:1', tags={'Name': 'x'}", "'tags: ", "set by the plugin"),
    "badmaster": ("image='org/w:1', master_address='nohost'", "'master_address: ", "host:port"),
    "bigdata": ("image='org/w:1', setup_repo='https://x/' + 'a' * 17000",
                "'user data: ", "EC2 allows at most 16384"),
    "newline": ("image='org/w:1', setup_repo='https://x/\\nrm'", "'setup_repo: ", "whitespace"),
    "badtype": ("image='org/w:1', instance_type='large'", "'instance_type: ", "instance type"),
    "isol": ("image='org/w:1', isolation='vm'", "'isolation: ", "is not one of"),
    "grp": ("image='org/w:1', instance_group='g'", "'instance_group: ", "only with"),
    "imds": ("image='org/w:1', metadata_options={'HttpTokens': 'maybe'}", "'metadata_options: ",
             "HttpTokens"),
}

BAD_CFG = """\
from buildbot.plugins import util, worker
c = BuildmasterConfig = {{}}
c['protocols'] = {{'pb': {{'port': 9989}}}}
base = dict(ami_filters=[{{'Name': 'name', 'Values': ['x-*']}}], instance_type='t3.micro')
c['workers'] = [
{workers}
]
c['builders'] = [util.BuilderConfig(name='b', workernames=[w.name for w in c['workers']],
                 factory=util.BuildFactory())]
"""


@pytest.fixture(scope="module")
def checkconfig_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return {"AWS_DEFAULT_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "x",
            "AWS_SECRET_ACCESS_KEY": "x", "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}


def _master(root: Path, name: str, env: dict[str, str]) -> Master:
    return Master(root, name, env)


def test_example_config_passes(masters_root: Path, checkconfig_env: dict[str, str]) -> None:
    master = _master(masters_root, "example", checkconfig_env)
    shutil.copy(REPO / "master.cfg.example", master.basedir / "master.cfg")
    result = master.checkconfig()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Config file is good" in result.stdout


@pytest.fixture(scope="module")
def bad_output(masters_root: Path, checkconfig_env: dict[str, str]) -> str:
    master = _master(masters_root, "bad", checkconfig_env)
    workers = "\n".join(
        f"    worker.DockerAMILatentWorker({name!r}, **{{**base, **dict({kwargs})}}),"
        for name, (kwargs, _, _) in BAD_WORKERS.items()
    )
    master.write_config(BAD_CFG.format(workers=workers))
    result = master.checkconfig()
    assert result.returncode != 0
    return result.stdout + result.stderr


@pytest.mark.parametrize("name", sorted(BAD_WORKERS))
def test_bad_setting_is_named_with_worker_and_setting(bad_output: str, name: str) -> None:
    _, setting, message = BAD_WORKERS[name]
    lines = [line for line in bad_output.splitlines()
             if f"DockerAMILatentWorker {name!r}: {setting.strip(chr(39))}" in line]
    assert lines, f"no error naming worker {name!r} and {setting}:\n{bad_output}"
    assert any(message in line for line in lines), lines


def test_missing_region_is_a_config_error(masters_root: Path) -> None:
    master = _master(masters_root, "noregion", {"AWS_CONFIG_FILE": "/nonexistent"})
    for var in ("AWS_DEFAULT_REGION", "AWS_REGION"):
        master.env.pop(var, None)
    master.write_config(BAD_CFG.format(
        workers="    worker.DockerAMILatentWorker('r', image='org/w:1', **base),"))
    result = master.checkconfig()
    assert result.returncode != 0
    assert "DockerAMILatentWorker 'r': region: no AWS region" in result.stdout + result.stderr


def test_example_pool_passes_when_enabled(masters_root: Path,
                                          checkconfig_env: dict[str, str]) -> None:
    master = _master(masters_root, "example-pool", checkconfig_env)
    text = (REPO / "master.cfg.example").read_text()
    enabled = text.replace("# from buildbot_dockerami import worker_pool",
                           "from buildbot_dockerami import worker_pool")
    enabled = enabled.replace("# c['workers'] += worker_pool(", "c['workers'] += worker_pool(")
    assert enabled.count("worker_pool") == 2 and "# c['workers'] +=" not in enabled
    master.write_config(enabled)
    result = master.checkconfig()
    assert result.returncode == 0, result.stdout + result.stderr


def test_pool_with_slots_but_without_container_isolation_is_refused(
        masters_root: Path, checkconfig_env: dict[str, str]) -> None:
    master = _master(masters_root, "bad-pool", checkconfig_env)
    master.write_config(BAD_CFG.format(workers="    *__import__('buildbot_dockerami')"
                                       ".worker_pool('p', slots=2, isolation='instance',"
                                       " image='org/w:1', **base),"))
    result = master.checkconfig()
    assert result.returncode != 0
    assert "worker_pool 'p': slots: several slots need isolation='container'" in (
        result.stdout + result.stderr)
