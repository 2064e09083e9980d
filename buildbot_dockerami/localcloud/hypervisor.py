"""The "hypervisor": does, for every running instance, what the seed's base AMI does.

It watches the EC2 server like a cloud's control plane would, and when an
instance's boot is due (``timing.BootClock``: launch + boot + pull, or start from
stopped) it hands the instance's user data to a runtime, which plays the base
AMI + image. When the instance stops or terminates, the runtime's machine goes away
with it.

``ProcessRuntime`` runs the worker as a plain ``buildbot-worker`` process
configured from user-data line 1, exactly what the image's setup script does
inside the container; it is what a machine without a Docker engine can do.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import boto3

from buildbot_dockerami.localcloud.ec2server import HYPERVISOR_ACCESS_KEY
from buildbot_dockerami.localcloud.timing import BootClock
from buildbot_dockerami.protocol import userdata

#: How long before its worker is due a runtime with ``prepare`` gets the instance.
PREPARE_LEAD = 60.0

log = logging.getLogger("dockerami.localcloud")

_WORKER_TAC = """\
import os
import time
from buildbot_worker.bot import Worker
from twisted.application import service

# Start-up work is done; the machine "finishes booting" at this wall-clock time.
time.sleep(max(0.0, {start_at!r} - time.time()))
with open("booted_at", "w") as f:
    f.write(repr(time.time()))
basedir = os.path.abspath(os.path.dirname(__file__))
application = service.Application("buildbot-worker")
worker = Worker(
    {host!r}, {port!r}, {name!r}, open(os.path.join(basedir, "password")).read(), basedir,
    keepalive=60, umask=0o022, maxdelay=5, allow_shutdown="signal", maxRetries=None,
)
worker.setServiceParent(application)
"""

#: A worker process started before its instance: pays the imports, then waits for one.
_SPARE = """\
import json, os, sys
import buildbot_worker.bot, twisted.application.service, twisted.scripts.twistd
print("ready", flush=True)
line = sys.stdin.readline()
if not line.strip():
    sys.exit(0)
