"""No secret in any message: after each failure path, the master log, the REST API's
answers, every step log and the Fleet API are searched for the secret (issue 9)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests

from tests.harness import Master, master_cfg, wait_for
from tests.helpers import instances, state_of, user_data_of

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
