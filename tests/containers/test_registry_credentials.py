"""Private registries on a real Docker engine, with the real bootstrap: a loopback
docker-registry that wants HTTP basic auth (htpasswd), credentials named by
``registry_credentials`` in the local cloud's SSM Parameter Store or Secrets Manager
(moto on 127.0.0.1) and read at boot with the instance role from the instance's
metadata service, and the ECR path as far as it goes without ECR: the bootstrap's
Docker config names the ECR host in ``credHelpers``, the real docker CLI calls
``docker-credential-ecr-login`` (a stand-in that records its call) and sends its token
with the pull, which a stand-in daemon records and refuses.

A test that checks the secret never shows searches, for the password: the console, the
user data, every command line the bootstrap gave docker, ``docker inspect`` of the
container, every file left in the instance's state directory, and the master's log.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import secrets
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import docker
import pytest
from docker.errors import ImageNotFound

from buildbot_dockerami.fleet.launch import Slot, slot_user_data
from buildbot_dockerami.localcloud import LocalCloud
from buildbot_dockerami.localcloud.containers import (
    ROLE_CREDENTIALS_PATH,
    ContainerRuntime,
    QuietHandler,
)
from tests.docker_support import BASE_IMAGE, Registry, container_names, remove_repository
from tests.harness import BIN, RETRY, SUCCESS, master_cfg, wait_for

pytestmark = pytest.mark.integration

USER = "ci-" + secrets.token_hex(4)
PASSWORD = "pw-" + secrets.token_urlsafe(18)
ECR_HOST = "123456789012.dkr.ecr.eu-west-1.amazonaws.com"
ECR_IMAGE = f"{ECR_HOST}/ci/linux:2026-12-01"
ECR_TOKEN = "ecr-token-" + secrets.token_hex(8)


@pytest.fixture(scope="module")
def private_registry(engine: docker.DockerClient,
                     tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    registry = Registry(tmp_path_factory.mktemp("private-registry"), {USER: PASSWORD}).start()
    yield registry
    remove_repository(engine, f"{registry.address}/")
    registry.stop()


def push(engine: docker.DockerClient, image: Any, repository: str, tag: str) -> str:
    """``image`` pushed to the private registry as repository:tag, then removed from the
    engine so that a boot really pulls it."""
    image.tag(repository, tag)
    output = engine.images.push(repository, tag=tag,
                                auth_config={"username": USER, "password": PASSWORD})
    assert '"error"' not in output, output
    engine.images.remove(f"{repository}:{tag}")
    return f"{repository}:{tag}"


@pytest.fixture(scope="module")
def pushed_image(engine: docker.DockerClient, private_registry: Registry) -> str:
    """A small image from the local base: it runs until it is removed."""
    dockerfile = f'FROM {BASE_IMAGE}\nCMD ["sleep", "3600"]\n'
    image, _ = engine.images.build(fileobj=io.BytesIO(dockerfile.encode()), pull=False,
                                   rm=True, tag="dockerami/private-test:build")
    try:
        return push(engine, image, f"{private_registry.address}/dockerami/private", "1")
    finally:
        engine.images.remove("dockerami/private-test:build")


@pytest.fixture
def private_image(engine: docker.DockerClient, pushed_image: str) -> str:
    """The small image, in the private registry only (an earlier test pulled it)."""
    with contextlib.suppress(ImageNotFound):
        engine.images.remove(pushed_image, force=True)
    return pushed_image


@pytest.fixture
def tools(tmp_path: Path) -> Path:
    """First on the boot process's PATH; also holds the docker wrapper's record."""
    directory = tmp_path / "tools"
    directory.mkdir()
    return directory


@pytest.fixture
def runtime(tools: Path):
    """The container runtime with a docker wrapper that records every command line the
    bootstrap runs (and sends a pull to a stand-in daemon when ``pull-daemon`` names
    one), and the aws CLI of this environment on the PATH."""
    wrapper = tools / "docker-recorded"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'printf "%s\\n" "$*" >> {tools}/docker-commands\n'
        f'if [ "$1" = pull ] && [ -f {tools}/pull-daemon ]; then\n'
        f'    exec docker -H "$(cat {tools}/pull-daemon)" "$@"\n'
        "fi\n"
        'exec docker "$@"\n')
    wrapper.chmod(0o755)
    path = f"{tools}:{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    return lambda directory: ContainerRuntime(
        directory, docker=str(wrapper), pull_attempts=3, pull_max_delay=1,
        env={"PATH": path})


def aws(cloud: LocalCloud, service: str):
    return boto3.client(service, endpoint_url=cloud.endpoint_url, region_name=cloud.region,
                        aws_access_key_id="AKIDTESTSETUP", aws_secret_access_key="x")


def store(cloud: LocalCloud, where: str, value: str) -> str:
    """The registry_credentials value naming ``value``, kept in the local cloud's SSM
    (a SecureString, by name) or Secrets Manager (by ARN: its region comes from it)."""
    if where == "ssm":
        aws(cloud, "ssm").put_parameter(Name="/ci/registry", Value=value, Type="SecureString")
        return "ssm:/ci/registry"
    arn = aws(cloud, "secretsmanager").create_secret(Name="ci/registry", SecretString=value)
    return f"secretsmanager:{arn['ARN']}"


def instance_profile(cloud: LocalCloud) -> str:
    """The master's worker_extra for an instance profile that exists in the local cloud
    (EC2 refuses a launch with an unknown one)."""
    aws(cloud, "iam").create_instance_profile(InstanceProfileName="ci-role")
    return "instance_profile='ci-role',"


def boot(cloud: LocalCloud, image: str, registry_credentials: str | None = None) -> str:
    """One instance of the local cloud with the user data the master would write."""
    user_data = slot_user_data([Slot("w", "worker-pw")], "127.0.0.1:9", {
        "image": image, "setup_repo": None, "setup_branch": None}, isolated=False,
        tls_fingerprint=None, registry_credentials=registry_credentials)
    reservation = cloud.client().run_instances(
        ImageId=cloud.base_ami_id, MinCount=1, MaxCount=1, InstanceType="t3.micro",
        UserData=user_data)
    return reservation["Instances"][0]["InstanceId"]


def console(cloud: LocalCloud, instance_id: str) -> str:
    return cloud.runtime.console(instance_id) or ""


def fatal_line(text: str) -> str:
    (line,) = [line for line in text.splitlines() if "FATAL" in line]
    return line


def user_data_of(cloud: LocalCloud, instance_id: str) -> str:
    value = cloud.client().describe_instance_attribute(
        InstanceId=instance_id, Attribute="userData")["UserData"]["Value"]
    return base64.b64decode(value).decode()


def left_in(directory: Path) -> str:
    """Every file under ``directory``, concatenated."""
    return "".join(p.read_text(errors="replace") for p in directory.rglob("*") if p.is_file())


@pytest.mark.parametrize("where", ["ssm", "secretsmanager"])
def test_credentials_fetched_with_the_instance_role_pull_the_image_and_stay_secret(
        cloud, engine, private_image, tools, where):
    source = store(cloud, where, json.dumps({"username": USER, "password": PASSWORD}))
    instance_id = boot(cloud, private_image, source)
    container = f"dockerami-{instance_id}"
    wait_for(lambda: f"starting {private_image} as {container}" in console(cloud, instance_id),
             90, "the bootstrap to pull and start the image")
    wait_for(lambda: container_names(engine, container) and
             engine.containers.get(container).status == "running", 30, "the container to run")
    text = console(cloud, instance_id)
    registry = private_image.split("/")[0]
    assert f"logged in to {registry} with the credentials from {source}" in text
    assert f"pulled {private_image} in" in text
    assert "FATAL" not in text and "retrying" not in text
    # The aws CLI read them with the instance role, from the metadata service.
    assert any(ROLE_CREDENTIALS_PATH in path and token
               for _, path, token in cloud.runtime.metadata_requests(instance_id))
    # Only the name travels in the user data.
    assert f"registry.credentials={source}" in user_data_of(cloud, instance_id)
    found_in = {
        "console": text,
        "user data": user_data_of(cloud, instance_id),
        "docker command lines": (tools / "docker-commands").read_text(),
        "docker inspect": json.dumps(engine.containers.get(container).attrs),
        "instance state directory": left_in(cloud.runtime.state_dir / instance_id),
    }
    assert [name for name, seen in found_in.items() if PASSWORD in seen] == []
    # No Docker config with the login is left for later (it served the pull only).
    assert not (cloud.runtime.state_dir / instance_id / "run" / "docker").exists()


def test_a_pull_without_credentials_fails_at_once_and_the_master_says_why(
        make_master, cloud, private_image):
    master = make_master(master_cfg(image=private_image, missing_timeout=600,
                                    plugins={"dockerami": {}}))
    brid = master.force()
    wait_for(lambda: "latent worker crashed before connecting" in master.log(), 60,
             "the substantiation to fail")
    failure = next(line for line in master.log().splitlines()
                   if "latent worker crashed before connecting" in line)
    assert (f"FATAL: registry authentication failed for image {private_image}: "
            in failure), failure
    assert "no basic auth credentials" in failure
    assert "set the worker's registry_credentials" in failure
    # The Fleet page shows the same reason as the worker's last failure.
    (row,) = master.fleet()["workers"]
    assert f"FATAL: registry authentication failed for image {private_image}" in (
        row["last_failure"])
    (instance_id,) = [i["InstanceId"] for r in cloud.client().describe_instances()[
        "Reservations"] for i in r["Instances"]]
    text = console(cloud, instance_id)
    assert text.count(f"pulling {private_image}") == 1 and "retrying" not in text
    assert cloud.runtime.poweroff_requested(instance_id)
    wait_for(lambda: RETRY in [b["results"] for b in master.builds_for(brid)], 30,
             "the build to end as RETRY (its request stays queued)")


def test_refused_credentials_fail_in_one_line_and_the_password_is_nowhere(
        make_master, cloud, private_image):
    wrong = "not-" + PASSWORD
    source = store(cloud, "ssm", json.dumps({"username": USER, "password": wrong}))
    master = make_master(master_cfg(
        image=private_image, missing_timeout=600,
        worker_extra=f"registry_credentials={source!r}, {instance_profile(cloud)}"))
    master.force()
    wait_for(lambda: "latent worker crashed before connecting" in master.log(), 60,
             "the substantiation to fail")
    failure = next(line for line in master.log().splitlines()
                   if "latent worker crashed before connecting" in line)
    registry = private_image.split("/")[0]
    assert f"FATAL: registry {registry} refused the credentials from {source}: " in failure
    ((instance_id, user_data),) = [
        (i["InstanceId"], user_data_of(cloud, i["InstanceId"]))
        for r in cloud.client().describe_instances()["Reservations"] for i in r["Instances"]]
    assert user_data.endswith(f"\nregistry.credentials={source}")
    text = console(cloud, instance_id)
    for where in (master.log(), text, user_data, left_in(cloud.runtime.state_dir)):
        assert wrong not in where


@pytest.mark.parametrize(("stored", "expected"), [
    (None, "cannot read registry credentials from ssm:/ci/registry (with the instance "
           "role): An error occurred (ParameterNotFound)"),
    ("user:password", "ssm:/ci/registry is not JSON {\"username\": ..., \"password\": ...}"),
    (json.dumps({"username": USER}), "ssm:/ci/registry has no \"password\""),
], ids=["missing", "not-json", "no-password"])  # ids fixed: xdist workers must agree
def test_unusable_credentials_fail_at_once_with_the_reason(
        cloud, private_image, stored, expected):
    if stored is not None:
        store(cloud, "ssm", stored)
    instance_id = boot(cloud, private_image, "ssm:/ci/registry")
    wait_for(lambda: cloud.runtime.poweroff_requested(instance_id), 60, "the power-off")
    text = console(cloud, instance_id)
    assert expected in fatal_line(text)
    assert "retrying" not in text and "pulling" not in text
    assert stored is None or stored not in text


@pytest.fixture
def stand_in_pull_daemon(tools: Path) -> Iterator[list[dict]]:
    """A Docker API on 127.0.0.1 for the pull only: it records each pull request with its
    decoded X-Registry-Auth and answers as ECR does to a role without access."""
    pulls: list[dict] = []

    class Handler(QuietHandler):
        def _answer(self, body: bytes = b"OK", kind: str = "text/plain") -> None:
            self.send_response(200)
            self.send_header("Api-Version", "1.41")
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_HEAD(self) -> None:
            self._answer()

        do_GET = do_HEAD

        def do_POST(self) -> None:
            header = self.headers.get("X-Registry-Auth", "")
            auth = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
            pulls.append({"path": self.path, "auth": auth})
            message = "denied: Your authorization token has expired. Reauthenticate and try again."
            self._answer(json.dumps({"errorDetail": {"message": message},
                                     "error": message}).encode() + b"\n", "application/json")

    from http.server import ThreadingHTTPServer

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    (tools / "pull-daemon").write_text(f"tcp://127.0.0.1:{server.server_address[1]}")
    yield pulls
    server.shutdown()
    server.server_close()


def test_an_ecr_image_is_pulled_through_the_credential_helper(
        cloud, tools, stand_in_pull_daemon):
    """As far as ECR goes on one machine: the helper is the docker CLI's, for the ECR
    host only, and its token goes with the pull; what ECR answers is played."""
    helper = tools / "docker-credential-ecr-login"
    helper.write_text(
        "#!/bin/sh\n"
        f'{{ echo "$*"; cat; echo; }} >> {tools}/helper-calls\n'
        f'echo \'{{"ServerURL": "", "Username": "AWS", "Secret": "{ECR_TOKEN}"}}\'\n')
    helper.chmod(0o755)
    # The config the bootstrap writes for the pull, as the pull sees it.
    wrapper = tools / "docker-recorded"
    wrapper.write_text(wrapper.read_text().replace(
        'if [ "$1" = pull ]',
        f'[ "$1" != pull ] || cp "$DOCKER_CONFIG/config.json" {tools}/pull-config.json\n'
        'if [ "$1" = pull ]', 1))
    instance_id = boot(cloud, ECR_IMAGE)
    wait_for(lambda: cloud.runtime.poweroff_requested(instance_id), 60, "the power-off")
    text = console(cloud, instance_id)
    assert json.loads((tools / "pull-config.json").read_text()) == {
        "credHelpers": {ECR_HOST: "ecr-login"}}
    assert (tools / "helper-calls").read_text().split("\n")[:2] == ["get", ECR_HOST]
    (pull,) = stand_in_pull_daemon
    assert pull["auth"]["username"] == "AWS" and pull["auth"]["password"] == ECR_TOKEN
    assert pull["auth"]["serveraddress"] == ECR_HOST
    assert "fromImage=" + ECR_HOST in pull["path"]
    line = fatal_line(text)
    assert f"registry authentication failed for image {ECR_IMAGE}: denied: " in line
    assert "its instance_profile must allow ecr:GetAuthorizationToken" in line
    assert f"pulling from ECR ({ECR_HOST}) with the instance role" in text
    assert ECR_TOKEN not in text
    assert not (cloud.runtime.state_dir / instance_id / "run" / "docker").exists()


def test_an_ecr_image_without_the_credential_helper_says_so(cloud, tools):
    if shutil.which("docker-credential-ecr-login"):
        pytest.skip("this machine has the ECR credential helper installed")
    instance_id = boot(cloud, ECR_IMAGE)
    wait_for(lambda: cloud.runtime.poweroff_requested(instance_id), 60, "the power-off")
    assert ("is in ECR but docker-credential-ecr-login is not installed"
            in fatal_line(console(cloud, instance_id)))


def test_a_build_runs_in_the_worker_image_pulled_with_credentials(
        make_master, cloud, engine, worker_image, private_registry):
    """The whole path: the master names the parameter, the bootstrap logs in and pulls
    the project's image, its worker connects and builds; the password is in no log, no
    step, no user data and not in the build container."""
    engine.images.pull(worker_image)
    image = push(engine, engine.images.get(worker_image),
                 f"{private_registry.address}/dockerami/worker-linux", "private")
    engine.images.remove(worker_image)
    source = store(cloud, "ssm", json.dumps({"username": USER, "password": PASSWORD}))
    master = make_master(master_cfg(
        image=image, command="echo built-in=$(test -f /.dockerenv && echo container)",
        worker_extra=f"registry_credentials={source!r}, {instance_profile(cloud)}"))
    build = master.wait_request(master.force(), 180)
    assert build["results"] == SUCCESS, master.log()[-3000:]
    step = master.step_log(build["buildid"])
    assert "built-in=container" in step
    ((instance_id, user_data),) = [
        (i["InstanceId"], user_data_of(cloud, i["InstanceId"]))
        for r in cloud.client().describe_instances()["Reservations"] for i in r["Instances"]]
    inspect = json.dumps(engine.containers.get(f"dockerami-{instance_id}").attrs)
    for where in (master.log(), step, console(cloud, instance_id), user_data, inspect,
                  left_in(cloud.runtime.state_dir)):
        assert PASSWORD not in where