job = json.loads(line)
os.chdir(job["basedir"])
os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
os.dup2(os.open("stderr.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
sys.argv = ["twistd", *job["args"]]
sys.exit(twisted.scripts.twistd.run())
"""

#: twistd's arguments for an instance's worker (in its base directory).
_TWISTD_ARGS = ["--nodaemon", "--pidfile=", "--logfile=twistd.log", "--python=buildbot.tac"]


@dataclass(frozen=True)
class Booting:
    """What a runtime gets to boot an instance, as the base AMI would see it."""

    instance_id: str
    user_data: str
    http_tokens: str = "required"
    #: Seconds the emulated image pull took (0: the image was on the disk already).
    pull_seconds: float = 0.0
    #: The instance's region (its metadata's placement) and the cloud's AWS endpoint,
    #: which the instance's own AWS calls (with its role) go to.
    region: str = ""
    endpoint_url: str = ""


class Runtime(Protocol):
    """Plays one booted instance: the base AMI starting line 2's image."""

    def start(self, booting: Booting) -> None: ...
    def stop(self, instance_id: str) -> None: ...
    def running(self) -> list[str]: ...
    def console(self, instance_id: str) -> str | None: ...
    def poweroff_requested(self, instance_id: str) -> bool: ...
    def spot_notice(self, instance_id: str) -> None: ...
    def rebalance_recommendation(self, instance_id: str) -> None: ...


class ProcessRuntime:
    """Each instance's worker is a real buildbot-worker process (twistd, foreground).

    ``prepare`` starts the process ahead of its boot time and lets it wait, after its
    imports, until then: 50 workers importing Twisted at the same moment would cost
    this machine ~30 CPU-seconds that on EC2 come out of 50 other machines. With
    ``idle_priority`` (Linux, root) the worker runs under SCHED_IDLE for its whole life,
    only when no other process wants the CPU: 50 workers connecting at once at normal
    priority froze a benchmark's master for seconds, on 2 cores they shared with it.
    Each writes ``booted_at`` (epoch) so a benchmark can check it was on time.

    ``warm(n)`` goes further for a burst: n processes do their imports before it and
    wait for an instance, so that the burst's boots cost this machine next to nothing.
    """

    def __init__(self, state_dir: Path, idle_priority: bool = False) -> None:
        self.state_dir = state_dir
        self.idle_priority = idle_priority
        #: Image -> the digest its emulated pull gives, reported as the worker info
        #: ``image_digest`` as the bootstrap and reference image do (none by default:
        #: there is no registry here, and such an image is never refreshed).
        self.image_digests: dict[str, str] = {}
        self._processes: dict[str, subprocess.Popen] = {}
        self._spares: list[subprocess.Popen] = []
        self._lock = threading.Lock()

    def _command(self, *args: str) -> list[str]:
        command = [sys.executable, *args]
        return ["chrt", "--idle", "0", *command] if self.idle_priority else command

    def warm(self, count: int, timeout: float = 300.0) -> None:
        """Start ``count`` spare worker processes; return when all have imported."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / "spares.log", "ab") as errors:
            for _ in range(count):
                spare = subprocess.Popen(
                    self._command("-c", _SPARE), cwd=self.state_dir, stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, stderr=errors, start_new_session=True)
                with self._lock:  # discard_spares ends it, whatever happens next
                    self._spares.append(spare)
        deadline = time.monotonic() + timeout
        with self._lock:
            spares = list(self._spares)
        for spare in spares:
            if spare.stdout is None or spare.stdout.closed:
                continue  # ready since an earlier warm()
            ready, _, _ = select.select([spare.stdout], [], [],
                                        max(0.0, deadline - time.monotonic()))
            if not ready or spare.stdout.readline().strip() != b"ready":
                raise RuntimeError(f"spare worker process {spare.pid} did not start "
                                   f"(see {self.state_dir / 'spares.log'})")
            spare.stdout.close()

    def discard_spares(self) -> None:
        """End the spare processes no instance took (they exit when their stdin closes)."""
        with self._lock:
            spares, self._spares = self._spares, []
        for spare in spares:
            assert spare.stdin is not None
            spare.stdin.close()
        for spare in spares:
            try:
                spare.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(spare.pid, signal.SIGKILL)
                spare.wait()

    def _hand_to_spare(self, basedir: Path) -> subprocess.Popen | None:
        """A waiting spare process, now running ``basedir``'s worker; None if none is left."""
        while True:
            with self._lock:
                spare = self._spares.pop() if self._spares else None
            if spare is None:
                return None
            assert spare.stdin is not None
            try:
                spare.stdin.write(json.dumps({"basedir": str(basedir),
                                              "args": _TWISTD_ARGS}).encode() + b"\n")
                spare.stdin.close()
            except (BrokenPipeError, ValueError):  # it died meanwhile: try the next
                spare.wait()
                continue
            return spare

    def start(self, booting: Booting) -> None:
        self.prepare(booting, 0.0)

    def prepare(self, booting: Booting, start_at: float) -> None:
        """Start the worker process now; it connects at ``start_at`` (epoch seconds)."""
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
            _WORKER_TAC.format(host=data.master_host, port=data.master_port,
                               name=data.worker_name, start_at=start_at)
        )
        (basedir / "image").write_text(data.image + "\n")
        # As the image does: tell the master which instance this worker runs on.
        (basedir / "info").mkdir()
        (basedir / "info" / "instance_id").write_text(instance_id)
        # ... and when its image was ready and how, as the bootstrap would tell it. There
        # is no image here: these values come from the emulated pull (timing.Delays), and
        # the image is "ready" when the worker starts, the end of the emulated boot + pull.
        ready_at = start_at if start_at > 0 else time.time()
        (basedir / "info" / "image_ready").write_text(f"{ready_at:.3f}")
        (basedir / "info" / "image_pull").write_text(
            f"{booting.pull_seconds:.1f}" if booting.pull_seconds > 0 else "present")
        if data.image in self.image_digests:
            (basedir / "info" / "image_digest").write_text(self.image_digests[data.image])
        process = self._hand_to_spare(basedir)
        if process is None:
            process = subprocess.Popen(
                self._command("-c", "import sys; from twisted.scripts.twistd import run; "
                              "sys.exit(run())", *_TWISTD_ARGS),
                cwd=basedir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=open(basedir / "stderr.log", "wb"),  # noqa: SIM115
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

    def rebalance_recommendation(self, instance_id: str) -> None:
        """What the bootstrap does on EC2's rebalance recommendation (there is no metadata
        service here to serve it): it retires the instance with reason spot_rebalance."""
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.retire(instance_id, "spot_rebalance: EC2 recommends rebalancing this spot "
                    f'instance ({{"noticeTime": "{when}"}})')

    def retire(self, instance_id: str, text: str) -> None:
        """What the bootstrap's ``retire`` and the reference image do: ``text``
        ("<reason>: <detail>") becomes the worker info ``dockerami_retired``, then the
        worker is asked to shut down (SIGHUP), which makes the master read it."""
        with self._lock:
            process = self._processes.get(instance_id)
        if process is None or process.poll() is not None:
            return
        info = self.state_dir / instance_id / "info"
        (info / "dockerami_retired.new").write_text(text + "\n")
        (info / "dockerami_retired.new").rename(info / "dockerami_retired")
        process.send_signal(signal.SIGHUP)


class Hypervisor:
    """Watches the EC2 server's instances and boots/stops runtime machines to match.

    Each instance's worker starts when ``clock`` says it is due (launch + boot + pull,
    or start-from-stopped), in a thread of its own: boots overlap as on EC2, however
    many instances are due at once. Instances the clock has not seen (it sees every
    call through the EC2 server) count from when the hypervisor first sees them.
    """

    def __init__(self, endpoint_url: str, region: str, runtime: Runtime,
                 states: Callable[[], dict[str, tuple[str, str]]], *,
                 poll_interval: float = 0.1, clock: BootClock | None = None) -> None:
        """``states``: instance id -> (state, HttpTokens), as DescribeInstances would
        answer, read without an EC2 call (``Ec2Server.instance_states``)."""
        self.runtime = runtime
        self._states = states
        self.region = region
        self.endpoint_url = endpoint_url
        self.clock = clock or BootClock()
        self.poll_interval = poll_interval
        self.booted: dict[str, float] = {}
        self.failed: dict[str, str] = {}
        self._first_seen: dict[str, float] = {}
        #: Instance id -> its boot thread, until the runtime has it (or it failed).
        self._booting: dict[str, threading.Thread] = {}
        self._prepared: set[str] = set()
        #: Instances that stopped or went while their boot thread ran.
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="hypervisor", daemon=True)
        self._ec2 = boto3.client(
            "ec2", region_name=region, endpoint_url=endpoint_url,
            aws_access_key_id=HYPERVISOR_ACCESS_KEY, aws_secret_access_key="local",
        )

    @property
    def boot_delay(self) -> float:
        return self.clock.delays.boot

    @boot_delay.setter
    def boot_delay(self, seconds: float) -> None:
        self.clock.delays.boot = seconds

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        with self._lock:
            threads = list(self._booting.values())
            self._cancelled.update(self._booting)
        for thread in threads:
            thread.join(timeout=10)
        for instance_id in list(self.booted):
            self.runtime.stop(instance_id)
        self.booted.clear()
        close = getattr(self.runtime, "close", None)
        if close is not None:
            close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:
                log.exception("hypervisor tick failed")
            self._stop.wait(self.poll_interval)

    def tick(self) -> None:
        now = time.monotonic()
        for instance_id, (state, http_tokens) in self._states().items():
            if state == "running" and self.runtime.poweroff_requested(instance_id):
                # Launched with InstanceInitiatedShutdownBehavior=terminate.
                log.info("%s: powered off by its boot process; terminating", instance_id)
                self._ec2.terminate_instances(InstanceIds=[instance_id])
                self._halt(instance_id, "shutting-down")
                continue
            if state not in ("running", "pending"):
                self._halt(instance_id, state)
                continue
            with self._lock:
                busy = (instance_id in self.booted or instance_id in self.failed
                        or instance_id in self._booting)
            if busy:
                continue
            due = self.clock.worker_due(instance_id)
            if due is None:
                due = self._first_seen.setdefault(instance_id, now) + self.boot_delay
            prepare = getattr(self.runtime, "prepare", None)
            if prepare is not None and instance_id not in self._prepared \
                    and due - now <= PREPARE_LEAD:
                self._spawn(instance_id, http_tokens, due, prepare)
            elif state == "running" and now >= due:
                self._spawn(instance_id, http_tokens, due, None)

    def _halt(self, instance_id: str, state: str) -> None:
        """The instance stopped or went: so does its machine (now, or when its boot
        thread gets there)."""
        with self._lock:
            self._prepared.discard(instance_id)
            if instance_id in self._booting:
                self._cancelled.add(instance_id)
                return
            booted = self.booted.pop(instance_id, None)
        self._first_seen.pop(instance_id, None)
        discard = getattr(self.runtime, "discard", None)
        gone = state in ("shutting-down", "terminated") and discard is not None
        if booted is not None:
            log.info("%s: instance is %s, stopping its machine", instance_id, state)

            def halt() -> None:
                self.runtime.stop(instance_id)
                if gone:
                    discard(instance_id)  # a terminated instance's disk goes too

            # In a thread: machines power off together, not one after another.
            threading.Thread(target=halt, name=f"halt-{instance_id}", daemon=True).start()
        elif gone:
            discard(instance_id)

    def _spawn(self, instance_id: str, http_tokens: str, due: float,
               prepare: Callable[[Booting, float], None] | None) -> None:
        thread = threading.Thread(
            target=self._boot, args=(instance_id, http_tokens, due, prepare),
            name=f"boot-{instance_id}", daemon=True,
        )
        with self._lock:
            self._booting[instance_id] = thread
            self._cancelled.discard(instance_id)
            if prepare is not None:
                self._prepared.add(instance_id)
        thread.start()

    def interrupt(self, instance_id: str, notice: float = 2.0) -> None:
        """A spot interruption: the notice in the instance's metadata (EC2 gives two
        minutes; here ``notice`` seconds), then EC2 reclaims the instance with the state
        reason ``Server.SpotInstanceTermination``."""
        self.runtime.spot_notice(instance_id)
        timer = threading.Timer(notice, self._reclaim, (instance_id,))
        timer.daemon = True
        timer.start()

    def recommend_rebalance(self, instance_id: str) -> None:
        """EC2's spot rebalance recommendation (meta-data/events/recommendations/rebalance),
        which comes before any interruption notice, if one comes at all: the container
        runtime serves it from the instance's metadata service to the real bootstrap;
        the process runtime, which has neither, does what they would."""
        self.runtime.rebalance_recommendation(instance_id)

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

    def _boot(self, instance_id: str, http_tokens: str, due: float,
              prepare: Callable[[Booting, float], None] | None) -> None:
        try:
            attribute = self._ec2.describe_instance_attribute(
                InstanceId=instance_id, Attribute="userData"
            )
            encoded = attribute.get("UserData", {}).get("Value", "")
            text = base64.b64decode(encoded).decode() if encoded else ""
            booting = Booting(instance_id, text, http_tokens, self.clock.pull_seconds(instance_id),
                              region=self.region, endpoint_url=self.endpoint_url)
            if prepare is not None:
                # The runtime does its start-up work now and starts the worker at
                # ``due`` (wall clock), as a machine with its own CPU would.
                prepare(booting, time.time() + (due - time.monotonic()))
            else:
                self.runtime.start(booting)
        except Exception as e:
            # A real base AMI would log this to the console and leave the instance idle.
            with self._lock:
                self.failed[instance_id] = str(e)
                self._booting.pop(instance_id, None)
            log.warning("%s: could not start the image: %s", instance_id, e)
            return
        with self._lock:
            self._booting.pop(instance_id, None)
            cancelled = instance_id in self._cancelled
            self._cancelled.discard(instance_id)
            if not cancelled:
                self.booted[instance_id] = time.monotonic()
        if cancelled:
            self.runtime.stop(instance_id)
