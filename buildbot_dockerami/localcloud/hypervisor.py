"""The "hypervisor": does, for every running instance, what the seed's base AMI does.

It watches the EC2 server like a cloud's control plane would, and when an
instance has been running for ``boot_delay`` seconds it hands the instance's
user data to a runtime, which plays the base AMI + image. When the instance
stops or terminates, the runtime's machine goes away with it.

``ProcessRuntime`` runs the worker as a plain ``buildbot-worker`` process
configured from user-data line 1, exactly what the image's setup script does
inside the container; it is what a machine without a Docker engine can do.
"""

from __future__ import annotations

import base64
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import boto3

from buildbot_dockerami import userdata
from buildbot_dockerami.localcloud.ec2server import HYPERVISOR_ACCESS_KEY

log = logging.getLogger("dockerami.localcloud")

_WORKER_TAC = """\
import os
from buildbot_worker.bot import Worker
from twisted.application import service

basedir = os.path.abspath(os.path.dirname(__file__))
application = service.Application("buildbot-worker")
worker = Worker(
    {host!r}, {port!r}, {name!r}, open(os.path.join(basedir, "password")).read(), basedir,
    keepalive=60, umask=0o022, maxdelay=5, allow_shutdown="signal", maxRetries=None,
)
worker.setServiceParent(application)
"""


@dataclass(frozen=True)
class Booting:
    """What a runtime gets to boot an instance, as the base AMI would see it."""

    instance_id: str
    user_data: str
    http_tokens: str = "required"


class Runtime(Protocol):
    """Plays one booted instance: the base AMI starting line 2's image."""

    def start(self, booting: Booting) -> None: ...
    def stop(self, instance_id: str) -> None: ...
    def running(self) -> list[str]: ...
    def console(self, instance_id: str) -> str | None: ...
    def poweroff_requested(self, instance_id: str) -> bool: ...
    def spot_notice(self, instance_id: str) -> None: ...


class ProcessRuntime:
    """Each instance's worker is a real buildbot-worker process (twistd, foreground)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self._processes: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()

    def start(self, booting: Booting) -> None:
        instance_id = booting.instance_id
        data = userdata.parse(booting.user_data)
        basedir = self.state_dir / instance_id
        shutil.rmtree(basedir, ignore_errors=True)
        basedir.mkdir(parents=True)
        # The password goes in a file, never on a command line (ps) or in a log.
        password_file = basedir / "password"
        password_file.write_text(data.password)
        password_file.chmod(0o600)
        (basedir / "buildbot.tac").write_text(
            _WORKER_TAC.format(host=data.master_host, port=data.master_port, name=data.worker_name)
        )
        (basedir / "image").write_text(data.image + "\n")
        # As the image does: tell the master which instance this worker runs on.
        (basedir / "info").mkdir()
        (basedir / "info" / "instance_id").write_text(instance_id)
        command = [
            sys.executable, "-c",
            "import sys; from twisted.scripts.twistd import run; sys.exit(run())",
            "--nodaemon", "--pidfile=", "--logfile=twistd.log", "--python=buildbot.tac",
        ]
        process = subprocess.Popen(
            command, cwd=basedir, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=open(basedir / "stderr.log", "wb"),  # noqa: SIM115
            start_new_session=True,
        )
        with self._lock:
            self._processes[instance_id] = process
        log.info("%s: worker %s started (pid %d) for image %s, master %s",
                 instance_id, data.worker_name, process.pid, data.image, data.master)

    def stop(self, instance_id: str) -> None:
        with self._lock:
            process = self._processes.pop(instance_id, None)
        if process is None:
            return
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        log.info("%s: worker process ended", instance_id)

    def running(self) -> list[str]:
        with self._lock:
            return [iid for iid, p in self._processes.items() if p.poll() is None]

    def console(self, instance_id: str) -> str | None:
        path = self.state_dir / instance_id / "twistd.log"
        return path.read_text(errors="replace") if path.exists() else None

    def poweroff_requested(self, instance_id: str) -> bool:
        return False

    def spot_notice(self, instance_id: str) -> None:
        """What the bootstrap does on a spot interruption notice: ask the worker to shut
        down gracefully (SIGHUP, the worker's allow_shutdown='signal')."""
        with self._lock:
            process = self._processes.get(instance_id)
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGHUP)


