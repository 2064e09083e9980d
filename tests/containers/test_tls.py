"""TLS between worker and master, pinned to the master's certificate, on a real engine:
the master listens only on a TLS port with a certificate made here; the image checks
the fingerprint from the user data before its worker connects, and trusts only it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from buildbot_dockerami.protocol import tls
from tests.docker_support import only_instance
from tests.harness import SUCCESS, master_cfg, wait_for

pytestmark = pytest.mark.integration

PLAIN_PB = "c['protocols'] = {'pb': {'port': 'tcp:%s:interface=127.0.0.1' % " \
           "os.environ['BUILDBOT_PB_PORT']}}"


def certificate(directory: Path, name: str) -> tuple[Path, Path, str]:
    """A self-signed certificate and key; returns them and the certificate's fingerprint
    as `openssl x509 -fingerprint -sha256` prints it (what an operator would paste)."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    fingerprint = subprocess.run(["openssl", "x509", "-in", str(cert), "-noout", "-fingerprint",
                                  "-sha256"], check=True, capture_output=True, text=True).stdout
    return cert, key, fingerprint.strip()


def tls_config(image: str, cert: Path, key: Path, fingerprint: str, **settings) -> str:
    text = master_cfg(image=image, command="echo tls-build-ran", build_wait_timeout=60,
                      worker_extra=f"master_tls_fingerprint={fingerprint!r},", **settings)
    assert PLAIN_PB in text
    # The master's PB port speaks TLS only: a worker that connects at all used it.
    return text + ("c['protocols'] = {'pb': {'port': "
                   f"'ssl:%s:interface=127.0.0.1:privateKey={key}:certKey={cert}' % "
                   "os.environ['BUILDBOT_PB_PORT']}}\n")


def test_the_worker_connects_over_tls_to_the_pinned_master(
        make_master, cloud, worker_image, tmp_path):
    cert, key, fingerprint = certificate(tmp_path, "master")
    master = make_master(tls_config(worker_image, cert, key, fingerprint))
    build = master.wait_request(master.force(), 180)
    assert build["results"] == SUCCESS, master.log()[-3000:]
    assert "tls-build-ran" in master.step_log(build["buildid"])
    console = cloud.runtime.console(only_instance(cloud)["InstanceId"])
    pinned = tls.normalize_fingerprint(fingerprint)
    assert f"start-worker: master certificate pinned (SHA-256 {pinned})" in console


def test_a_wrong_fingerprint_is_refused_with_a_clear_console_line(
        make_master, cloud, worker_image, tmp_path):
    cert, key, _ = certificate(tmp_path, "master")
    _, _, other = certificate(tmp_path, "impostor")
    master = make_master(tls_config(worker_image, cert, key, other, missing_timeout=600))
    master.force()
    wait_for(cloud.runtime.running, 60, "the instance to boot")
    instance_id = only_instance(cloud)["InstanceId"]
    line = wait_for(lambda: next((line for line in (cloud.runtime.console(instance_id) or "")
                                  .splitlines() if "FATAL" in line), None), 180,
                    "the image to refuse the master's certificate")
    presented = tls.normalize_fingerprint(subprocess.run(
        ["openssl", "x509", "-in", str(cert), "-noout", "-fingerprint", "-sha256"],
        check=True, capture_output=True, text=True).stdout)
    assert line.endswith(
        f"start-worker: FATAL: the master at 127.0.0.1:{master.pb_port} presented a TLS "
        f"certificate with SHA-256 fingerprint {presented}, not the pinned "
        f"{tls.normalize_fingerprint(other)}; not connecting"), line
    assert not master.get("workers")[0]["connected_to"]
    assert master.stop(timeout=30), "the master did not stop within 30s"
