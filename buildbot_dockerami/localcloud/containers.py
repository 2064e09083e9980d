"""Container runtimes for the local cloud: the real base-AMI bootstrap on a real Docker engine.

Each booted instance gets its own metadata service on 127.0.0.1 (IMDSv2 token,
user data, placement and a role's credentials, like 169.254.169.254 on EC2) and a
"machine" thread that runs what the base AMI runs at boot, with the AWS environment
of an instance: no keys nor AWS config files of the host, only its role, and the
local cloud's endpoint (``AWS_ENDPOINT_URL``; e.g. its SSM and Secrets Manager):

* ``ContainerRuntime``: ``ami/dockerami-bootstrap.sh``, restarted when it exits
  as systemd's ``Restart=always`` would;
* ``LegacyCrontabRuntime``: the seed's crontab command, run once; the container
  reads the user data from the metadata service itself.

What the machine prints is its console (served to GetConsoleOutput). A
bootstrap that powers off asks the hypervisor to terminate the instance.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shlex
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from buildbot_dockerami import assets
from buildbot_dockerami.localcloud.hypervisor import Booting

log = logging.getLogger("dockerami.localcloud")

#: The ami/ folder (checkout or installed wheel), which holds the bootstrap the runtime runs.
AMI_DIR = assets.ami_dir()
ROLE_CREDENTIALS_PATH = "/latest/meta-data/iam/security-credentials"
ROLE_NAME = "dockerami-local-role"


def firewall_tag(instance_id: str) -> str:
    """The comment on the bootstrap's firewall rules for one local instance."""
    return f"dockerami-{instance_id}"


def prune_label(instance_id: str) -> str:
    """The label of what one local instance's bootstrap may prune from the shared engine
    (images and volumes carrying it): on EC2 the engine is the instance's own."""
    return f"dockerami.localcloud.prunable={instance_id}"


def volume_prefix(instance_id: str) -> str:
    """The names of one local instance's cache volumes start with this (its disk)."""
    return f"dockerami-{instance_id}"


