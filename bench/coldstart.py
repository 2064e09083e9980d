"""Benchmark: time from forcing one build to the build running, per cold-start path,
on the local cloud with EC2-like delays (see bench/README.md for why these).

Paths, each measured ROUNDS times on one master per kind:
  full pull    RunInstances; boot; the image is pulled (PULL s); the worker starts
  baked image  RunInstances; boot; the image is already in the AMI (no pull)
  stopped pool this plugin with idle_action='stop': the idle instance is stopped, the
               next build starts it again (fresh credential, StartInstances; START s,
               no pull)
  stopped      the local cloud's StartInstances path driven directly (a static
               buildbot worker on an instance the bench stops and starts): the floor

Reproduce:
    .venv/bin/python -m bench.coldstart [--rounds 2] [--kinds dockerami,ec2]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from bench import burst
from bench.burst import (
    BUILDER,
    HEADER,
    IMAGE,
    PASSWORD,
    WORKERS,
    retrying,
    wait_build,
)
from buildbot_dockerami.localcloud import Delays, LocalCloud
from buildbot_dockerami.localcloud.hypervisor import ProcessRuntime
from tests.harness import SUCCESS, Master, wait_for

#: EC2-like seconds (bench/README.md): pending, launch -> bootstrap, pull of a ~1 GB
#: image, stopped -> bootstrap.
PENDING, BOOT, PULL, START = 12.0, 30.0, 45.0, 18.0

STATIC = """
from buildbot.plugins import worker as _worker
c['workers'].append(_worker.Worker('static', %(password)r))
c['builders'].append(util.BuilderConfig(
    name='static', workernames=['static'],
    factory=util.BuildFactory([steps.ShellCommand(
        name='run', command=['sh', '-c', 'echo stamp=$(date +%%s.%%N)'])])))
c['schedulers'].append(schedulers.ForceScheduler(name='force-static', builderNames=['static']))
"""


def config(kind: str) -> str:
    pool = kind == "pool"
    kind = "dockerami" if pool else kind
    workers = WORKERS[kind].replace("%(image)r", repr(IMAGE)).replace("%(image)s", IMAGE)
    workers = workers.replace("%(password)r", repr(PASSWORD)).replace("%(password)s", PASSWORD)
    workers = workers.replace("%(idle)r", "1").replace("%%s", "%s")
    if pool:
        workers = workers.replace("max_builds=1)", "max_builds=1, idle_action='stop')")
    return HEADER + workers + BUILDER + STATIC % {"password": PASSWORD}


def master_env(cloud_env: dict[str, str], ami: str) -> dict[str, str]:
    """burst's env for one worker: the config is burst's, so is every variable it reads."""
    return burst.master_env(cloud_env, ami, 1)


def force_and_time(master: Master, builder: str, scheduler: str,
                   then: object = None) -> float:
    """Seconds from the force to the build's command running on the worker."""
    wall0 = time.time()
    brid = retrying(lambda: master.force(builder, scheduler), 1)
    if callable(then):
        then()
    build = wait_build(master, brid, 600)
    if build["results"] != SUCCESS:
        raise SystemExit(f"build {build['buildid']} failed; see {master.log_path}")
    text = retrying(lambda: master.step_log(build["buildid"], "run"))
    stamp = re.search(r"stamp=(\d+\.\d+)", text)
    assert stamp, "no stamp in the build's log"
    return float(stamp.group(1)) - wall0


def instances_gone(cloud: LocalCloud) -> bool:
    states = [i["State"]["Name"] for r in cloud.client().describe_instances()["Reservations"]
              for i in r["Instances"]]
    return all(s in ("terminated", "stopped") for s in states)


def connected(master: Master, name: str) -> bool:
    worker = next(w for w in retrying(lambda: master.get("workers")) if w["name"] == name)
    return bool(worker["connected_to"])


