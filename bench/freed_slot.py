"""How soon a pool slot freed on one master reaches a build waiting on another.

Two real masters on buildbot's multi-master engine (a PostgreSQL cluster and a
Crossbar.io router on 127.0.0.1, as tests/test_multimaster.py starts them; see
dev/multimaster), both running multimaster.cfg.example, and one local cloud (moto EC2
+ the process runtime: each instance's worker is a buildbot-worker process here, no
boot delay). The pool's shared cap is 1, its idle timeout 0.

Each master also has a builder only it has (tests/services.py OWN_BUILDER, appended to
the example): A's build holds the one instance until the bench lets it end; a build
forced on B's builder can only be built by B, so it waits at the cap. Then A's build
ends, A terminates its instance, and B launches one for the waiting build. Measured,
per run, on one clock (this machine's):

  t0  A's TerminateInstances of its instance, as the local cloud saw it arrive
      ("the instance ended", as the operator sees it in EC2)
  t1  B's RunInstances for the waiting build, as the local cloud saw it arrive
  t2  B's build running: its first command's start, stamped on the build machine
      (buildbot's REST ``started_at`` has whole seconds only)

Modes: ``message`` (as shipped: A says so over the message queue, B reads the rows at
once) and ``pass`` (B deaf to the message, FLEET_IGNORE_FREED_MESSAGES=1, which also
keeps B's own messages from A: only B's periodic pass, every multimaster.SYNC_INTERVAL
seconds, finds the slot; nothing waits on B's messages).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from buildbot_dockerami.fleet import multimaster
from buildbot_dockerami.localcloud import LocalCloud
from tests.harness import BIN, SUCCESS, Master, wait_for
from tests.helpers import live
from tests.services import MULTIMASTER_CFG, OWN_BUILDER, Crossbar, Postgres, fleet_env


@dataclass
class Run:
    go: float  # the bench lets A's build end
    t0: float  # A's TerminateInstances arrives
    t1: float  # B's RunInstances arrives
    t2: float  # B's build's first command starts
    started_at: int  # B's build, buildbot's REST started_at (whole seconds)
    heard: float  # B's dockerami_freed_slot_messages_total after the run


def stamp(log: str) -> float | None:
    """The first ``date +%s.%N`` a build's step printed."""
    for line in log.splitlines():
        try:
            return float(line.strip())
        except ValueError:
            continue
    return None