def detach_mounts_under(directory: Path) -> int:
    """Lazily unmount whatever is mounted under ``directory`` (a bootstrap's cache mount
    points, if it was killed before it could), innermost first."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return 0
    root = str(directory.resolve())
    points = [p for p in (line.split()[4].encode().decode("unicode_escape") for line in lines)
              if p == root or p.startswith(root + "/")]
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    return len(points)


def remove_firewall_rules(tag: str, iptables: str = "iptables") -> int:
    """Delete the OUTPUT rules carrying ``tag``, e.g. left by a bootstrap that was
    killed before it could remove them; the machine's firewall is the host's here."""
    try:
        listed = subprocess.run([iptables, "-w", "-S", "OUTPUT"], capture_output=True,
                                text=True, check=False)
    except FileNotFoundError:
        return 0
    removed = 0
    for line in listed.stdout.splitlines():
        words = shlex.split(line)
        if words[:2] == ["-A", "OUTPUT"] and tag in words:
            subprocess.run([iptables, "-w", "-D", *words[1:]], capture_output=True, check=False)
            removed += 1
    return removed


class QuietHandler(BaseHTTPRequestHandler):
    """A loopback HTTP handler that logs nothing and answers plain text, for the local
    cloud's metadata service and the tests' own little servers."""

    def log_message(self, *args: Any) -> None:
        pass

    def reply(self, status: int, body: str = "") -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class MetadataService:
    """An instance metadata service for one instance, on a loopback port."""

    def __init__(self, booting: Booting) -> None:
        self.booting = booting
        # What a build must never get: stands for the instance role's credentials.
        now = time.time()
        self.role_credentials = json.dumps({
            "Code": "Success", "Type": "AWS-HMAC",
            "AccessKeyId": "ASIA" + secrets.token_hex(8).upper(),
            "SecretAccessKey": secrets.token_urlsafe(30), "Token": secrets.token_urlsafe(60),
            "LastUpdated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            "Expiration": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + 6 * 3600)),
        })
        region = booting.region or "us-east-1"
        #: Paths a booted instance's metadata answers besides the user data and role.
        self.placement = {"/latest/meta-data/placement/region": region,
                          "/latest/meta-data/placement/availability-zone": f"{region}a"}
        self.tokens: set[str] = set()
        #: The spot interruption notice (JSON), once one is given.
        self.spot = ""
        #: The spot rebalance recommendation (JSON), once one is given.
        self.rebalance = ""
        self.requests: list[tuple[str, str, bool]] = []  # (method, path, had token)
        service = self

        class Handler(QuietHandler):
            def do_PUT(self) -> None:
                service.requests.append(("PUT", self.path, False))
                if self.path != "/latest/api/token" or not self.headers.get(
                    "X-aws-ec2-metadata-token-ttl-seconds"
                ):
                    self.reply(400)
                    return
                token = secrets.token_urlsafe(24)
                service.tokens.add(token)
                self.reply(200, token)

            def do_GET(self) -> None:
                token = self.headers.get("X-aws-ec2-metadata-token")
                has_token = token in service.tokens
                service.requests.append(("GET", self.path, has_token))
                if token is not None and not has_token:
                    self.reply(401)
                    return
                if not has_token and service.booting.http_tokens == "required":
                    self.reply(401)
                    return
                if self.path == "/latest/user-data":
                    self.reply(200, service.booting.user_data)
                elif self.path == "/latest/meta-data/instance-id":
                    self.reply(200, service.booting.instance_id)
                elif self.path == "/latest/meta-data/spot/instance-action" and service.spot:
                    self.reply(200, service.spot)
                elif (self.path == "/latest/meta-data/events/recommendations/rebalance"
                      and service.rebalance):
                    self.reply(200, service.rebalance)
                elif self.path in service.placement:
                    self.reply(200, service.placement[self.path])
                elif self.path == f"{ROLE_CREDENTIALS_PATH}/":
                    self.reply(200, ROLE_NAME)
                elif self.path == f"{ROLE_CREDENTIALS_PATH}/{ROLE_NAME}":
                    self.reply(200, service.role_credentials)
                else:
                    self.reply(404)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> MetadataService:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@dataclass
class _Machine:
    """One instance's boot process, supervised like systemd would (or not, for cron)."""

    instance_id: str
    directory: Path
    command: list[str]
    env: dict[str, str]
    restart: bool
    restart_delay: float
    metadata: MetadataService
    container: str
    docker: str

    def __post_init__(self) -> None:
        self.stopping = threading.Event()
        self.halted = threading.Event()
        self.process: subprocess.Popen | None = None
        self.thread = threading.Thread(target=self._supervise, daemon=True,
                                       name=f"machine-{self.instance_id}")

    @property
    def console_path(self) -> Path:
        return self.directory / "console.log"

    @property
    def poweroff_path(self) -> Path:
        return self.directory / "poweroff"

    def _supervise(self) -> None:
        with open(self.console_path, "ab", buffering=0) as console:
            while not self.stopping.is_set():
                self.process = subprocess.Popen(
                    self.command, env=self.env, stdin=subprocess.DEVNULL, stdout=console,
                    stderr=subprocess.STDOUT, start_new_session=True,
                )
                code = self.process.wait()
                if self.stopping.is_set() or not self.restart or self.poweroff_path.exists():
                    break
                console.write(f"[local cloud] boot process exited ({code}); "
                              f"restarting in {self.restart_delay}s\n".encode())
                self.stopping.wait(self.restart_delay)

    def stop(self) -> None:
        """Power off: the boot process and its containers go; its disk (the cache
        volumes) stays until the instance is discarded."""
        self.stopping.set()
        process = self.process
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
        if process is not None:
            # Nothing of the boot process may outlive it (a `docker run` client, say).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
        # Powering off takes the containers (one per slot) with it, whatever the clients
        # did: until none is left twice running, since a killed client's removal (or a
        # `docker run` the engine was still carrying out) may show up a little later.
        deadline, empty = time.monotonic() + 30, 0
        while empty < 2 and time.monotonic() < deadline:
            listed = subprocess.run(
                [self.docker, "ps", "-aq", "--filter", f"name=^/{self.container}"],
                capture_output=True, text=True, check=False,
            ).stdout.split()
            empty = 0 if listed else empty + 1
            if listed:
                subprocess.run([self.docker, "rm", "-f", "-v", *listed], capture_output=True,
                               check=False)
            elif empty < 2:
                time.sleep(0.5)
        self.thread.join(timeout=15)
        detach_mounts_under(self.directory)
        remove_firewall_rules(firewall_tag(self.instance_id))
        self.metadata.stop()


