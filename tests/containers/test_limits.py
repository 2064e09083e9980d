"""Per-slot resource limits (container_limits) on a real Docker engine, through the real
bootstrap: a two-slot instance whose one build allocates past its memory limit while
the other slot's build runs on."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer

import pytest

from buildbot_dockerami.localcloud.containers import QuietHandler
from tests.docker_support import facts, only_instance
from tests.harness import FAILURE, SUCCESS, master_cfg, wait_for
from tests.helpers import VIEWPORT

pytestmark = pytest.mark.integration

MIB = 1024**2

# What a build reads of its own container's limits (cgroup v2, else v1), and the swap
# it may use beyond memory (none: --memory-swap equals --memory).
READ_LIMITS = r"""
echo container=$(grep -o 'containers/[0-9a-f]*' /proc/self/mountinfo | head -n 1 \
    | cut -d/ -f2) instance=$DOCKERAMI_INSTANCE_ID
CG=/sys/fs/cgroup
if [ -f $CG/cgroup.controllers ]; then
    echo memory.max=$(cat $CG/memory.max) pids.max=$(cat $CG/pids.max) \
        swap.max=$(cat $CG/memory.swap.max) cpu.max=$(cat $CG/cpu.max | tr ' ' /)
else
    memory=$(cat $CG/memory/memory.limit_in_bytes)
    echo memory.max=$memory pids.max=$(cat $CG/pids/pids.max) \
        swap.max=$(( $(cat $CG/memory/memory.memsw.limit_in_bytes) - memory )) \
        cpu.max=$(cat $CG/cpu/cpu.cfs_quota_us)/$(cat $CG/cpu/cpu.cfs_period_us)
fi
"""

# Grows by 16 MiB at a time until the kernel stops it; the shell then exits with 137.
ALLOCATE = ("echo allocating; "
            "python3 -c 'chunks = []\nwhile True: chunks.append(bytearray(16 << 20))'")


class Gate:
    """Holds the steady build until the test opens it (over the shared loopback)."""

    def __init__(self) -> None:
        self.open = threading.Event()
        gate = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                self.reply(200 if gate.open.is_set() else 404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/open"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def gate() -> Iterator[Gate]:
    gate = Gate()
    yield gate
    gate.server.shutdown()
    gate.server.server_close()


def config(image: str, gate_url: str) -> str:
    text = master_cfg(image=image, command="true", build_wait_timeout=120,
                      pool="'pool', slots=2", plugins={"dockerami": {}},
                      settings={"container_limits": "{'memory': '256m', 'pids': 200, 'cpus': 1}"})
    steady = f"until curl -sf {gate_url}; do sleep 0.3; done; " \
        "python3 -c 'b = bytearray(64 << 20)' && echo steady done"
    return text + f"""
def factory(*commands):
    return util.BuildFactory([steps.ShellCommand(name=name, command=['sh', '-c', command])
                              for name, command in commands])

c['builders'] = [
    util.BuilderConfig(name='hog', workernames=['pool-1-1'],
                       factory=factory(('run', {READ_LIMITS!r}), ('allocate', {ALLOCATE!r}))),
    util.BuilderConfig(name='steady', workernames=['pool-1-2'],
                       factory=factory(('run', {READ_LIMITS!r}), ('wait', {steady!r}))),
]
c['schedulers'] = [schedulers.ForceScheduler(name='force', builderNames=['hog', 'steady'])]
"""


def cgroup_values(text: str) -> dict[str, str]:
    return dict(re.findall(r"\b(memory\.max|pids\.max|swap\.max|cpu\.max)=(\S+)", text))


def test_a_build_past_its_memory_limit_is_oom_killed_in_its_own_slot(
        make_master, cloud, worker_image, gate, browser):
    master = make_master(config(worker_image, gate.url))
    steady = master.force("steady")
    wait_for(lambda: master.builds_for(steady)
             and "memory.max" in master.step_log(master.builds_for(steady)[0]["buildid"]),
             180, "the steady build to be running")
    hog = master.wait_request(master.force("hog"), 180)

    # The hog's allocation was killed in its own container, and its step says why.
    assert hog["results"] == FAILURE, master.log()[-3000:]
    allocate = master.step_log(hog["buildid"], "allocate")
    assert "out of memory: the kernel's OOM killer killed this command (OOM-killed)" in (
        allocate), allocate
    assert "memory limit (256 MiB, container_limits)" in allocate
    assert "program finished with exit code 137" in allocate
    step = next(s for s in master.get(f"builds/{hog['buildid']}/steps")
                if s["name"] == "allocate")
    assert step["results"] == FAILURE

    # Meanwhile the other slot's build ran on, and finishes when the test lets it.
    assert not master.get(f"buildrequests/{steady}")[0]["complete"]
    gate.open.set()
    done = master.wait_request(steady, 120)
    assert done["results"] == SUCCESS, master.log()[-3000:]
    assert "steady done" in master.step_log(done["buildid"], "wait")
    hog_facts, steady_facts = facts(master, hog), facts(master, done)
    assert hog_facts["instance"] == steady_facts["instance"]
    assert hog_facts["container"] != steady_facts["container"]

    # Each container's cgroup has exactly the configured limits, and no swap beyond them.
    for build in (hog, done):
        assert cgroup_values(master.step_log(build["buildid"])) == {
            "memory.max": str(256 * MIB), "pids.max": "200", "swap.max": "0",
            "cpu.max": "100000/100000"}

    # The Fleet API shows them per slot, as configured and as each container reported.
    rows = {w["name"]: w for w in master.fleet()["workers"]}
    for name in ("pool-1-1", "pool-1-2"):
        assert rows[name]["container_limits"] == {
            "configured": {"memory": 256 * MIB, "pids": 200, "cpus": 1.0},
            "applied": {"memory": 256 * MIB, "pids": 200, "cpus": 1.0}}, rows[name]
    page = browser.new_page(viewport=VIEWPORT)
    try:
        page.goto(f"http://127.0.0.1:{master.www_port}/#/dockerami")
        for name in ("pool-1-1", "pool-1-2"):
            shown = page.locator(f"tr[data-worker='{name}'] .dockerami-limits")
            shown.wait_for(timeout=30_000)
            assert shown.inner_text() == "limits: memory 256 MiB \u00b7 pids 200 \u00b7 cpus 1"
    finally:
        page.close()

    # The bootstrap logged the limits it applied, and the OOM kill when the container ended.
    instance_id = only_instance(cloud)["InstanceId"]
    console = wait_for(lambda: (text := cloud.runtime.console(instance_id) or "")
                       and "out of memory" in text and text, 60, "the OOM kill on the console")
    assert f"container limits: memory {256 * MIB}, pids 200, cpus 1" in console
    assert re.search(r"dockerami-i-[0-9a-f]+: out of memory: the kernel's OOM killer killed "
                     r"a process in it \(memory limit 268435456\)", console), console
    assert master.stop(timeout=30), "the master did not stop within 30s"
