"""The local cloud's timing knobs, on a real moto server through boto3 (and the
fleet's EC2 threads against its answer time)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from buildbot_dockerami.cli.main import _pull_delay
from buildbot_dockerami.cloud.ec2 import Credentials, Ec2, LaunchSpec
from buildbot_dockerami.fleet.service import Fleet
from buildbot_dockerami.localcloud import LOCAL_ACCESS_KEY, Delays, LocalCloud
from buildbot_dockerami.localcloud.hypervisor import Booting, ProcessRuntime
from buildbot_dockerami.localcloud.timing import BootClock
from buildbot_dockerami.protocol import userdata
from tests.fleet_reactor import ThreadedReactor
from tests.harness import wait_for


class RecordingRuntime:
    """Plays a machine whose start takes ``start_seconds`` and notes when each began:
    a serial hypervisor would show the starts one ``start_seconds`` apart."""

    def __init__(self, start_seconds: float = 0.0) -> None:
        self.start_seconds = start_seconds
        self.started: dict[str, float] = {}
        self.images: dict[str, str] = {}
        self.stopped: list[str] = []
        self._lock = threading.Lock()

    def start(self, booting: Booting) -> None:
        with self._lock:
            self.started[booting.instance_id] = time.monotonic()
            self.images[booting.instance_id] = userdata.parse(booting.user_data).image
        time.sleep(self.start_seconds)  # the machine's own start: work, not a wait

    def stop(self, instance_id: str) -> None:
        with self._lock:
            self.started.pop(instance_id, None)
            self.stopped.append(instance_id)

    def running(self) -> list[str]:
        with self._lock:
            return list(self.started)

    def console(self, instance_id: str) -> str | None:
        return None

    def poweroff_requested(self, instance_id: str) -> bool:
        return False


def hypervisor_ticks(cloud: LocalCloud) -> list[float]:
    """A list that grows by one at the end of each of the hypervisor's passes."""
    ticks: list[float] = []
    tick = cloud.hypervisor.tick

    def counted() -> None:
        tick()
        ticks.append(time.monotonic())

    cloud.hypervisor.tick = counted  # type: ignore[method-assign]
    return ticks


def user_data(image: str, name: str = "w") -> str:
    return f"{name} secret 127.0.0.1:9\n{image}"


@pytest.fixture
def runtime() -> RecordingRuntime:
    return RecordingRuntime()


@pytest.fixture
def timed_cloud(tmp_path: Path, runtime: RecordingRuntime) -> Iterator[LocalCloud]:
    with LocalCloud(state_dir=tmp_path / "cloud", runtime=runtime, delays=Delays()) as cloud:
        yield cloud


def launch(cloud: LocalCloud, image: str = "img:1", instance_type: str = "t3.micro",
           count: int = 1) -> tuple[list[str], float]:
    """The instances and when the call was sent (a boot counts from its arrival)."""
    ec2 = cloud.client()
    sent = time.monotonic()
    answer = ec2.run_instances(ImageId=cloud.base_ami_id, MinCount=count, MaxCount=count,
                               InstanceType=instance_type, UserData=user_data(image))
    return [i["InstanceId"] for i in answer["Instances"]], sent


def state(cloud: LocalCloud, instance_id: str) -> str:
    found = cloud.client().describe_instances(InstanceIds=[instance_id])
    return found["Reservations"][0]["Instances"][0]["State"]["Name"]


def test_defaults_are_instant(timed_cloud: LocalCloud, runtime: RecordingRuntime) -> None:
    (iid,), launched = launch(timed_cloud)
    assert state(timed_cloud, iid) == "running"
    wait_for(lambda: iid in runtime.started, 5, "the worker to start")
    # No emulated delay: only this machine's own latency.
    assert runtime.started[iid] - launched < 3.0


def test_the_timeline_tells_failed_calls_apart_and_count_counts_them_all(
        timed_cloud: LocalCloud) -> None:
    timed_cloud.faults.inject("RunInstances", "InsufficientInstanceCapacity", "none left")
    with pytest.raises(ClientError, match="InsufficientInstanceCapacity"):
        launch(timed_cloud)
    (iid,), _ = launch(timed_cloud)
    assert [c.instance_ids for c in timed_cloud.faults.timeline("RunInstances", ok=True)] == [
        (iid,)]
    (failed,) = timed_cloud.faults.timeline("RunInstances", ok=False)
    assert (failed.ok, failed.instance_ids) == (False, ())
    assert len(timed_cloud.faults.timeline("RunInstances")) == 2
    assert timed_cloud.faults.count("RunInstances") == 2


