"""The services buildbot's multi-master setup shares, started on loopback for the tests:
a throwaway PostgreSQL cluster (Debian's package) and a Crossbar.io WAMP router (from
PyPI, in its own virtualenv made by dev/crossbar). Without them the multi-master tests
are skipped loudly; with CI=true they fail."""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.harness import REPO, free_port, wait_for

SKIPPED_FOR_SERVICES: list[str] = []
#: Where dev/crossbar puts Crossbar.io (its pins clash with buildbot's, so apart).
CROSSBAR = Path(os.environ.get("DOCKERAMI_CROSSBAR", REPO / ".venv-crossbar" / "bin" / "crossbar"))
TEMPLATE_DB = "dockerami_template"
#: The configuration every master of a shared fleet runs, unchanged (docs/several-masters.md).
MULTIMASTER_CFG = REPO / "multimaster.cfg.example"


def require(condition: bool, why: str, fix: str) -> None:
    """Skip loudly without the service; under CI a missing one is a failure."""
    if condition:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {why}; {fix}")
    SKIPPED_FOR_SERVICES.append(f"{why} ({fix})")
    pytest.skip(f"NO MULTI-MASTER SERVICES: {why} ({fix})")


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


class Postgres:
    """A PostgreSQL cluster in a temp dir, on 127.0.0.1 only, trust auth, gone on stop.

    PostgreSQL refuses to run as root: as root the cluster belongs to the ``postgres``
    user of Debian's package and is run through ``runuser``.
    """

    def __init__(self) -> None:
        self.initdb, self.pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
        require(bool(self.initdb and self.pg_ctl), "PostgreSQL is not installed",
                "apt-get install postgresql, or run dev/engine as root")
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                require(False, "running as root and there is no postgres user",
                        "apt-get install postgresql")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.dir = Path(tempfile.mkdtemp(prefix="dockerami-pg-"))
        if self.as_user:
            shutil.chown(self.dir, "postgres")
        self.data = self.dir / "data"
        self.port = free_port()
        self._databases = 0

    def _run(self, *argv: str) -> None:
        subprocess.run([*self.as_user, *argv], check=True, capture_output=True, timeout=120)

    def start(self) -> Postgres:
        self._run(str(self.initdb), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "--no-sync", "-E", "UTF8")
        options = (f"-h 127.0.0.1 -p {self.port} -k {self.dir} -c fsync=off "
                   "-c max_connections=200")
        self._run(str(self.pg_ctl), "-D", str(self.data), "-l", str(self.dir / "log"),
                  "-o", options, "-w", "-t", "60", "start")
        return self

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def sql(self, statement: str, database: str = "postgres") -> None:
        import psycopg  # SQLAlchemy's (and so buildbot's) driver for postgresql:// URLs

        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres",
                             dbname=database, autocommit=True) as conn:
            conn.execute(statement)

    def make_template(self, buildbot: Path) -> None:
        """A database with buildbot's schema, copied for each test (create-master takes
        seconds, CREATE DATABASE ... TEMPLATE a blink)."""
        self.sql(f"CREATE DATABASE {TEMPLATE_DB}")
        basedir = self.dir / "schema-master"
        subprocess.run([str(buildbot), "create-master", "-q", "-r",
                        f"--db={self.url(TEMPLATE_DB)}", str(basedir)],
                       check=True, capture_output=True, timeout=300)

    def new_database(self) -> str:
        self._databases += 1
        name = f"fleet_{os.getpid()}_{self._databases}"
        self.sql(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE_DB}")
        return self.url(name)

    def stop(self) -> None:
        if self.data.exists():
            subprocess.run([*self.as_user, str(self.pg_ctl), "-D", str(self.data), "-m",
                            "immediate", "-w", "stop"], check=False, capture_output=True,
                           timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)


