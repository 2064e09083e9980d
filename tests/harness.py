"""A real buildbot master in a subprocess, driven the way an operator would:
master.cfg on disk, twistd, SIGHUP for reconfig, the REST API for builds."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import requests

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent

SUCCESS, WARNINGS, FAILURE, SKIPPED, EXCEPTION, RETRY, CANCELLED = range(7)
#: Where the www plugin serves its API and metrics, under the master's web port.
PLUGIN_PATH = "/plugins/dockerami"


#: Ports free_port handed out in this process: the kernel may hand a just-closed port
#: out again at once, and a master given the same port for PB and the web fails to start.
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def wait_for(predicate: Callable[[], Any], timeout: float, what: str,
             interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)  # polling: what is waited for is the predicate


_TEMPLATE_DIR: Path | None = None


def _template_basedir(root: Path) -> Path:
    """``buildbot create-master`` once per session (it builds the DB schema), copied after."""
    global _TEMPLATE_DIR
    if _TEMPLATE_DIR is None:
        _TEMPLATE_DIR = root / "master-template"
        subprocess.run(
            [str(BIN / "buildbot"), "create-master", "-q", "-r", str(_TEMPLATE_DIR)],
            check=True, capture_output=True,
        )
    return _TEMPLATE_DIR


#: buildbot's own tracebacks that are not faults of the plugin: a rejected worker
#: password (logged for every invalid login, e.g. an orphan's old one), a worker
#: logging in while the master shuts down (buildbot 4.3's PB dispatcher releases
#: ``self.master.initLock`` after the master was detached from it), and buildbot's
#: arbitration between two connections under one worker name (an orphan's and the
#: tracked instance's; the plugin then refuses the orphan), and buildbot 4.3 stopping
#: a build at master shutdown whose step has no database row yet (``_interrupt_impl``
#: calls ``addCompleteLog``, which raises BuildStepCancelled for a step without id), and
#: a worker whose connection closes while buildbot asks its info (its instance ended as
#: it reconnected: buildbot 4.3 logs the lost login; the build is not affected).
BUILDBOT_NOISE = ("twisted.cred.error.UnauthorizedLogin",
                  "in requestAvatarId\n\t    eventually(self.master.initLock.release)",
                  'raise RuntimeError("rejecting duplicate worker")',
                  "in _interrupt_impl\n\t    yield self.addCompleteLog(log_name, str(reason))",
                  "in remoteGetWorkerInfo\n\t    info = yield self.mind.callRemote('getWorkerInfo')"
                  "\n\ttwisted.spread.pb.PBConnectionLost")


def unhandled_errors(log: str) -> list[str]:
    """The log's "Unhandled Error" tracebacks, except BUILDBOT_NOISE."""
    blocks = log.split("Unhandled Error")[1:]
    found = []
    for block in blocks:
        traceback = block.split("\n20")[0]  # up to the next timestamped line
        if not any(noise in traceback for noise in BUILDBOT_NOISE):
            found.append(traceback[-1500:])
    return found