class Hypervisor:
    """Polls the EC2 server and boots/stops runtime machines to match instance states."""

    def __init__(self, endpoint_url: str, region: str, runtime: Runtime,
                 boot_delay: float = 0.0, poll_interval: float = 0.25) -> None:
        self.runtime = runtime
        self.region = region
        self.boot_delay = boot_delay
        self.poll_interval = poll_interval
        self.booted: dict[str, float] = {}
        self.failed: dict[str, str] = {}
        self._first_seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="hypervisor", daemon=True)
        self._ec2 = boto3.client(
            "ec2", region_name=region, endpoint_url=endpoint_url,
            aws_access_key_id=HYPERVISOR_ACCESS_KEY, aws_secret_access_key="local",
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        for instance_id in list(self.booted):
            self.runtime.stop(instance_id)
        self.booted.clear()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:
                log.exception("hypervisor tick failed")
            self._stop.wait(self.poll_interval)

    def tick(self) -> None:
        now = time.monotonic()
        states: dict[str, str] = {}
        tokens: dict[str, str] = {}
        for page in self._ec2.get_paginator("describe_instances").paginate():
            for reservation in page["Reservations"]:
                for instance in reservation["Instances"]:
                    states[instance["InstanceId"]] = instance["State"]["Name"]
                    tokens[instance["InstanceId"]] = instance.get("MetadataOptions", {}).get(
                        "HttpTokens", "optional")
        for instance_id, state in states.items():
            if state == "running" and self.runtime.poweroff_requested(instance_id):
                # Launched with InstanceInitiatedShutdownBehavior=terminate.
                log.info("%s: powered off by its boot process; terminating", instance_id)
                self._ec2.terminate_instances(InstanceIds=[instance_id])
                states[instance_id] = "shutting-down"
            if states[instance_id] != "running":
                if instance_id in self.booted:
                    log.info("%s: instance is %s, stopping its machine", instance_id,
                             states[instance_id])
                    self.runtime.stop(instance_id)
                    del self.booted[instance_id]
                self._first_seen.pop(instance_id, None)
                continue
            if instance_id in self.booted or instance_id in self.failed:
                continue
            first_seen = self._first_seen.setdefault(instance_id, now)
            if now - first_seen >= self.boot_delay:
                self._boot(instance_id, tokens[instance_id])

    def interrupt(self, instance_id: str, notice: float = 2.0) -> None:
        """A spot interruption: the notice in the instance's metadata (EC2 gives two
        minutes; here ``notice`` seconds), then EC2 reclaims the instance with the state
        reason ``Server.SpotInstanceTermination``."""
        self.runtime.spot_notice(instance_id)
        timer = threading.Timer(notice, self._reclaim, (instance_id,))
        timer.daemon = True
        timer.start()

    def _reclaim(self, instance_id: str) -> None:
        from moto.ec2.models import ec2_backends
        from moto.ec2.models.instances import StateReason

        self._ec2.terminate_instances(InstanceIds=[instance_id])
        for backend in ec2_backends.values():
            try:
                instance = backend[self.region].get_instance(instance_id)
            except Exception:
                continue
            instance.state_reason = StateReason(
                "Server.SpotInstanceTermination: Spot instance termination",
                "Server.SpotInstanceTermination")
        log.info("%s: reclaimed (spot interruption)", instance_id)

    def console_output(self, instance_id: str) -> str | None:
        return self.runtime.console(instance_id)

    def _boot(self, instance_id: str, http_tokens: str) -> None:
        attribute = self._ec2.describe_instance_attribute(
            InstanceId=instance_id, Attribute="userData"
        )
        encoded = attribute.get("UserData", {}).get("Value", "")
        text = base64.b64decode(encoded).decode() if encoded else ""
        try:
            self.runtime.start(Booting(instance_id, text, http_tokens))
        except Exception as e:
            # A real base AMI would log this to the console and leave the instance idle.
            self.failed[instance_id] = str(e)
            log.warning("%s: could not start the image: %s", instance_id, e)
            return
        self.booted[instance_id] = time.monotonic()
