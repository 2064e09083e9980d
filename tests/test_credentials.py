"""AWS keys in master.cfg (identifier / secret_identifier), from buildbot's secrets
providers: what checkconfig accepts, and that they reach EC2 and never the log."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
from buildbot.process.properties import Secret

from buildbot_dockerami.cloud.ec2 import Credentials
from buildbot_dockerami.config.credentials import key_problems
from buildbot_dockerami.localcloud import LOCAL_ACCESS_KEY
from tests.harness import SUCCESS, Master, master_cfg

ACCESS_KEY = "AKIDFROMSECRETFILE"
SECRET_KEY = "wJalr-sEcReT-value-from-a-file-7f3a"


def test_both_or_neither_strings_or_renderables() -> None:
    assert key_problems(None, None, None) == []
    assert key_problems("AKID", "secret", None) == []
    assert key_problems(Secret("k"), Secret("s"), None) == []
    (only_one,) = key_problems("AKID", None, None)
    assert only_one.startswith("secret_identifier: give both")
    (other,) = key_problems(None, Secret("s"), None)
    assert other.startswith("identifier: give both")
    (wrong,) = key_problems("AKID", 1234, None)
    assert wrong.startswith("secret_identifier: must be a non-empty string") and "1234" not in wrong
    assert key_problems("", "x", None)[0].startswith("identifier: must be")
    assert key_problems("AKID", "secret", object())[0].endswith("or session=, not both")


def test_the_secret_is_not_in_the_credentials_repr() -> None:
    text = repr(Credentials(ACCESS_KEY, SECRET_KEY))
    assert ACCESS_KEY in text and SECRET_KEY not in text


BAD_KEYS_CFG = """\
from buildbot.plugins import util, worker
c = BuildmasterConfig = {}
c['protocols'] = {'pb': {'port': 9989}}
base = dict(ami_filters=[{'Name': 'name', 'Values': ['x-*']}], instance_type='t3.micro',
            image='org/w:1', master_address='ci.example.com:9989')
c['workers'] = [
    worker.DockerAMILatentWorker('half', identifier='AKIDHALF', **base),
    worker.DockerAMILatentWorker('num', identifier='AKIDNUM', secret_identifier=%d, **base),
    worker.DockerAMILatentWorker('ok', identifier=util.Secret('k'),
                                 secret_identifier=util.Secret('s'), **base),
]
c['builders'] = [util.BuilderConfig(name='b', workernames=[w.name for w in c['workers']],
                 factory=util.BuildFactory())]
"""


@pytest.mark.integration
def test_checkconfig_names_the_worker_and_setting_never_the_value(masters_root: Path) -> None:
    master = Master(masters_root, "bad-keys", {"AWS_DEFAULT_REGION": "us-east-1"})
    master.write_config(BAD_KEYS_CFG % 918273645)
    result = master.checkconfig()
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "DockerAMILatentWorker 'half': secret_identifier: give both" in output
    assert "DockerAMILatentWorker 'num': secret_identifier: must be a non-empty string" in output
    assert "'ok'" not in output  # util.Secret is accepted
    assert "918273645" not in output


@pytest.fixture
def secrets_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "secrets"
    directory.mkdir(mode=0o700)
    for name, value in (("aws_key", ACCESS_KEY), ("aws_secret", SECRET_KEY)):
        (directory / name).write_text(value + "\n")
        (directory / name).chmod(0o600)  # SecretInAFile refuses files others can read
    return directory


@pytest.mark.integration
def test_keys_from_a_secrets_provider_reach_ec2_and_never_the_log(
        make_master, cloud, secrets_dir):
    config = master_cfg(worker_extra="identifier=util.Secret('aws_key'), "
                                     "secret_identifier=util.Secret('aws_secret'),")
    config += ("from buildbot.plugins import secrets\n"
               f"c['secretsProviders'] = [secrets.SecretInAFile(dirname={str(secrets_dir)!r})]\n")
    master = make_master(config, start=False)
    # No keys in the environment: the launch can only have used the secret files.
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        master.env.pop(var, None)
    master.start()
    build = master.wait_request(master.force(), 90)
    assert build["results"] == SUCCESS, master.log()[-3000:]
    assert cloud.faults.count("RunInstances", ACCESS_KEY) == 1
    assert cloud.faults.count("RunInstances", LOCAL_ACCESS_KEY) == 0
    workers = requests.get(f"{master.api}/workers", timeout=10).text
    assert master.stop(), "the master had to be killed"
    for text in (master.log(), (master.basedir / "stdout.log").read_text(), workers):
        assert SECRET_KEY not in text