def test_pending_until_the_pending_delay(timed_cloud: LocalCloud) -> None:
    timed_cloud.delays.pending = 1.5
    (iid, other), launched = launch(timed_cloud, count=2)
    assert state(timed_cloud, iid) == "pending"
    answer = timed_cloud.client().describe_instances()
    codes = {i["InstanceId"]: i["State"]["Code"] for r in answer["Reservations"]
             for i in r["Instances"]}
    assert codes == {iid: 0, other: 0}
    wait_for(lambda: state(timed_cloud, iid) == "running", 5, "running")
    assert time.monotonic() - launched >= 1.5


def test_the_hypervisor_sees_what_describe_instances_says(timed_cloud: LocalCloud) -> None:
    """It reads moto in-process (a DescribeInstances of 50 instances costs ~0.3 s of
    CPU here); what it reads must be the answer the master gets."""
    timed_cloud.delays.pending = 1.5
    ec2 = timed_cloud.client()
    (iid, other), _ = launch(timed_cloud, count=2)
    ec2.modify_instance_metadata_options(InstanceId=other, HttpTokens="required")
    ec2.terminate_instances(InstanceIds=[iid])

    def described() -> dict[str, tuple[str, str]]:
        return {i["InstanceId"]: (i["State"]["Name"], i["MetadataOptions"]["HttpTokens"])
                for r in ec2.describe_instances()["Reservations"] for i in r["Instances"]}

    read = timed_cloud.server.instance_states(timed_cloud.region)
    assert read == described() == {iid: ("terminated", "optional"),
                                   other: ("pending", "required")}
    wait_for(lambda: timed_cloud.server.instance_states(timed_cloud.region)[other][0]
             == "running", 5, "running")
    assert described()[other][0] == "running"


def test_boots_overlap(timed_cloud: LocalCloud, runtime: RecordingRuntime) -> None:
    runtime.start_seconds = 1.0  # each machine's start takes a second
    timed_cloud.delays.boot = 1.0
    ids, launched = launch(timed_cloud, count=4)
    wait_for(lambda: len(runtime.started) == 4, 10, "four workers to start")
    starts = sorted(runtime.started[i] - launched for i in ids)
    assert starts[0] >= 1.0
    # One at a time, the last would start 3 s after the first.
    assert starts[-1] - starts[0] < 2.5, starts


def test_a_boot_counts_from_the_calls_arrival(timed_cloud: LocalCloud) -> None:
    """moto handles calls one at a time; EC2 handles a burst's RunInstances in
    parallel, so an answer delayed behind other calls does not delay the boot."""
    timed_cloud.faults.delay("RunInstances", 1.0)
    (iid,), sent = launch(timed_cloud)
    boot = timed_cloud.server.faults.clock.boot(iid)
    assert boot is not None and boot.at - sent < 0.5, boot.at - sent


def test_answers_take_the_api_delay_in_parallel(timed_cloud: LocalCloud) -> None:
    timed_cloud.delays.api = 1.0
    clients = [timed_cloud.client() for _ in range(4)]
    took: list[float] = []

    def call(ec2: Any) -> None:
        sent = time.monotonic()
        ec2.describe_instances()
        took.append(time.monotonic() - sent)

    threads = [threading.Thread(target=call, args=(c,)) for c in clients]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(took) == 4 and min(took) >= 1.0, took
    assert time.monotonic() - began < 2.5  # one after the other: 4 s
    (iid,), sent = launch(timed_cloud)  # a boot still counts from the call's arrival
    boot = timed_cloud.server.faults.clock.boot(iid)
    assert boot is not None and boot.at - sent < 0.5, boot.at - sent