def stopped_path(cloud: LocalCloud, master: Master, rounds: int) -> list[float]:
    ec2 = cloud.client()
    host_port = master.env["DOCKERAMI_MASTER_ADDRESS"]
    answer = ec2.run_instances(ImageId=cloud.base_ami_id, MinCount=1, MaxCount=1,
                               InstanceType="t3.micro",
                               UserData=f"static {PASSWORD} {host_port}\n{IMAGE}")
    iid = answer["Instances"][0]["InstanceId"]
    times = []
    try:
        wait_for(lambda: connected(master, "static"), BOOT + PULL + 60, "the static worker")
        for _ in range(rounds):
            ec2.stop_instances(InstanceIds=[iid])
            wait_for(lambda: not connected(master, "static"), 60, "the worker to go")
            times.append(force_and_time(
                master, "static", "force-static",
                lambda: ec2.start_instances(InstanceIds=[iid])))
    finally:
        ec2.terminate_instances(InstanceIds=[iid])
    return times


def run_kind(kind: str, cloud: LocalCloud, root: Path, rounds: int,
             paths: list[str]) -> dict[str, list[float]]:
    env = master_env(cloud.env(), cloud.base_ami_id)
    master = Master(root, f"master-{kind}", env)
    master.write_config(config(kind))
    master.start(timeout=600)
    results: dict[str, list[float]] = {}
    try:
        master.builder_id("burst")
        time.sleep(2)
        for path in paths:
            if path == "stopped":
                results[path] = stopped_path(cloud, master, rounds)
                continue
            if path == "stopped pool":
                cloud.delays.default_pull = 0.0
                force_and_time(master, "burst", "force")  # launches; stopped when idle
                results[path] = []
                for _ in range(rounds):
                    wait_for(lambda: instances_gone(cloud), 120, "the instance to stop",
                             interval=1)
                    results[path].append(force_and_time(master, "burst", "force"))
                continue
            cloud.delays.default_pull = PULL if path == "full pull" else 0.0
            results[path] = []
            for _ in range(rounds):
                results[path].append(force_and_time(master, "burst", "force"))
                wait_for(lambda: instances_gone(cloud), 120, "the instance to end",
                         interval=1)
    except requests.RequestException as e:
        raise SystemExit(f"{kind}: {e}; see {master.log_path}") from e
    finally:
        master.stop(timeout=120)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--kinds", default="dockerami,pool,ec2",
                        help="dockerami, pool (dockerami with idle_action='stop'), ec2")
    parser.add_argument("--dir", default="/dev/shm" if Path("/dev/shm").is_dir() else None,
                        help="where the masters live (default /dev/shm, see burst.py)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dockerami-coldstart-", dir=args.dir))
    delays = Delays(pending=PENDING, boot=BOOT, start=START)
    runtime = ProcessRuntime(root / "cloud" / "instances", idle_priority=True)
    load = subprocess.run(["uptime"], check=False, capture_output=True, text=True).stdout
    print(f"# cold starts: pending {PENDING:g} s, boot {BOOT:g} s, pull {PULL:g} s, "
          f"start from stopped {START:g} s; {args.rounds} rounds; "
          f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
          f"{os.cpu_count()} cores")
    print(f"# load before: {load.strip()}")
    print(f"{'kind':<10} {'path':<12} {'median':>7} {'min':>7} {'max':>7}  "
          "force -> build running (s)")
    try:
        with LocalCloud(state_dir=root / "cloud", runtime=runtime, delays=delays) as cloud:
            for kind in args.kinds.split(","):
                # buildbot's EC2LatentWorker cannot start a stopped instance.
                stopped = ["stopped"] if kind == "dockerami" else []
                paths = (["stopped pool"] if kind == "pool"
                         else ["full pull", "baked image", *stopped])
                for path, times in run_kind(kind, cloud, root, args.rounds, paths).items():
                    label = {"stopped": "static+Start", "stopped pool": "dockerami"}.get(path, kind)
                    print(f"{label:<10} {path:<12} {statistics.median(times):7.1f} "
                          f"{min(times):7.1f} {max(times):7.1f}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)  # the masters' and instances' dirs
    load = subprocess.run(["uptime"], check=False, capture_output=True, text=True).stdout
    print(f"# load after: {load.strip()}")
    print("# reproduce: .venv/bin/python -m bench.coldstart  (see bench/coldstart.py)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
