"""Benchmark: N builds forced at once on N latent workers, this plugin vs buildbot's
EC2LatentWorker, on one honest local cloud in one run.

The local cloud keeps each instance ``pending`` for PENDING seconds and starts its
worker BOOT (+ PULL) seconds after RunInstances, every instance in parallel (the
worker processes are prepared ahead under SCHED_IDLE, so their start-up CPU does not
take the master's cores: on EC2 it is other machines'; "machines late" says how far
after their due time the slowest actually started). Each kind gets its own real
buildbot master (subprocess) with N workers and one builder; N force requests are
sent at once. Each build's command prints the time it starts on the worker.

Printed per kind: last build running and last build finished, from the first force,
divided by the boot delay (what a build waits, in boots); EC2 calls by action (the
master's access key only); the reactor's lateness (a 10 ms LoopingCall inside the
master, injected through master.cfg, max and p99 over the burst); full garbage
collections during the burst; master CPU seconds and peak RSS; whether every build
succeeded and every instance ended terminated.

Reproduce (from the repository, with the project's .venv):
    .venv/bin/python -m bench.burst [--workers 50] [--boot 20] [--api 0]
                                    [--kinds dockerami,ec2] [--settle 12]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import requests

from buildbot_dockerami.localcloud import LOCAL_ACCESS_KEY, Delays, LocalCloud
from buildbot_dockerami.localcloud.hypervisor import ProcessRuntime
from tests.harness import SUCCESS, Master, wait_for
from tests.services import Postgres

T = TypeVar("T")
PASSWORD = "bench-password"
IMAGE = "localhost/dockerami/worker:bench"

#: Injected into every bench master.cfg: the reactor probe, GC pauses, ms log stamps.
PROBE = """
import gc as _gc, time as _time
from twisted.internet import reactor as _reactor, task as _task
from twisted.python.log import FileLogObserver as _FLO
_FLO.timeFormat = '%Y-%m-%d %H:%M:%S.%f'
if not getattr(_reactor, '_bench_probe', None):
    _out = open('probe.txt', 'w')
    _last = [_time.monotonic()]
    def _tick():
        now = _time.monotonic()
        _out.write('%.3f %.2f\\n' % (_time.time(), (now - _last[0] - 0.01) * 1000))
        _last[0] = now
    _gc_start = {}
    def _gc_cb(phase, info):
        if phase == 'start':
            _gc_start[0] = _time.perf_counter()
        elif info['generation'] == 2:
            _out.write('gc %.3f %.2f %d\\n' % (_time.time(),
                       (_time.perf_counter() - _gc_start.get(0, _time.perf_counter())) * 1000,
                       info['collected']))
    _gc.callbacks.append(_gc_cb)
    _reactor._bench_probe = _task.LoopingCall(_tick)
    _reactor.callWhenRunning(_reactor._bench_probe.start, 0.01)
    _reactor.addSystemEventTrigger('before', 'shutdown', _out.flush)
"""

HEADER = """\
import os
from buildbot.plugins import schedulers, steps, util
c = BuildmasterConfig = {}
c['title'] = 'burst'
c['buildbotURL'] = 'http://127.0.0.1:%s/' % os.environ['BUILDBOT_WWW_PORT']
c['protocols'] = {'pb': {'port': 'tcp:%s:interface=127.0.0.1' % os.environ['BUILDBOT_PB_PORT']}}
c['www'] = {'port': 'tcp:%s:interface=127.0.0.1' % os.environ['BUILDBOT_WWW_PORT'],
            'plugins': {}}
c['db'] = {'db_url': os.environ.get('BENCH_DB_URL', 'sqlite:///state.sqlite')}
c['buildbotNetUsageData'] = None
c['collapseRequests'] = False
N = int(os.environ['BENCH_WORKERS'])
MASTER = os.environ['DOCKERAMI_MASTER_ADDRESS']
"""

WORKERS = {
    "dockerami": """