def test_the_fleets_launches_arrive_together(timed_cloud: LocalCloud) -> None:
    """EC2 takes a while to answer each call: the fleet's threads must send a burst's
    launches together (with 8 threads, 32 launches would arrive in four waves, each
    one answer-time after the one before)."""
    burst = 32
    timed_cloud.delays.api = 1.0
    fleet = Fleet(ThreadedReactor(), "host:/basedir")
    ec2 = Ec2(timed_cloud.region, timed_cloud.endpoint_url,
              credentials=Credentials(LOCAL_ACCESS_KEY, "local"))
    spec = LaunchSpec(ami=timed_cloud.base_ami_id, instance_type="t3.micro",
                      user_data=user_data("img:1"), tags={"purpose": "burst"})
    answers: list[tuple[bool, Any]] = []
    done = threading.Event()

    def answered(ok: bool, result: Any) -> None:
        answers.append((ok, result))
        if len(answers) == burst:
            done.set()

    pool = fleet._thread_pool()
    try:
        for _ in range(burst):
            pool.callInThreadWithCallback(answered, ec2.run_instance, spec)
        assert done.wait(60), f"{len(answers)} of {burst} launches answered"
    finally:
        fleet._stop()
    assert all(ok for ok, _ in answers), [r for ok, r in answers if not ok]
    clock = timed_cloud.faults.clock
    arrivals = [clock.boot(status.instance_id).at for _, status in answers]  # type: ignore[union-attr]
    assert max(arrivals) - min(arrivals) < 0.9, max(arrivals) - min(arrivals)


def test_pull_delay_per_image_and_size(timed_cloud: LocalCloud,
                                       runtime: RecordingRuntime) -> None:
    timed_cloud.delays.boot = 1.0
    timed_cloud.delays.pull = {"big:1": {"t3.micro": 4.0, "*": 2.0}, "small:1": 0.0}
    timed_cloud.delays.default_pull = 2.0
    (big_micro,), t0 = launch(timed_cloud, "big:1", "t3.micro")
    (big_large,), t1 = launch(timed_cloud, "big:1", "c5.large")
    (small,), t2 = launch(timed_cloud, "small:1")
    (unnamed,), t3 = launch(timed_cloud, "other:1")
    wait_for(lambda: len(runtime.started) == 4, 15, "four workers to start")
    took = {iid: runtime.started[iid] - t for iid, t in
            ((big_micro, t0), (big_large, t1), (small, t2), (unnamed, t3))}
    tolerance = 1.5  # the hypervisor polls every 0.1 s; the machine is shared
    assert 5.0 <= took[big_micro] < 5.0 + tolerance, took
    assert 3.0 <= took[big_large] < 3.0 + tolerance, took
    assert 1.0 <= took[small] < 1.0 + tolerance, took
    assert 3.0 <= took[unnamed] < 3.0 + tolerance, took
    assert runtime.images[big_micro] == "big:1"


def test_start_from_stopped(timed_cloud: LocalCloud, runtime: RecordingRuntime) -> None:
    timed_cloud.delays.pull = {"img:1": 30.0}
    timed_cloud.delays.start = 3.0
    timed_cloud.delays.pending = 2.0
    ticks = hypervisor_ticks(timed_cloud)
    (iid,), _ = launch(timed_cloud)
    ec2 = timed_cloud.client()
    ec2.stop_instances(InstanceIds=[iid])
    seen = len(ticks)  # a pass in progress may have read the states before the stop
    wait_for(lambda: len(ticks) >= seen + 2, 5, "the hypervisor to see it stopped")
    started = time.monotonic()
    ec2.start_instances(InstanceIds=[iid])
    assert state(timed_cloud, iid) == "pending"
    wait_for(lambda: iid in runtime.started, 5, "the worker to start")
    took = runtime.started[iid] - started
    assert 3.0 <= took < 10.0, took  # the start delay, not 30 s of pull
    assert runtime.images[iid] == "img:1"


def test_terminated_while_booting_never_starts(timed_cloud: LocalCloud,
                                               runtime: RecordingRuntime) -> None:
    timed_cloud.delays.boot = 1.0
    (iid, twin), _ = launch(timed_cloud, count=2)  # due to start at the same moment
    timed_cloud.client().terminate_instances(InstanceIds=[iid])
    wait_for(lambda: twin in runtime.started, 10, "its twin to start")
    assert iid not in runtime.started


