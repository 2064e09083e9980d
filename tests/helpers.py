"""What many tests ask of the local cloud (instances as EC2's API lists them, the most
running at once) and of a master's pools: one copy each, for every test module."""

from __future__ import annotations

import base64
import configparser
import contextlib
import json
import os
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests
from twisted.internet import defer

from buildbot_dockerami.localcloud import LocalCloud
from tests.harness import REPO, Master, master_cfg, wait_for

#: Debian's chromium, which Playwright drives (no browser download): dev/browser.
CHROMIUM = os.environ.get("DOCKERAMI_CHROMIUM", "/usr/bin/chromium")
#: Where browser tests leave their screenshots.
ARTIFACTS = REPO / "test-artifacts"
VIEWPORT = {"width": 1280, "height": 800}

#: Instances that are booting or up: what a cap counts.
RUNNING = ("pending", "running")
#: Instances not (being) terminated: what a master must not leave behind.
NOT_ENDED = ("pending", "running", "stopping", "stopped")


def instances(cloud: LocalCloud, **filters: str) -> list[dict]:
    """Every instance, as DescribeInstances lists it; ``filters`` are EC2's
    (e.g. **{"tag:buildbot:master": tag})."""
    ec2 = cloud.client()
    flt = [{"Name": k, "Values": [v]} for k, v in filters.items()]
    pages = ec2.get_paginator("describe_instances").paginate(Filters=flt)
    return [i for page in pages for r in page["Reservations"] for i in r["Instances"]]


def held_until(path: Path) -> str:
    """A build command that says "started", then runs until the test creates ``path``."""
    return f"echo started; while [ ! -e {path} ]; do sleep 0.2; done"


def state_of(cloud: LocalCloud, instance_id: str) -> str:
    return instances(cloud, **{"instance-id": instance_id})[0]["State"]["Name"]


def user_data_of(cloud: LocalCloud, instance_id: str) -> str:
    value = cloud.client().describe_instance_attribute(
        InstanceId=instance_id, Attribute="userData")["UserData"]["Value"]
    return base64.b64decode(value).decode()


def live(cloud: LocalCloud, states: tuple[str, ...] = RUNNING, **filters: str) -> list[dict]:
    """The instances in ``states`` (booting or up, by default)."""
    return [i for i in instances(cloud, **filters) if i["State"]["Name"] in states]


def ids(found: list[dict]) -> list[str]:
    return [i["InstanceId"] for i in found]


@contextlib.contextmanager
def peak_of_live(cloud: LocalCloud, interval: float = 0.05) -> Iterator[list[int]]:
    """The most instances pending or running at once while the block runs (peak[0]),
    sampled every ``interval`` seconds."""
    peak, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], len(live(cloud)))
            stop.wait(interval)  # sampling: the block's own waits are what end it

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        stop.set()
        sampler.join()


def pool_master(make_master: Callable[..., Master], count: int, **kwargs: Any) -> Master:
    """A master with ``worker_pool('pool', count=count)``, whose controls anyone may use."""
    return make_master(master_cfg(pool=f"'pool', count={count}",
                                  plugins={"dockerami": {"anonymous_control": True}}, **kwargs))


def set_pool(master: Master, **body: Any) -> requests.Response:
    return master.control(action="set_pool", pool="pool", **body)


def pools(master: Master) -> dict:
    return master.fleet()["pools"]


# -- AWS credentials for builds (steps.aws.AwsCredentials) -----------------------------

#: Appended to a master_cfg: ``aws_shell`` steps talk to the local cloud's STS with only
#: what the build was handed (no key of the worker's own environment), ``aws_hold``
#: holds a build until a file exists, ``WHOAMI`` prints the build's AWS identity.
AWS_STEPS = """
import sys
from buildbot_dockerami import AwsCredentials
AWS_ENV = {'AWS_ENDPOINT_URL': os.environ['AWS_ENDPOINT_URL'], 'AWS_DEFAULT_REGION': 'us-east-1',
           'AWS_ACCESS_KEY_ID': None, 'AWS_SECRET_ACCESS_KEY': None, 'AWS_SESSION_TOKEN': None,
           'AWS_PROFILE': None}
WHOAMI = ('%s -c "import boto3; print(\\'caller:\\', '
          'boto3.client(\\'sts\\').get_caller_identity()[\\'Arn\\'])"' % sys.executable)
def aws_shell(name, command):
    return steps.ShellCommand(name=name, command=['sh', '-c', command], env=AWS_ENV)
def aws_hold(name, path):
    return aws_shell(name, 'while [ ! -e %s ]; do sleep 0.05; done' % path)
def aws_builder(name, *build_steps, **kwargs):
    return util.BuilderConfig(name=name, workernames=[w.name for w in c['workers']],
                              factory=util.BuildFactory(list(build_steps)), **kwargs)
"""


def aws_client(cloud: LocalCloud, service: str, key: str = "AKIDINSPECTOR",
               secret: str = "local", token: str | None = None) -> Any:
    return boto3.client(service, region_name=cloud.region, endpoint_url=cloud.endpoint_url,
                        aws_access_key_id=key, aws_secret_access_key=secret,
                        aws_session_token=token)


