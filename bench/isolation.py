"""Benchmark: time from one build's end to the next build's start on one worker.

Compares, on a real Docker engine through the local cloud (zero simulated boot time):
  container  isolation='container': a fresh container per build on a kept instance
  instance   isolation='instance':  a fresh instance (bootstrap + container) per build
  none       no isolation:          the same worker process serves every build

Each mode queues BUILDS builds on a single worker. Every build has a first step that
prints the time it starts and a last step that prints the time it ends (both read on
the build machine); the gap is next-start minus previous-end, so it covers the master
finishing a build, recycling the container or instance, and starting the next build.

Reproduce (as root, on Debian, from the repository):
    sudo dev/engine                       # Docker engine, registry package, base image
    ./dev/test -k nothing -q              # only to create .venv (or: . dev/venv.sh test)
    .venv/bin/python -m bench.isolation [--builds 21] [--modes container,instance,none]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import docker

from buildbot_dockerami.localcloud import LocalCloud
from buildbot_dockerami.localcloud.containers import ContainerRuntime
from tests.docker_support import BASE_IMAGE, Registry, remove_repository
from tests.harness import BIN, REPO, SUCCESS, Master, master_cfg

STAMPS = """
c['builders'][0].factory = util.BuildFactory([
    steps.ShellCommand(name='start', command=['sh', '-c', 'echo stamp-start=$(date +%s.%N)']),
    steps.ShellCommand(name='end', command=['sh', '-c', 'echo stamp-end=$(date +%s.%N)']),
])
"""
ISOLATION = {"container": "isolation='container',", "instance": "isolation='instance',",
             "none": ""}


def stamp(master: Master, buildid: int, step: str) -> float:
    text = master.step_log(buildid, step)
    return float(re.search(rf"stamp-{step}=(\d+\.\d+)", text).group(1))


def build_image(registry: Registry) -> str:
    repo = f"{registry.address}/dockerami/worker-linux"
    cli = str(BIN / "buildbot-dockerami")
    built = subprocess.run([cli, "image", "build", str(REPO / "images" / "worker-linux"),
                            "--repo", repo, "--base", BASE_IMAGE, "--wheels"],
                           capture_output=True, text=True, check=True)
    tag = built.stdout.strip().splitlines()[-1]
    subprocess.run([cli, "image", "push", tag], capture_output=True, check=True)
    return tag


def measure(mode: str, image: str, builds: int, root: Path) -> list[float]:
    state = root / f"cloud-{mode}"
    with LocalCloud(state_dir=state, runtime=ContainerRuntime(state / "instances")) as cloud:
        master = Master(root, f"master-{mode}", cloud.env())
        config = master_cfg(image=image, build_wait_timeout=60, worker_extra=ISOLATION[mode])
        master.write_config(config + STAMPS)
        master.start()
        try:
            requests = [master.force() for _ in range(builds)]
            done = [master.wait_request(brid, 600) for brid in requests]
            failed = [b for b in done if b["results"] != SUCCESS]
            if failed:
                raise SystemExit(f"{mode}: {len(failed)} builds failed; see {master.log_path}")
            ordered = sorted(done, key=lambda b: stamp(master, b["buildid"], "start"))
            return [
                stamp(master, nxt["buildid"], "start") - stamp(master, prev["buildid"], "end")
                for prev, nxt in itertools.pairwise(ordered)
            ]
        finally:
            master.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--builds", type=int, default=21, help="builds per mode (gaps = n-1)")
    parser.add_argument("--modes", default="container,instance,none")
    args = parser.parse_args()
    try:
        docker.from_env().images.get(BASE_IMAGE)
    except docker.errors.DockerException as e:
        print(f"needs a Docker engine and {BASE_IMAGE}: run sudo dev/engine ({e})")
        return 1
    root = Path(tempfile.mkdtemp(prefix="dockerami-bench-"))
    registry = Registry(root / "registry").start()
    try:
        image = build_image(registry)
        print(f"# build end -> next build start, one worker, {args.builds} builds per mode")
        print(f"# {datetime.date.today()}, {platform.node()}, {platform.processor() or ''} "
              f"{os.cpu_count()} "
              f"cores, Python {platform.python_version()}")
        print(f"{'mode':<10} {'median':>8} {'p90':>8} {'min':>8} {'max':>8} {'stdev':>8}  (s)")
        for mode in args.modes.split(","):
            gaps = sorted(measure(mode, image, args.builds, root))
            p90 = gaps[min(len(gaps) - 1, round(0.9 * (len(gaps) - 1)))]
            print(f"{mode:<10} {statistics.median(gaps):8.2f} {p90:8.2f} {gaps[0]:8.2f} "
                  f"{gaps[-1]:8.2f} {statistics.pstdev(gaps):8.2f}", flush=True)
    finally:  # the image (~450 MB), its instances' containers, the registry, root
        remove_repository(docker.from_env(), f"{registry.address}/")
        registry.stop()
        shutil.rmtree(root, ignore_errors=True)
    print("# reproduce: .venv/bin/python -m bench.isolation  (see bench/isolation.py)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