def test_process_runtime_prepares_ahead(tmp_path: Path) -> None:
    """The worker process starts at once and waits, after its imports, for its boot time."""
    runtime = ProcessRuntime(tmp_path / "instances")
    with LocalCloud(state_dir=tmp_path / "cloud", runtime=runtime,
                    delays=Delays(boot=3.0)) as cloud:
        (iid,), _ = launch(cloud)
        wait_for(lambda: iid in runtime.running(), 5, "the process to be started early")
        tac = (tmp_path / "instances" / iid / "buildbot.tac").read_text()
        start_at = float(tac.split("time.sleep(max(0.0, ")[1].split(" - ")[0])
        assert 2.0 < start_at - time.time() <= 3.0
        cloud.client().terminate_instances(InstanceIds=[iid])
        wait_for(lambda: not runtime.running(), 10, "the process to end with its instance")


def test_a_spare_process_becomes_the_instances_worker(tmp_path: Path) -> None:
    """``warm``: processes that imported before the burst take the instances in turn;
    the one left over ends with ``discard_spares``."""
    runtime = ProcessRuntime(tmp_path / "instances")
    runtime.warm(2)
    spares = {p.pid for p in runtime._spares}
    with LocalCloud(state_dir=tmp_path / "cloud", runtime=runtime,
                    delays=Delays(boot=1.0)) as cloud:
        (iid,), _ = launch(cloud)
        wait_for(lambda: iid in runtime.running(), 5, "the instance's worker process")
        assert runtime._processes[iid].pid in spares
        basedir = tmp_path / "instances" / iid
        # It runs twistd on the instance's tac, in the instance's directory.
        wait_for((basedir / "booted_at").exists, 10, "the worker to boot")
        wait_for(lambda: "Starting Worker" in (runtime.console(iid) or ""), 10,
                 "twistd to start the worker")
        leftover = runtime._spares[0]
        runtime.discard_spares()
        assert leftover.returncode == 0 and not runtime._spares
        cloud.client().terminate_instances(InstanceIds=[iid])
        wait_for(lambda: not runtime.running(), 10, "the process to end with its instance")


def test_boot_clock_rules() -> None:
    now = [100.0]
    clock = BootClock(Delays(pending=5, boot=20, pull={"a": {"m": 40, "*": 60}},
                             default_pull=10, start=8), clock=lambda: now[0])
    clock.launched(["i-1"], "a", "m")
    clock.launched(["i-2"], "a", "x")
    clock.launched(["i-3"], "b", "m")
    assert [clock.worker_due(i) for i in ("i-1", "i-2", "i-3")] == [160, 180, 130]
    assert clock.is_pending("i-1")
    now[0] = 105.0
    assert not clock.is_pending("i-1")
    clock.started(["i-1"])
    assert clock.worker_due("i-1") == 113 and clock.is_pending("i-1")
    assert clock.worker_due("i-unknown") is None and not clock.is_pending("i-unknown")
    clock.launched(["i-2"], "other", "m")  # a replayed ClientToken: the first launch stands
    assert clock.worker_due("i-2") == 180


def test_bad_delays_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"pull\['a'\]\['m'\]=-1"):
        LocalCloud(state_dir=tmp_path, delays=Delays(pull={"a": {"m": -1}}))
    assert _pull_delay("repo/img:1@c5.large=12.5") == ("repo/img:1", 12.5, "c5.large")
    assert _pull_delay("127.0.0.1:5000/img:1=3") == ("127.0.0.1:5000/img:1", 3.0, "*")
    with pytest.raises(SystemExit, match="IMAGE=SECONDS"):
        _pull_delay("img:1")


def test_a_cloud_removes_the_state_dir_it_made_and_keeps_a_given_one(tmp_path: Path) -> None:
    own = LocalCloud()
    with own:
        assert own.state_dir.is_dir() and own.state_dir.name.startswith("dockerami-cloud-")
        (own.state_dir / "instances" / "i-made").mkdir(parents=True)
    assert not own.state_dir.exists()
    given = tmp_path / "given"
    (given / "instances" / "i-kept").mkdir(parents=True)
    with LocalCloud(state_dir=given):
        pass
    assert (given / "instances" / "i-kept").is_dir()