def make_role(cloud: LocalCloud, name: str) -> str:
    """An IAM role in the local cloud that the master may assume; returns its ARN."""
    trust = {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": {"AWS": "*"},
        "Action": ["sts:AssumeRole", "sts:TagSession"]}]}
    return aws_client(cloud, "iam").create_role(
        RoleName=name, AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]


def read_credentials(path: os.PathLike | str) -> dict[str, str]:
    """The default profile of a shared credentials file, as the SDKs read it."""
    parser = configparser.ConfigParser()
    parser.read(path)
    return dict(parser["default"])


def caller_arn(cloud: LocalCloud, credentials: dict[str, str]) -> str:
    """Who STS says these credentials are: arn:aws:sts::<account>:assumed-role/<role>/<session>."""
    return aws_client(cloud, "sts", credentials["aws_access_key_id"],
                      credentials["aws_secret_access_key"],
                      credentials["aws_session_token"]).get_caller_identity()["Arn"]


def step_of(master: Master, brid: int, name: str) -> dict | None:
    """The step ``name`` of the request's build, once it exists."""
    builds = master.builds_for(brid)
    if not builds:
        return None
    return next((s for s in master.get(f"builds/{builds[-1]['buildid']}/steps")
                 if s["name"] == name), None)


def wait_step_started(master: Master, brid: int, name: str, timeout: float = 60) -> dict:
    return wait_for(lambda: (s := step_of(master, brid, name)) and s["started_at"] and s,
                    timeout, f"step {name} to start")


def run(d: defer.Deferred) -> Any:
    """The result of a Deferred that has already fired (FakeEc2 through InlineThreads,
    a task.Clock advanced): its value, or its failure raised."""
    results: list[Any] = []
    d.addBoth(results.append)
    (result,) = results
    if hasattr(result, "raiseException"):
        result.raiseException()
    return result


@contextlib.contextmanager
def tmpfs(point: Path, size: str = "16m") -> Iterator[Path]:
    """A small tmpfs mounted at ``point`` (made here) for a test's disk-space checks;
    the test is skipped where mounting needs root and this is not."""
    point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], check=False)


# -- git repositories for the MirroredGit step (steps/mirror.py) -------------------------

#: Appended to a master_cfg: a builder 'app' (scheduler 'app') cloning ``repourl`` (Python
#: source) through ``mirrors``, then saying what its clone borrows from and what it
#: checked out.
MIRRORED_BUILDER = """
from buildbot_dockerami import MirroredGit
c['builders'].append(util.BuilderConfig(
    name='app', workernames=[w.name for w in c['workers']],
    factory=util.BuildFactory([
        MirroredGit(repourl={repourl}, mirrors={mirrors!r}, mode='full', method='clobber'),
        steps.ShellCommand(name='show', command=['sh', '-c',
            'echo "alternates=$(cat .git/objects/info/alternates 2>/dev/null)"; '
            'echo "head=$(git rev-parse HEAD) $(cat file.txt)"']),
    ])))
c['schedulers'].append(schedulers.ForceScheduler(name='app', builderNames=['app']))
"""

_GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]


def git_origin(root: Path) -> tuple[Path, Path]:
    """A bare origin (``root``/origin.git) with one commit on main ("one"), and a clone
    to push more from."""
    origin, work = root / "origin.git", root / "work"
    subprocess.run([*_GIT, "init", "-q", "--bare", "-b", "main", str(origin)], check=True)
    subprocess.run([*_GIT, "clone", "-q", str(origin), str(work)], check=True,
                   capture_output=True)
    git_commit(work, "one")
    return origin, work


def git_commit(work: Path, subject: str) -> str:
    """Commit ``subject`` as file.txt's content, push it to main; its hash."""
    git = [*_GIT, "-C", str(work)]
    (work / "file.txt").write_text(subject + "\n")
    subprocess.run([*git, "add", "file.txt"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", subject], check=True)
    subprocess.run([*git, "push", "-q", "origin", "HEAD:main"], check=True, capture_output=True)
    return subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()


def mirrored_build(master: Master, timeout: float) -> tuple[dict, str, str]:
    """Force a build of MIRRORED_BUILDER's 'app': the build, its git step's log and its
    show step's."""
    build = master.wait_request(master.force("app", "app"), timeout)
    return (build, master.step_log(build["buildid"], "git"),
            master.step_log(build["buildid"], "show"))


@contextlib.contextmanager
def git_daemon(base: Path) -> Iterator[str]:
    """``git daemon`` serving the repositories under ``base`` on 127.0.0.1 (read-only);
    yields its git:// URL prefix once it serves ``base``/origin.git."""
    from tests.harness import free_port

    port = free_port()
    daemon = subprocess.Popen(
        ["git", "daemon", "--reuseaddr", f"--base-path={base}", "--export-all",
         "--listen=127.0.0.1", f"--port={port}", str(base)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"git://127.0.0.1:{port}"
    try:
        def answers() -> bool:
            assert daemon.poll() is None, "git daemon exited"
            return subprocess.run(["git", "ls-remote", f"{url}/origin.git"],
                                  capture_output=True, check=False).returncode == 0
        wait_for(answers, 30, "git daemon to answer")
        yield url
    finally:
        daemon.terminate()
        try:
            daemon.wait(timeout=10)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
