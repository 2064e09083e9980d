"""A build's AWS role credentials (steps/aws.py) in a real container under
isolation='container', booted by the real bootstrap: they are in the build's file
inside its container and nowhere `docker inspect` or the container's environment
shows; the file goes with the build."""

from __future__ import annotations

import json
import re
import socket

import pytest

from tests.docker_support import containers_of, instance_ids
from tests.harness import SUCCESS, free_port, master_cfg, wait_for
from tests.helpers import AWS_STEPS, caller_arn, make_role, wait_step_started

pytestmark = pytest.mark.integration

#: Holds the build until something listens on the port (host networking: the test).
HOLD = ("python3 -c 'import socket, time\n"
        "while True:\n"
        "    try:\n"
        "        socket.create_connection((\"127.0.0.1\", {port})).close(); break\n"
        "    except OSError:\n"
        "        time.sleep(0.05)'")


def test_build_credentials_are_in_the_containers_file_only(make_master, cloud, engine,
                                                           worker_image):
    role = make_role(cloud, "ci-container")
    port = free_port()
    config = master_cfg(image=worker_image, build_wait_timeout=60,
                        worker_extra="isolation='container',") + AWS_STEPS + f"""
c['builders'].append(aws_builder(
    'publish', AwsCredentials(role_arn={role!r}),
    aws_shell('show', 'ls -l "$AWS_SHARED_CREDENTIALS_FILE"'),
    aws_shell('hold', {HOLD.format(port=port)!r})))
c['schedulers'].append(schedulers.ForceScheduler(name='aws', builderNames=['publish']))
"""
    master = make_master(config)
    brid = master.force("publish", "aws")
    hold = wait_step_started(master, brid, "hold", timeout=180)
    shown = master.step_log(hold["buildid"], "show")
    path = re.search(r"AWS_SHARED_CREDENTIALS_FILE=(\S+)", shown).group(1)
    assert re.search(r"^-r-------- .* " + re.escape(path) + "$", shown, re.MULTILINE), shown
    (name,) = containers_of(engine, instance_ids(cloud))
    container = engine.containers.get(name)
    code, output = container.exec_run(["cat", path])  # as the build's user
    assert code == 0, output
    values = dict(re.findall(r"^(aws_\w+) = (\S+)$", output.decode(), re.MULTILINE))
    assert caller_arn(cloud, values) == (
        "arn:aws:sts::123456789012:assumed-role/ci-container/publish-1")
    _, environ = container.exec_run(["cat", "/proc/1/environ"])
    inspected = json.dumps(engine.api.inspect_container(container.id))
    for key, value in values.items():
        assert value not in inspected, f"{key} in docker inspect"
        assert value.encode() not in environ, f"{key} in the container's environment"
    with socket.create_server(("127.0.0.1", port)):
        build = master.wait_request(brid, 180)
    assert build["results"] == SUCCESS
    wait_for(lambda: all(c.id != container.id for c in engine.containers.list(all=True)), 60,
             "the build's container to be removed")