class ContainerRuntime:
    """Runs the real ``ami/dockerami-bootstrap.sh`` per instance on the local Docker engine."""

    restart = True

    def __init__(self, state_dir: Path, *, docker: str = "docker",
                 bootstrap: Path = AMI_DIR / "dockerami-bootstrap.sh",
                 pull_attempts: int = 12, pull_max_delay: int = 30,
                 restart_delay: float = 2.0, run_options: str = "",
                 iptables: str = "iptables", env: dict[str, str] | None = None,
                 disk_path: str | None = None, disk_poll: float | None = None) -> None:
        """``env``: more environment for the boot process (e.g. a PATH with the aws CLI)."""
        self.state_dir = state_dir
        self.env = dict(env or {})
        self.iptables = iptables
        self.docker = docker
        self.bootstrap = bootstrap
        self.pull_attempts = pull_attempts
        self.pull_max_delay = pull_max_delay
        self.restart_delay = restart_delay
        self.run_options = run_options
        #: The file system the bootstraps keep free space on (None: the engine's root).
        self.disk_path = disk_path
        self.disk_poll = disk_poll
        self._machines: dict[str, _Machine] = {}
        #: Machines being powered off (a start of the same instance waits for them).
        self._halting: dict[str, _Machine] = {}
        #: Every instance booted, whose disk (cache volumes) exists until discarded.
        self._disks: set[str] = set()
        self._lock = threading.Lock()

    @staticmethod
    def container_name(instance_id: str) -> str:
        return f"dockerami-{instance_id}"

    def boot_command(self, metadata: MetadataService, container: str) -> list[str]:
        return ["sh", str(self.bootstrap)]

    def start(self, booting: Booting) -> None:
        with self._lock:
            halting = self._halting.get(booting.instance_id)
        if halting is not None:
            # A stopped instance started again: its last boot must be over first (its
            # containers removed, its mounts undone), as on a machine.
            halting.halted.wait(60)
        directory = self.state_dir / booting.instance_id
        directory.mkdir(parents=True, exist_ok=True)
        metadata = MetadataService(booting).start()
        container = self.container_name(booting.instance_id)
        # An instance has no AWS keys nor config files: only its role, from the metadata
        # service, and the local cloud's endpoint.
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
            "AWS_CONFIG_FILE": str(directory / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(directory / "no-aws-credentials"),
            **({"AWS_ENDPOINT_URL": booting.endpoint_url} if booting.endpoint_url else {}),
            "DOCKER": self.docker,
            "DOCKERAMI_IMDS": metadata.url,
            "DOCKERAMI_STATE_DIR": str(directory / "run"),
            "DOCKERAMI_CONTAINER": container,
            "DOCKERAMI_DOCKER_WAIT": "30",
            "DOCKERAMI_PULL_ATTEMPTS": str(self.pull_attempts),
            "DOCKERAMI_PULL_MAX_DELAY": str(self.pull_max_delay),
            "DOCKERAMI_RUN_OPTIONS": self.run_options,
            "DOCKERAMI_POWEROFF": f"touch {shlex.quote(str(directory / 'poweroff'))}",
            # The bootstrap closes this instance's metadata port to its containers.
            "DOCKERAMI_FIREWALL_TAG": firewall_tag(booting.instance_id),
            "DOCKERAMI_IPTABLES": self.iptables,
            # The engine is shared: prune only this instance's, name its volumes apart.
            "DOCKERAMI_PRUNE_FILTER": f"label={prune_label(booting.instance_id)}",
            "DOCKERAMI_VOLUME_PREFIX": volume_prefix(booting.instance_id),
            **self.env,
        }
        if self.disk_path is not None:
            env["DOCKERAMI_DISK_PATH"] = self.disk_path
        if self.disk_poll is not None:
            env["DOCKERAMI_DISK_POLL"] = str(self.disk_poll)
        machine = _Machine(
            booting.instance_id, directory, self.boot_command(metadata, container), env,
            self.restart, self.restart_delay, metadata, container, self.docker,
        )
        with self._lock:
            self._machines[booting.instance_id] = machine
            self._disks.add(booting.instance_id)
        machine.thread.start()
        log.info("%s: booting with %s (metadata at %s)", booting.instance_id,
                 type(self).__name__, metadata.url)

    def stop(self, instance_id: str) -> None:
        with self._lock:
            machine = self._machines.pop(instance_id, None)
            if machine is not None:
                self._halting[instance_id] = machine
        if machine is not None:
            try:
                machine.stop()
            finally:
                with self._lock:
                    if self._halting.get(instance_id) is machine:
                        del self._halting[instance_id]
                machine.halted.set()
            log.info("%s: machine stopped, container %s removed", instance_id, machine.container)

    def running(self) -> list[str]:
        with self._lock:
            return [iid for iid, m in self._machines.items() if m.thread.is_alive()]

    def discard(self, instance_id: str) -> None:
        """The instance is terminated: its disk goes, and with it its cache volumes."""
        with self._lock:
            if instance_id not in self._disks:
                return
            self._disks.discard(instance_id)
        listed = subprocess.run([self.docker, "volume", "ls", "-q"], capture_output=True,
                                text=True, check=False)
        prefix = volume_prefix(instance_id) + "-"
        volumes = [v for v in listed.stdout.split() if v.startswith(prefix)]
        if volumes:
            subprocess.run([self.docker, "volume", "rm", "-f", *volumes], capture_output=True,
                           check=False)

    def close(self) -> None:
        """The local cloud stops: every instance's disk goes."""
        with self._lock:
            disks = list(self._disks)
        for instance_id in disks:
            self.discard(instance_id)

    def console(self, instance_id: str) -> str | None:
        path = self.state_dir / instance_id / "console.log"
        return path.read_text(errors="replace") if path.exists() else None

    def poweroff_requested(self, instance_id: str) -> bool:
        return (self.state_dir / instance_id / "poweroff").exists()

    def spot_notice(self, instance_id: str) -> None:
        with self._lock:
            machine = self._machines.get(instance_id)
        if machine is not None:
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 120))
            machine.metadata.spot = json.dumps({"action": "terminate", "time": when})

    def rebalance_recommendation(self, instance_id: str) -> None:
        with self._lock:
            machine = self._machines.get(instance_id)
        if machine is not None:
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            machine.metadata.rebalance = json.dumps({"noticeTime": when})

    def metadata_url(self, instance_id: str) -> str | None:
        """Where this instance's metadata service listens (its 169.254.169.254)."""
        with self._lock:
            machine = self._machines.get(instance_id)
        return machine.metadata.url if machine else None

    def metadata_requests(self, instance_id: str) -> list[tuple[str, str, bool]]:
        with self._lock:
            machine = self._machines.get(instance_id)
        return list(machine.metadata.requests) if machine else []


class LegacyCrontabRuntime(ContainerRuntime):
    """The seed's base AMI: its crontab command, run once at boot.

    Differences from the seed's line, all forced by running on one machine: the
    metadata address is the instance's loopback service (passed to the container
    as DOCKERAMI_IMDS), the container gets host networking and a name (so it can
    be removed when the instance goes), and there is no ``sleep 20``.
    """

    restart = False

    def boot_command(self, metadata: MetadataService, container: str) -> list[str]:
        url = metadata.url
        line = (f"{self.docker} run --rm --name {container} --network host "
                f"-e DOCKERAMI_IMDS={url} "
                f"`curl -s {url}/latest/user-data | tail -n +2 | head -n 1`")
        return ["sh", "-c", line]