#: A router with one realm any client may use: loopback only, like everything here.
def crossbar_config(port: int, realm: str = "realm1") -> dict:
    return {
        "version": 2,
        "controller": {},
        "workers": [{
            "type": "router",
            "realms": [{
                "name": realm,
                "roles": [{
                    "name": "anonymous",
                    "permissions": [{
                        "uri": "", "match": "prefix",
                        "allow": {"call": True, "register": True, "publish": True,
                                  "subscribe": True},
                        "disclose": {"caller": False, "publisher": False},
                        "cache": True,
                    }],
                }],
            }],
            "transports": [{
                "type": "websocket",
                "endpoint": {"type": "tcp", "port": port, "interface": "127.0.0.1"},
            }],
        }],
    }


class Crossbar:
    """``crossbar start`` on 127.0.0.1 with the config above, in a temp dir."""

    def __init__(self) -> None:
        require(CROSSBAR.exists(), f"Crossbar.io is not installed at {CROSSBAR}",
                "run dev/crossbar")
        self.dir = Path(tempfile.mkdtemp(prefix="dockerami-crossbar-"))
        self.port = free_port()
        self.realm = "realm1"
        self.process: subprocess.Popen | None = None

    @property
    def router_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def log(self) -> str:
        path = self.dir / "crossbar.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> Crossbar:
        (self.dir / "config.json").write_text(json.dumps(crossbar_config(self.port, self.realm)))
        self.process = subprocess.Popen(
            [str(CROSSBAR), "start", "--cbdir", str(self.dir), "--loglevel", "info"],
            stdin=subprocess.DEVNULL, stdout=open(self.dir / "crossbar.log", "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        import socket

        def listening() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"crossbar exited:\n{self.log()[-3000:]}")
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_for(listening, 120, "the crossbar router to listen", interval=0.5)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def fleet_env(db_url: str, router: Crossbar) -> dict[str, str]:
    """What multimaster.cfg.example reads from the environment, for one master of a
    fleet on loopback (the tests' and the benches'): one database, the router, the
    test image, anonymous Fleet controls (nobody untrusted reaches 127.0.0.1)."""
    return {
        "FLEET_DB_URL": db_url, "FLEET_ROUTER_URL": router.router_url,
        "FLEET_REALM": router.realm, "FLEET_LISTEN": "127.0.0.1",
        "FLEET_IMAGE": "localhost/dockerami/worker:test",
        "FLEET_INSTANCE_TYPE": "t3.micro", "FLEET_ANONYMOUS_CONTROL": "1",
    }


#: Python appended to multimaster.cfg.example by tests and benches that need masters to
#: differ (the example's builder is on every master, so any master may take its
#: requests). FLEET_OWN_BUILDER names a builder only this master has, on its pool's
#: workers, forced by the scheduler 'force-<name>', running FLEET_OWN_COMMAND: a request
#: for it waits for this master. FLEET_IGNORE_FREED_MESSAGES=1 moves this master's
#: freed-slot messages to a routing key the others do not use, both ways: it hears none
#: of theirs (only its periodic pass finds slots freed elsewhere: what the message
#: buys), and they hear none of its (theirs find its freed slots at their passes).
#: FLEET_SYNC_INTERVAL=SECONDS sets this master's periodic pass (3600: none in a test's
#: time, so only a message can tell it of a slot freed elsewhere).
OWN_BUILDER = """
# -- appended by tests/services.py OWN_BUILDER (tests and benches only) --
if env('FLEET_OWN_BUILDER'):
    c['builders'].append(util.BuilderConfig(
        name=env('FLEET_OWN_BUILDER'), workernames=[w.name for w in c['workers']],
        factory=util.BuildFactory([steps.ShellCommand(
            name='run', command=['sh', '-c', env('FLEET_OWN_COMMAND', 'true')])])))
    c['schedulers'].append(schedulers.ForceScheduler(
        name='force-' + env('FLEET_OWN_BUILDER'), builderNames=[env('FLEET_OWN_BUILDER')]))
from buildbot_dockerami.fleet import multimaster as _multimaster
if env('FLEET_IGNORE_FREED_MESSAGES') == '1':
    _multimaster.FREED = ('dockerami', 'freed-unheard')
if env('FLEET_SYNC_INTERVAL'):
    _multimaster.SYNC_INTERVAL = float(env('FLEET_SYNC_INTERVAL'))
"""