class Master:
    def __init__(self, root: Path, name: str, env: dict[str, str]) -> None:
        self.basedir = root / name
        shutil.copytree(_template_basedir(root), self.basedir)
        self.pb_port = free_port()
        self.www_port = free_port()
        self.env = {**os.environ, **env,
                    "BUILDBOT_PB_PORT": str(self.pb_port), "BUILDBOT_WWW_PORT": str(self.www_port),
                    "DOCKERAMI_MASTER_ADDRESS": f"127.0.0.1:{self.pb_port}"}
        self.process: subprocess.Popen | None = None
        self.api = f"http://127.0.0.1:{self.www_port}/api/v2"

    @property
    def log_path(self) -> Path:
        return self.basedir / "twistd.log"

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def write_config(self, text: str) -> None:
        (self.basedir / "master.cfg").write_text(text)

    def checkconfig(self) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "buildbot"), "checkconfig", str(self.basedir)],
            check=False, env=self.env, capture_output=True, text=True, timeout=120,
        )

    def start(self, timeout: float = 60) -> Master:
        """Start (or restart) the master and wait until it says it is running."""
        runs = self.log().count("BuildMaster is running")
        self.process = subprocess.Popen(
            [sys.executable, "-c",
             "import sys; from twisted.scripts.twistd import run; sys.exit(run())",
             "--nodaemon", "--pidfile=", "--logfile=twistd.log", "--python=buildbot.tac"],
            cwd=self.basedir, env=self.env, stdin=subprocess.DEVNULL,
            stdout=open(self.basedir / "stdout.log", "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        wait_for(
            lambda: self.log().count("BuildMaster is running") > runs
            or self.process.poll() is not None,
            timeout, "the master to start",
        )
        if self.process.poll() is not None:
            output = (self.basedir / "stdout.log").read_text()
            raise AssertionError(f"master exited during start-up:\n{self.log()[-3000:]}{output}")
        return self

    def reconfig(self, text: str) -> None:
        marker = self.log().count("configuration update complete")
        self.write_config(text)
        assert self.process is not None
        self.process.send_signal(signal.SIGHUP)
        wait_for(lambda: self.log().count("configuration update complete") > marker, 60,
                 "the reconfig to complete")

    def stop(self, timeout: float = 30) -> bool:
        """SIGTERM, as `buildbot stop` does; False if it had to be killed after ``timeout``
        or exited without buildbot's "Server Shut Down."."""
        if self.process and self.process.poll() is None:
            runs = self.log().count("Server Shut Down.")
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                return False
            return self.log().count("Server Shut Down.") > runs
        return True

    def crash(self) -> None:
        """kill -9: no shutdown code runs, as when the machine or the process dies."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    # -- REST API ----------------------------------------------------------------

    def get(self, path: str, **params: Any) -> list[dict]:
        response = requests.get(f"{self.api}/{path}", params=params, timeout=10)
        response.raise_for_status()
        body = response.json()
        return body[next(k for k in body if k != "meta")]

    # -- the plugin's own pages (c['www']['plugins']['dockerami']) -----------------------

    def plugin_url(self, path: str = "api/fleet") -> str:
        """The URL of the plugin's ``path``: api/fleet, api/control, metrics."""
        return f"http://127.0.0.1:{self.www_port}{PLUGIN_PATH}/{path}"

    def fleet(self, session: requests.Session | None = None) -> dict:
        """The Fleet API's answer, as ``session`` (logged in, or anonymous) reads it."""
        response = (session or requests).get(self.plugin_url("api/fleet"), timeout=20)
        response.raise_for_status()
        return response.json()

    def control(self, session: requests.Session | None = None,
                **body: Any) -> requests.Response:
        """A Fleet control (prewarm, terminate, terminate_orphan, set_pool), as the page
        sends it."""
        return (session or requests).post(self.plugin_url("api/control"), json=body,
                                          timeout=30)

    def metrics(self, accept: str = "") -> requests.Response:
        headers = {"Accept": accept} if accept else {}
        response = requests.get(self.plugin_url("metrics"), headers=headers, timeout=10)
        response.raise_for_status()
        return response

    def builder_id(self, name: str) -> int:
        return wait_for(lambda: next(
            (b["builderid"] for b in self.get("builders") if b["name"] == name), None
        ), 30, f"builder {name}")

    def force(self, builder: str = "runtests", scheduler: str = "force") -> int:
        """Force a build; returns the build request id."""
        builderid = self.builder_id(builder)
        response = requests.post(
            f"{self.api}/forceschedulers/{scheduler}",
            json={"jsonrpc": "2.0", "method": "force", "id": 1,
                  "params": {"builderid": str(builderid)}},
            timeout=10,
        )
        response.raise_for_status()
        body = response.json()
        assert "error" not in body, body
        _, brids = body["result"]
        return int(next(iter(brids.values())))

    def builds_for(self, brid: int) -> list[dict]:
        return self.get("builds", buildrequestid=brid)

    def wait_request(self, brid: int, timeout: float = 120) -> dict:
        """Wait until the request is complete; returns its final build."""
        def done() -> dict | None:
            request = self.get(f"buildrequests/{brid}")[0]
            if not request["complete"]:
                return None
            return self.builds_for(brid)[-1]
        return wait_for(done, timeout, f"build request {brid} to complete")

    def step_log(self, buildid: int, step: str = "run") -> str:
        """The step's log so far ("" if the step has not started yet)."""
        steps = self.get(f"builds/{buildid}/steps")
        stepid = next((s["stepid"] for s in steps if s["name"] == step), None)
        if stepid is None:
            return ""
        logs = self.get(f"steps/{stepid}/logs")
        text = []
        for entry in logs:
            response = requests.get(f"{self.api}/logs/{entry['logid']}/raw", timeout=10)
            text.append(response.text)
        return "\n".join(text)


MASTER_CFG = """\
import os
from buildbot.plugins import schedulers, steps, util, worker
from buildbot_dockerami import worker_pool

c = BuildmasterConfig = {{}}
c['title'] = 'dockerami test'
c['buildbotURL'] = 'http://127.0.0.1:%s/' % os.environ['BUILDBOT_WWW_PORT']
c['protocols'] = {{'pb': {{'port': 'tcp:%s:interface=127.0.0.1' % os.environ['BUILDBOT_PB_PORT']}}}}
c['www'] = {{'port': 'tcp:%s:interface=127.0.0.1' % os.environ['BUILDBOT_WWW_PORT'],
            'plugins': {plugins}}}
c['db'] = {{'db_url': 'sqlite:///state.sqlite'}}
c['buildbotNetUsageData'] = None
c['collapseRequests'] = False

COMMON = dict(
{settings}
    {worker_extra}
)
c['workers'] = {workers_expr}
factory = util.BuildFactory([
    steps.ShellCommand(name='run', command={command!r}),
])
c['builders'] = [
    util.BuilderConfig(name='runtests', workernames=[w.name for w in c['workers']],
                       factory=factory),
]
c['schedulers'] = [schedulers.ForceScheduler(name='force', builderNames=['runtests'])]
"""


#: Web users as master.cfg.example has them: only 'admins' may act (force, worker and
#: Fleet controls); 'viewer' may log in but not act.
USERS_AUTHZ = """
c['www']['auth'] = util.UserPasswordAuth({'admin': 'adminpw', 'viewer': 'viewerpw'})
c['www']['authz'] = util.Authz(
    allowRules=[util.AnyControlEndpointMatcher(role='admins')],
    roleMatchers=[util.RolesFromUsername(roles=['admins'], usernames=['admin'])],
)
"""


def master_cfg(*, image: str = "localhost/dockerami/worker:test",
               instance_type: str | list[str] = "t3.micro",
               build_wait_timeout: float = 2, missing_timeout: float = 120,
               check_interval: float = 1, workers: int = 1,
               command: str = "echo hello from $(hostname)", worker_extra: str = "",
               settings: Mapping[str, str | None] | None = None,
               pool: str | None = None, plugins: dict | None = None, users: bool = False) -> str:
    """A master.cfg with ``workers`` DockerAMILatentWorkers (or, with ``pool``, the
    workers of ``worker_pool(pool)``, e.g. "'pool', slots=2"); ``worker_extra`` is
    inserted verbatim into the workers' keyword arguments ("isolation='container',").
    ``settings`` gives worker settings as Python source, over the ones above (e.g.
    {'image': "util.Interpolate('%(prop:img)s')"}); None leaves one out.
    ``plugins`` is c['www']['plugins'] (e.g. {'dockerami': {}}); ``users`` adds USERS_AUTHZ.
    A test that needs more appends Python to the text (later assignments win)."""
    workers_expr = (
        f"worker_pool({pool}, **COMMON)" if pool else
        f"[worker.DockerAMILatentWorker('w%d' % i, **COMMON) for i in range({workers})]"
    )
    common = {
        "image": repr(image),
        "ami_filters": "[{'Name': 'name', 'Values': ['dockerami-base-*']}]",
        "instance_type": repr(instance_type),
        "master_address": "os.environ['DOCKERAMI_MASTER_ADDRESS']",
        "tags": "{'team': 'ci'}",
        "build_wait_timeout": repr(build_wait_timeout),
        "missing_timeout": repr(missing_timeout),
        "check_instance_interval": repr(check_interval),
        "max_builds": "1",
        **(settings or {}),
    }
    lines = "\n".join(f"    {key}={value}," for key, value in common.items() if value is not None)
    return MASTER_CFG.format(
        settings=lines, command=["sh", "-c", command], worker_extra=worker_extra,
        workers_expr=workers_expr, plugins="{}" if plugins is None else repr(plugins),
    ) + (USERS_AUTHZ if users else "")


def control_worker(master: Master, name: str, action: str, reason: str = "test") -> None:
    """A worker action as the web UI sends it (Pause, Unpause, Stop, Kill)."""
    workerid = next(w["workerid"] for w in master.get("workers") if w["name"] == name)
    response = requests.post(
        f"{master.api}/workers/{workerid}",
        json={"jsonrpc": "2.0", "method": action, "id": 1, "params": {"reason": reason}},
        timeout=10,
    )
    response.raise_for_status()
    assert "error" not in response.json(), response.json()