def heard(master: Master) -> float:
    for line in master.metrics().text.splitlines():
        if line.startswith("dockerami_freed_slot_messages_total"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def build_stamp(master: Master, brid: int, timeout: float) -> tuple[float, dict]:
    """When the request's build's command started (its stamp) and the build."""
    def started() -> tuple[float, dict] | None:
        builds = master.builds_for(brid)
        if not builds:
            return None
        at = stamp(master.step_log(builds[0]["buildid"]))
        return None if at is None else (at, builds[0])
    return wait_for(started, timeout, f"build request {brid} to run", interval=0.05)


def masters_for(mode: str, root: Path, cloud: LocalCloud, *, db_url: str, router: Crossbar,
                go: Path) -> tuple[Master, Master]:
    config = MULTIMASTER_CFG.read_text() + OWN_BUILDER
    common = {**fleet_env(db_url, router), "FLEET_POOL_SIZE": "1", "FLEET_IDLE": "0"}
    a = Master(root, f"{mode}-a", cloud.env())
    a.env.update({**common, "FLEET_OWN_BUILDER": "only-a",
                  "FLEET_OWN_COMMAND": f"date +%s.%N; while [ ! -e {go} ]; do sleep 0.01; done"})
    b = Master(root, f"{mode}-b", cloud.env())
    b.env.update({**common, "FLEET_OWN_BUILDER": "only-b", "FLEET_OWN_COMMAND": "date +%s.%N"})
    if mode == "pass":
        b.env["FLEET_IGNORE_FREED_MESSAGES"] = "1"
    for master in (a, b):
        master.write_config(config)
    return a, b


def one_run(a: Master, b: Master, cloud: LocalCloud, go: Path, settle: float) -> Run:
    """One run; A's build ends ``settle`` seconds after B's request was forced."""
    go.unlink(missing_ok=True)
    brid_a = a.force("only-a", "force-only-a")
    build_stamp(a, brid_a, 120)
    (held,) = [i["InstanceId"] for i in live(cloud)]
    # B has read A's instance from the shared rows (its Fleet API shows it, right after
    # one of its passes) ...
    wait_for(lambda: any(r["instance_id"] == held and not r["here"] for r in b.fleet()["fleet"]),
             30, "B to see A's instance")
    launches = cloud.faults.count("RunInstances")
    brid_b = b.force("only-b", "force-only-b")
    # ... and B's build request waits at the cap for a while: buildbot's distributor tries
    # it within milliseconds of the force; B refuses it from the rows it read (nothing
    # says so), and the checks below say it did not launch.
    time.sleep(settle)
    assert not b.builds_for(brid_b), "B's build started past the cap of 1"
    assert cloud.faults.count("RunInstances") == launches, "a launch past the cap"
    went = time.time()
    go.touch()
    t2, build = build_stamp(b, brid_b, 120)
    assert a.wait_request(brid_a, 60)["results"] == SUCCESS
    assert b.wait_request(brid_b, 60)["results"] == SUCCESS
    (t0,) = [c.at for c in cloud.faults.timeline("TerminateInstances", held)][:1]
    t1 = next(c.at for c in cloud.faults.timeline("RunInstances", ok=True) if c.at >= went)
    wait_for(lambda: not live(cloud), 60, "B's instance to end (idle timeout 0)")
    return Run(went, t0, t1, t2, int(build["started_at"]), heard(b))


def run_mode(mode: str, runs: int, *, root: Path, cloud: LocalCloud, postgres: Postgres,
             router: Crossbar, settle: float) -> list[Run]:
    go = root / f"go-{mode}"
    a, b = masters_for(mode, root, cloud, db_url=postgres.new_database(), router=router, go=go)
    try:
        a.start(timeout=180)
        assert a.control(action="set_pool", pool="linux", cap=1).status_code == 200
        b.start(timeout=180)
        wait_for(lambda: b.fleet()["pools"]["linux"]["cap"] == 1, 30, "B to see the cap")
        # The runs end A's build at phases spread evenly over B's periodic pass (the
        # wait for B to see A's instance ends right after one of B's passes).
        results = [one_run(a, b, cloud, go,
                           settle + (i + 0.5) / runs * multimaster.SYNC_INTERVAL)
                   for i in range(runs)]
    finally:
        for master in (a, b):
            if not master.stop():
                print(f"# {master.basedir.name} did not stop cleanly; see {master.log_path}")
    return results


def report(mode: str, results: list[Run]) -> None:
    def line(what: str, values: list[float]) -> str:
        return (f"{mode:8} {what:34} median {statistics.median(values):5.2f}  "
                f"max {max(values):5.2f}  (" + " ".join(f"{v:.2f}" for v in values) + ")")

    print(line("t1-t0 terminated -> B launches", [r.t1 - r.t0 for r in results]))
    print(line("t2-t0 terminated -> B's build runs", [r.t2 - r.t0 for r in results]))
    print(line("t2-t1 B launches -> its build runs", [r.t2 - r.t1 for r in results]))
    print(line("t0-go A's build ends -> terminated", [r.t0 - r.go for r in results]))
    print(f"{mode:8} B's REST started_at - t0 (whole seconds): "
          + " ".join(f"{r.started_at - r.t0:.2f}" for r in results)
          + f"; messages B heard: {results[-1].heard:g}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per mode (default 5)")
    parser.add_argument("--modes", default="message,pass",
                        help="message (as shipped), pass (B deaf to the message)")
    parser.add_argument("--settle", type=float, default=0.5, metavar="SECONDS",
                        help="how long B's request waits at the cap before A's build ends, "
                             "plus a part of the periodic pass spread over the runs")
    parser.add_argument("--dir", default="/dev/shm" if Path("/dev/shm").is_dir() else None,
                        help="where the masters live (default /dev/shm)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dockerami-freed-", dir=args.dir))
    load = subprocess.run(["uptime"], check=False, capture_output=True, text=True).stdout.strip()
    print(f"# freed slot: 2 masters (PostgreSQL + Crossbar), cap 1, idle timeout 0, "
          f"{args.runs} runs per mode, periodic pass every {multimaster.SYNC_INTERVAL:g} s; "
          f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
          f"{os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"# load before: {load}")
    postgres, router = Postgres(), Crossbar()
    try:
        postgres.start()
        postgres.make_template(BIN / "buildbot")
        router.start()
        with LocalCloud(state_dir=root / "cloud") as cloud:
            for mode in args.modes.split(","):
                report(mode, run_mode(mode, args.runs, root=root, cloud=cloud,
                                      postgres=postgres, router=router, settle=args.settle))
    finally:
        router.stop()
        postgres.stop()
    load = subprocess.run(["uptime"], check=False, capture_output=True, text=True).stdout.strip()
    print(f"# load after: {load}")
    print(f"# masters' logs under {root}")
    print("# reproduce: dev/multimaster (once), then .venv/bin/python -m bench.freed_slot "
          "[--runs N] [--modes message,pass]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
