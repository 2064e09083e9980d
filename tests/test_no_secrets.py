"""No secret in any message: after each failure path, the master log, the REST API's
answers, every step log and the Fleet API are searched for the secret (issue 9); and
the AWS credentials a build is given are nowhere but in their file (issue 21)."""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path

import pytest
import requests

from tests.harness import Master, master_cfg, wait_for
from tests.helpers import (
    AWS_STEPS,
    caller_arn,
    instances,
    make_role,
    read_credentials,
    state_of,
    user_data_of,
    wait_step_started,
)

pytestmark = pytest.mark.integration

SECRETS = """
from buildbot.plugins import secrets
c['secretsProviders'] = [secrets.SecretInAFile(dirname={dirname!r})]
"""


def secret_master(make_master, tmp_path: Path, secrets: dict[str, str], **kwargs) -> Master:
    """A master whose config reads ``secrets`` from files, as an operator keeps them."""
    dirname = tmp_path / "secrets"
    dirname.mkdir(mode=0o700)
    for key, value in secrets.items():
        path = dirname / key
        path.write_text(value)
        path.chmod(0o600)
    config = master_cfg(plugins={"dockerami": {}}, **kwargs)
    return make_master(config + SECRETS.format(dirname=str(dirname)))


def everything(master: Master) -> str:
    """All an operator or a visitor could read: log, REST answers, step logs, Fleet API."""
    seen = [master.log(), (master.basedir / "stdout.log").read_text()]
    for path in ("builds", "buildrequests", "workers", "builders", "steps", "logs"):
        response = requests.get(f"{master.api}/{path}", timeout=10)
        seen.append(response.text)
    for build in master.get("builds"):
        for step in master.get(f"builds/{build['buildid']}/steps"):
            seen.append(json.dumps(step))
            for entry in master.get(f"steps/{step['stepid']}/logs"):
                raw = requests.get(f"{master.api}/logs/{entry['logid']}/raw", timeout=10)
                seen.append(raw.text)
    seen.append(requests.get(master.plugin_url("api/fleet"), timeout=10).text)
    return "\n".join(seen)


def first_build_done(master: Master, brid: int) -> dict:
    return wait_for(lambda: next((b for b in master.builds_for(brid) if b["complete"]), None),
                    60, "the first build to end")


def assert_hidden(master: Master, secret: str, *fragments: str) -> None:
    text = everything(master)
    for fragment in fragments:  # the failure is reported ...
        assert fragment in text, f"{fragment!r} not reported"
    for part in {secret, *secret.split()}:  # ... and no part of the secret is
        assert part not in text, f"secret part {part!r} is readable"


def test_secret_password_with_a_space(make_master, cloud, tmp_path):
    secret = "Bad Secret 7a6b"
    master = secret_master(make_master, tmp_path, {"workerpw": secret},
                           worker_extra="password=util.Secret('workerpw'),")
    brid = master.force()
    build = first_build_done(master, brid)
    assert build["results"] != 0
    assert instances(cloud) == []
    assert_hidden(master, secret, "password: the value contains whitespace")
    assert master.stop()


def test_secret_setup_repo_that_git_would_take_as_an_option(make_master, cloud, tmp_path):
    secret = "--upload-pack=touch_x_tok3n9Zq"
    master = secret_master(make_master, tmp_path, {"repo": secret},
                           worker_extra="setup_repo=util.Interpolate('%(secret:repo)s'),")
    brid = master.force()
    first_build_done(master, brid)
    assert instances(cloud) == []
    assert_hidden(master, secret, "rendered setup_repo: must not start with '-'")
    assert master.stop()


def test_secret_password_when_the_launch_is_refused(make_master, cloud, tmp_path):
    secret = "Sup3rSecretWorkerPassw0rd"
    cloud.faults.inject("RunInstances", "InsufficientInstanceCapacity", "No capacity.", count=1)
    master = secret_master(make_master, tmp_path, {"workerpw": secret},
                           worker_extra="password=util.Secret('workerpw'),")
    brid = master.force()
    first_build_done(master, brid)
    assert_hidden(master, secret, "InsufficientInstanceCapacity")
    assert master.stop()


def test_secret_password_when_the_worker_never_connects(make_master, cloud, tmp_path):
    secret = "An0therSecretWorkerPassw0rd"
    cloud.hypervisor.boot_delay = 3600  # running, but the worker never comes
    master = secret_master(make_master, tmp_path, {"workerpw": secret}, missing_timeout=4,
                           worker_extra="password=util.Secret('workerpw'),")
    master.force()
    (instance,) = wait_for(lambda: instances(cloud), 30, "an instance to be launched")
    # The secret did reach the instance (so a leak would have had something to leak).
    assert user_data_of(cloud, instance["InstanceId"]).split("\n")[0].split(" ")[1] == secret
    wait_for(lambda: "never connected; console output:" in master.log(), 30,
             "the console output to be logged")
    wait_for(lambda: state_of(cloud, instance["InstanceId"]) == "terminated", 30,
             "the instance to be terminated")
    assert_hidden(master, secret, "never connected")
    assert master.stop()


def test_build_aws_credentials_are_readable_only_in_their_file(make_master, cloud, tmp_path):
    """A build's role credentials (steps/aws.py): the build reads them from a 0400 file
    the master wrote through the worker connection. They are in no step log (a step
    that prints the file shows the names they are masked with), no REST answer, the
    master's and the worker's logs, the user data, the environment of the build's
    commands; and the file is gone when the build ends."""
    role = make_role(cloud, "ci-secret")
    go = tmp_path / "go"
    config = master_cfg(plugins={"dockerami": {}}) + AWS_STEPS + f"""
c['builders'].append(aws_builder(
    'publish', AwsCredentials(role_arn={role!r}),
    aws_shell('show', 'cat "$AWS_SHARED_CREDENTIALS_FILE"; env > ../env.txt; ' + WHOAMI),
    aws_hold('hold', {str(go)!r})))
c['schedulers'].append(schedulers.ForceScheduler(name='aws', builderNames=['publish']))
"""
    master = make_master(config)
    brid = master.force("publish", "aws")
    hold = wait_step_started(master, brid, "hold")
    shown = master.step_log(hold["buildid"], "show")
    builddir = Path(re.search(r"AWS_SHARED_CREDENTIALS_FILE=(\S+)/\.buildbot-aws/credentials",
                              shown).group(1))
    path = builddir / ".buildbot-aws" / "credentials"
    credentials = read_credentials(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o400
    assert caller_arn(cloud, credentials) == (
        "arn:aws:sts::123456789012:assumed-role/ci-secret/publish-1")
    assert "caller: arn:aws:sts::123456789012:assumed-role/ci-secret/publish-1" in shown
    for name in credentials:  # cat printed them, masked
        assert f"{name} = <{name}>" in shown, shown
    environment = (builddir / "env.txt").read_text()
    assert f"AWS_SHARED_CREDENTIALS_FILE={path}" in environment
    go.touch()
    assert master.wait_request(brid)["results"] == 0
    assert not path.exists()
    (instance,) = instances(cloud)
    elsewhere = "\n".join([environment, user_data_of(cloud, instance["InstanceId"]),
                           (builddir.parent / "twistd.log").read_text()])
    for name, value in credentials.items():
        assert value not in elsewhere, f"{name} in the environment, user data or worker log"
        assert_hidden(master, value)
    assert master.stop()