from buildbot_dockerami import DockerAMILatentWorker
c['workers'] = [DockerAMILatentWorker(
    'w%d' % i, image=%(image)r, ami=os.environ['BENCH_AMI'], instance_type='t3.micro',
    master_address=MASTER, build_wait_timeout=%(idle)r, missing_timeout=600,
    launch_on_request=os.environ['BENCH_LAUNCH_ON_REQUEST'] == '1', max_builds=1)
    for i in range(N)]
""",
    "ec2": """
from buildbot.worker.ec2 import EC2LatentWorker
c['workers'] = [EC2LatentWorker(
    'w%d' % i, %(password)r, 't3.micro', ami=os.environ['BENCH_AMI'],
    keypair_name='bench', security_name='default', region='us-east-1',
    user_data='w%d %(password)s %%s\\n%(image)s' % (i, MASTER),
    build_wait_timeout=%(idle)r, missing_timeout=600, max_builds=1) for i in range(N)]
""",
}

BUILDER = """
c['builders'] = [util.BuilderConfig(
    name='burst', workernames=[w.name for w in c['workers']],
    factory=util.BuildFactory([steps.ShellCommand(
        name='run', command=['sh', '-c', 'echo stamp=$(date +%s.%N); sleep 1'])]))]
c['schedulers'] = [schedulers.ForceScheduler(name='force', builderNames=['burst'])]
"""


def master_config(kind: str, idle: float) -> str:
    workers = WORKERS[kind].replace("%(image)r", repr(IMAGE)).replace("%(image)s", IMAGE)
    workers = workers.replace("%(password)r", repr(PASSWORD)).replace("%(password)s", PASSWORD)
    workers = workers.replace("%(idle)r", repr(idle)).replace("%%s", "%s")
    return HEADER + PROBE + workers + BUILDER


@dataclass
class Result:
    kind: str
    running: list[float] = field(default_factory=list)  # per build, from t0
    finished: float = 0.0
    calls: Counter = field(default_factory=Counter)
    lateness: list[float] = field(default_factory=list)
    gc_pauses: list[float] = field(default_factory=list)
    cpu: float = 0.0
    peak_rss_mb: float = 0.0
    all_success: bool = False
    all_terminated: bool = False
    force_seconds: float = 0.0
    machines_late: float = 0.0
    #: Per build: from its worker connecting (master log) to its command running.
    after_connect: list[float] = field(default_factory=list)
    #: The same gap in phases, per build: PHASES name them.
    phases: dict[str, list[float]] = field(default_factory=dict)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    match = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) / 1024 if match else 0.0


def machines_late(instances: Path, skip: set[str]) -> float:
    """Seconds the latest worker process started after its due time."""
    late = 0.0
    for directory in instances.iterdir():
        tac, booted = directory / "buildbot.tac", directory / "booted_at"
        if directory.name in skip or not booted.exists():
            continue
        due = float(tac.read_text().split("time.sleep(max(0.0, ")[1].split(" - ")[0])
        late = max(late, float(booted.read_text()) - due)
    return late


def master_calls(cloud: LocalCloud) -> Counter:
    with cloud.faults._lock:
        return Counter({action: n for (key, action), n in cloud.faults.calls.items()
                        if key == LOCAL_ACCESS_KEY})


def retrying(call: Callable[[], T], attempts: int = 5) -> T:
    """A REST call to a master under load: a slow or garbled answer is asked again."""
    for attempt in range(attempts):
        try:
            return call()
        except requests.RequestException:
            if attempt == attempts - 1:
                raise
            time.sleep(2)
    raise AssertionError("unreachable")


def wait_build(master: Master, brid: int, timeout: float) -> dict:
    def done() -> dict | None:
        assert master.process is not None and master.process.poll() is None, \
            "the master stopped"
        try:
            request = master.get(f"buildrequests/{brid}")[0]
            return master.builds_for(brid)[-1] if request["complete"] else None
        except (requests.Timeout, requests.ConnectionError):
            # Not an answer yet: buildbot's REST API writes its answers from the
            # reactor's thread pool, which EC2LatentWorker fills with boot waits.
            return None
    return wait_for(done, timeout, f"build request {brid}", interval=1)


def master_env(cloud_env: dict[str, str], ami: str, workers: int, *,
               db_url: str | None = None, launch_on_request: bool = False) -> dict[str, str]:
    """Every BENCH_* variable master_config() reads (tests/test_bench.py loads it so)."""
    env = {**cloud_env, "BENCH_WORKERS": str(workers), "BENCH_AMI": ami,
           "BENCH_LAUNCH_ON_REQUEST": "1" if launch_on_request else "0"}
    if db_url:
        env["BENCH_DB_URL"] = db_url
    return env


def run_kind(kind: str, cloud: LocalCloud, root: Path, workers: int, idle: float, *,
             profile: float = 0.0, db_url: str | None = None,
             launch_on_request: bool = False, settle: float = 12.0) -> Result:
    env = master_env(cloud.env(), cloud.base_ami_id, workers, db_url=db_url,
                     launch_on_request=launch_on_request)
    master = Master(root, f"master-{kind}", env)
    master.write_config(master_config(kind, idle))
    master.start(timeout=600)  # 50 EC2LatentWorkers each make boto3 sessions at load
    result = Result(kind)
    assert master.process is not None
    pid = master.process.pid
    runtime = cloud.runtime
    assert isinstance(runtime, ProcessRuntime)
    try:
        master.builder_id("burst")
        started = time.monotonic()
        runtime.warm(workers)  # the workers' imports, before the burst (see ProcessRuntime)
        # start-up done: first reconciler pass, EC2 client, heap frozen (--settle 0: a
        # burst at start-up, as when a master restarts with build requests queued)
        time.sleep(max(0.0, settle - (time.monotonic() - started)))
        calls_before = master_calls(cloud)
        instances = cloud.state_dir / "instances"
        instances.mkdir(parents=True, exist_ok=True)
        old_instances = {d.name for d in instances.iterdir()}
        if profile:
            # Collapsed stacks (flamegraph input) of the master's first PROFILE seconds.
            spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
            subprocess.Popen([spy, "record", "--pid", str(pid), "--rate", "100",
                              "--format", "raw", "--duration", str(int(profile)),
                              "--output", str(root / f"profile-{kind}.txt"),
                              # e.g. "--gil --threads": who holds the GIL, per thread
                              *os.environ.get("BENCH_PYSPY_ARGS", "").split()],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cpu_before = cpu_seconds(pid)
        client = subprocess.Popen(
            [sys.executable, "-m", "bench.force", master.api,
             str(master.builder_id("burst")), str(workers)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        time.sleep(2)  # its imports done before the clock starts
        wall0 = time.time()
        assert client.stdin is not None
        client.stdin.write("go\n")
        client.stdin.flush()
        out, _ = client.communicate(timeout=900)
        forced = json.loads(out)
        brids, result.force_seconds = forced["brids"], forced["seconds"]
        deadline = time.monotonic() + 900
        builds = [wait_build(master, brid, max(1.0, deadline - time.monotonic()))
                  for brid in brids]
        result.finished = max(b["complete_at"] for b in builds) - wall0
        result.cpu = cpu_seconds(pid) - cpu_before
        result.all_success = all(b["results"] == SUCCESS for b in builds)
        names = {w["workerid"]: w["name"] for w in master.get("workers")}
        stamps = worker_stamps(master.log())
        for build in builds:
            text = retrying(lambda b=build: master.step_log(b["buildid"], "run"))
            match = re.search(r"stamp=(\d+\.\d+)", text)
            if match:
                result.running.append(float(match.group(1)) - wall0)
                seen = {**stamps.get(names.get(build["workerid"], ""), {}),
                        "running": float(match.group(1))}
                if "attached" in seen:
                    result.after_connect.append(seen["running"] - seen["attached"])
                for (start, end) in PHASES:
                    if start in seen and end in seen:
                        result.phases.setdefault(f"{start} -> {end}", []).append(
                            seen[end] - seen[start])
        ec2 = cloud.client()

        def all_gone() -> bool:
            states = [i["State"]["Name"] for r in ec2.describe_instances()["Reservations"]
                      for i in r["Instances"]]
            return all(s == "terminated" for s in states)

        try:
            wait_for(all_gone, idle + 120, "every instance to be terminated", interval=1)
            result.all_terminated = True
        except AssertionError:
            result.all_terminated = False
        result.calls = master_calls(cloud) - calls_before
        result.machines_late = machines_late(instances, old_instances)
        result.peak_rss_mb = peak_rss_mb(pid)
        wall_end = wall0 + result.finished
    finally:
        runtime.discard_spares()
        stopped = master.stop(timeout=120)
    if not stopped:
        print(f"# {kind}: master did not stop cleanly; see {master.log_path}")
    for line in (master.basedir / "probe.txt").read_text().splitlines():
        parts = line.split()
        if parts[0] == "gc":
            if wall0 <= float(parts[1]) <= wall_end:
                result.gc_pauses.append(float(parts[2]))
        elif len(parts) == 2 and wall0 <= float(parts[0]) <= wall_end:
            result.lateness.append(float(parts[1]))
    return result


#: What the master logs, per worker, between its connection and its build's command.
STAMPS = {
    "login": r"worker '(\S+)' attaching from",
    "attached": r"Worker (\S+) attached to burst$",
    "ping": r"pinging the worker <\S+ builder='burst' worker='(\S+)'",
}
PHASES = [("login", "attached"), ("attached", "ping"), ("ping", "running")]


def worker_stamps(log: str) -> dict[str, dict[str, float]]:
    """For each worker's last attachment, from the master's log (local time, ms): the
    login before it, the attachment, and the ping for its build after it (a worker may
    log in again later, e.g. when its instance ends, and be refused)."""
    events: dict[str, list[tuple[float, str]]] = {}
    for what, pattern in STAMPS.items():
        for stamp, name in re.findall(rf"^(\S+ \S+) \[.*?\] .*?{pattern}", log, re.M):
            events.setdefault(name, []).append((datetime.datetime.strptime(
                stamp, "%Y-%m-%d %H:%M:%S.%f").timestamp(), what))
    times: dict[str, dict[str, float]] = {}
    for name, seen in events.items():
        attached = max((t for t, what in seen if what == "attached"), default=None)
        if attached is None:
            continue
        times[name] = {"attached": attached}
        logins = [t for t, what in seen if what == "login" and t <= attached]
        pings = [t for t, what in seen if what == "ping" and t >= attached]
        if logins:
            times[name]["login"] = max(logins)
        if pings:
            times[name]["ping"] = min(pings)
    return times


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


def report(result: Result, boot: float, workers: int) -> None:
    running = max(result.running) if result.running else float("nan")
    ok = len(result.running) == workers and result.all_success and result.all_terminated
    calls = ", ".join(f"{a} {n}" for a, n in sorted(result.calls.items()))
    print(f"{result.kind:<10} last running {running:6.1f} s = {running / boot:4.2f}x boot | "
          f"last finished {result.finished:6.1f} s = {result.finished / boot:4.2f}x | "
          f"first running {min(result.running or [0]):5.1f} s")
    print(f"{'':<10} reactor lateness max {max(result.lateness or [0]):7.1f} ms, "
          f"p99 {percentile(result.lateness, 0.99):6.1f} ms; full GCs {len(result.gc_pauses)}"
          f" (longest {max(result.gc_pauses or [0]):.0f} ms)")
    print(f"{'':<10} master CPU {result.cpu:5.1f} s, peak RSS {result.peak_rss_mb:5.0f} MB; "
          f"forcing took {result.force_seconds:.1f} s; machines late <= "
          f"{result.machines_late:.1f} s")
    gap = result.after_connect
    print(f"{'':<10} worker connected -> its build running: median "
          f"{percentile(gap, 0.5):.2f} s, p90 {percentile(gap, 0.9):.2f} s, max "
          f"{max(gap or [float('nan')]):.2f} s ({len(gap)} builds)")
    for phase, values in result.phases.items():
        print(f"{'':<10}   {phase:<18} median {percentile(values, 0.5):.2f} s, "
              f"max {max(values):.2f} s")
    print(f"{'':<10} EC2 calls: {calls}")
    print(f"{'':<10} all {workers} builds SUCCESS and every instance terminated: "
          f"{'yes' if ok else 'NO'}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=50, help="builds and workers (N)")
    parser.add_argument("--boot", type=float, default=20.0,
                        help="seconds from RunInstances to the worker starting")
    parser.add_argument("--pending", type=float, default=None,
                        help="seconds an instance is 'pending' (default: half the boot)")
    parser.add_argument("--api", type=float, default=0.0, metavar="SECONDS",
                        help="how long EC2 takes to answer each call (the local cloud's "
                             "api delay; default 0: moto's own time)")
    parser.add_argument("--kinds", default="dockerami,ec2",
                        help="dockerami (this plugin), ec2 (buildbot's EC2LatentWorker)")
    parser.add_argument("--idle", type=float, default=5.0,
                        help="build_wait_timeout: idle seconds before termination")
    parser.add_argument("--dir", default="/dev/shm" if Path("/dev/shm").is_dir() else None,
                        help="where the masters (and their SQLite databases) live "
                             "(default /dev/shm)")
    parser.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite",
                        help="buildbot's database: SQLite (the default master) or a "
                             "PostgreSQL cluster started on 127.0.0.1 (Debian's package)")
    parser.add_argument("--launch-on-request", action="store_true",
                        help="this plugin's launch_on_request=True (default: launch when "
                             "buildbot hands a build out)")
    parser.add_argument("--profile", type=float, default=0.0, metavar="SECONDS",
                        help="py-spy the master for this long from the first force "
                             "(collapsed stacks in profile-KIND.txt; needs py-spy)")
    parser.add_argument("--settle", type=float, default=12.0, metavar="SECONDS",
                        help="seconds from the master's start to the burst (0: at start-up)")
    args = parser.parse_args()
    pending = args.boot / 2 if args.pending is None else args.pending
    # On tmpfs by default: buildbot's SQLite commits (several fsyncs per transaction,
    # one transaction at a time) otherwise measure this VM's disk, not the masters.
    root = Path(tempfile.mkdtemp(prefix="dockerami-burst-", dir=args.dir))
    delays = Delays(pending=pending, boot=args.boot, api=args.api)
    runtime = ProcessRuntime(root / "cloud" / "instances", idle_priority=True)
    load = subprocess.run(["uptime"], check=False, capture_output=True, text=True).stdout.strip()
    print(f"# burst: {args.workers} builds at once, boot {args.boot:g} s (pending "
          f"{pending:g} s, EC2 answers {args.api:g} s), "
          f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, "
          f"{platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"# load before: {load}")
    print(f"# burst {args.settle:g} s after the masters' start")
    print(f"# database: {args.db}; this plugin launches "
          f"{'on request' if args.launch_on_request else 'when buildbot hands a build out'}")
    postgres = Postgres().start() if args.db == "postgresql" else None
    try:
        if postgres is not None:
            postgres.make_template(Path(sys.executable).parent / "buildbot")
        with LocalCloud(state_dir=root / "cloud", runtime=runtime, delays=delays) as cloud:
            for kind in args.kinds.split(","):
                result = run_kind(
                    kind, cloud, root, args.workers, args.idle, profile=args.profile,
                    db_url=postgres.new_database() if postgres is not None else None,
                    launch_on_request=args.launch_on_request, settle=args.settle)
                report(result, args.boot, args.workers)
    finally:
        if postgres is not None:
            postgres.stop()
    load = subprocess.run(["uptime"], check=False, capture_output=True, text=True).stdout.strip()
    print(f"# load after: {load}")
    print(f"# masters' logs and probe.txt under {root}")
    print("# reproduce: .venv/bin/python -m bench.burst  (see bench/burst.py)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
