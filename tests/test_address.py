"""The default master address: the EC2 private IPv4 from the metadata service (IMDSv2,
asked once per master process), else this host's FQDN; a loopback default is warned
about at checkconfig. The metadata service here is a loopback stand-in."""

from __future__ import annotations

import base64
import http.server
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from buildbot_dockerami.cloud import address
from tests.harness import BIN, REPO, SUCCESS, Master, master_cfg


class FakeImds:
    """IMDSv2 on 127.0.0.1: a token by PUT, then local-ipv4 only with that token."""

    def __init__(self, private_ip: str) -> None:
        self.private_ip = private_ip
        self.requests: list[tuple[str, str]] = []
        imds = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _reply(self, status: int, body: str = "") -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())

            def do_PUT(self) -> None:
                imds.requests.append(("PUT", self.path))
                if (self.path == "/latest/api/token"
                        and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")):
                    self._reply(200, "TOKEN123")
                else:
                    self._reply(400)

            def do_GET(self) -> None:
                imds.requests.append(("GET", self.path))
                if self.headers.get("X-aws-ec2-metadata-token") != "TOKEN123":
                    self._reply(401)  # IMDSv2 required, as our instances are launched
                elif self.path == "/latest/meta-data/local-ipv4":
                    self._reply(200, imds.private_ip)
                else:
                    self._reply(404)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        # Polled often, so that stop() (shutdown waits for a poll) is quick.
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def imds() -> Iterator[FakeImds]:
    server = FakeImds("10.20.30.40")  # only ever a string in user data: nothing connects
    yield server
    server.stop()


def test_ec2_is_recognised_by_its_dmi_vendor_or_xen_uuid() -> None:
    assert address.looks_like_ec2({"/sys/devices/virtual/dmi/id/sys_vendor": "Amazon EC2\n"})
    assert address.looks_like_ec2({"/sys/hypervisor/uuid": "ec2e1916-9099-7caf-fd21-0123\n"})
    assert not address.looks_like_ec2({"/sys/devices/virtual/dmi/id/sys_vendor": "QEMU\n",
                                       "/sys/hypervisor/uuid": "4c4c4544-0000\n"})
    assert not address.looks_like_ec2({})


@pytest.mark.parametrize(("host", "resolved", "loopback"), [
    ("localhost", [], True),
    ("ci.localhost", [], True),
    ("build-master", ["127.0.1.1"], True),  # Debian's /etc/hosts entry for the hostname
    ("::1", [], True),
    ("[::1]", [], True),
    ("127.0.0.1", [], True),
    ("ci.example.com", ["192.0.2.10"], False),
    ("10.0.0.5", [], False),
    ("unresolvable.invalid", [], False),
])
def test_loopback_names_and_addresses(host: str, resolved: list[str], loopback: bool) -> None:
    assert address.is_loopback(host, resolved) is loopback


def test_the_private_address_comes_from_imdsv2(imds: FakeImds) -> None:
    assert address.imds_private_ipv4(imds.url) == "10.20.30.40"
    assert imds.requests == [("PUT", "/latest/api/token"), ("GET", "/latest/meta-data/local-ipv4")]
    assert address.detect_host({address.IMDS_ENV: imds.url}) == "10.20.30.40"


def test_without_a_metadata_service_the_fqdn_is_used(imds: FakeImds) -> None:
    imds.stop()
    assert address.imds_private_ipv4(imds.url, timeout=1) is None
    assert address.detect_host({address.IMDS_ENV: imds.url}) == address.socket.getfqdn()
    assert address.detect_host({address.IMDS_ENV: "off"}) == address.socket.getfqdn()


def test_an_answer_that_is_not_an_ipv4_address_is_ignored(imds: FakeImds) -> None:
    imds.private_ip = "<html>captive portal</html>"
    assert address.imds_private_ipv4(imds.url) is None


def _example_without_master_address(directory: Path) -> Path:
    config = directory / "master.cfg"
    shutil.copy(REPO / "master.cfg.example", config)
    return config


@pytest.mark.integration
def test_userdata_show_uses_the_ec2_private_address(tmp_path: Path, imds: FakeImds) -> None:
    config = _example_without_master_address(tmp_path)
    result = subprocess.run(
        [str(BIN / "buildbot-dockerami"), "userdata", "show", "--config", str(config),
         "linux-1"],
        capture_output=True, text=True, timeout=120, check=False,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), address.IMDS_ENV: imds.url},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "linux-1 ******** 10.20.30.40:9989"
    assert "master_address" not in result.stderr  # not a loopback address: no warning


@pytest.mark.integration
def test_checkconfig_warns_about_a_loopback_default(masters_root: Path, tmp_path: Path) -> None:
    imds = FakeImds("127.0.0.1")
    try:
        master = Master(masters_root, "loopback-default", {address.IMDS_ENV: imds.url})
        master.env.pop("DOCKERAMI_MASTER_ADDRESS")
        _example_without_master_address(master.basedir)
        result = master.checkconfig()
    finally:
        imds.stop()
    assert result.returncode == 0, result.stdout + result.stderr  # a warning, not an error
    for worker in ("linux-1", "linux-2"):
        assert (f"DockerAMILatentWorker {worker!r}: master_address: not set, and the "
                "default, this host's name 127.0.0.1, is a loopback address") in result.stderr


@pytest.mark.integration
def test_a_master_asks_the_metadata_service_once_for_all_its_launches(make_master, cloud):
    imds = FakeImds("127.0.0.1")  # loopback, so the local cloud's workers can connect
    try:
        config = master_cfg(workers=2, build_wait_timeout=0,
                            settings={"master_address": None})
        assert "master_address" not in config
        master = make_master(config, start=False)
        master.env[address.IMDS_ENV] = imds.url
        master.start()
        for _ in range(2):
            assert master.wait_request(master.force(), 90)["results"] == SUCCESS
        assert cloud.faults.count("RunInstances") == 2
        user_data = [
            cloud.client().describe_instance_attribute(
                InstanceId=i["InstanceId"], Attribute="userData")["UserData"]["Value"]
            for r in cloud.client().describe_instances()["Reservations"] for i in r["Instances"]
        ]
        first_lines = {base64.b64decode(u).decode().split("\n")[0].split()[2] for u in user_data}
        assert first_lines == {f"127.0.0.1:{master.pb_port}"}
        assert imds.requests == [("PUT", "/latest/api/token"),
                                 ("GET", "/latest/meta-data/local-ipv4")]
        assert "master_address: not set" in master.log()  # the warning, in the master log
        assert master.stop()
    finally:
        imds.stop()
