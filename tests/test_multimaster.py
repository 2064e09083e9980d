"""One fleet across several real masters on buildbot's multi-master engine: a real
PostgreSQL, a real Crossbar.io router, masters running multimaster.cfg.example, real
workers booted by one local cloud."""

from __future__ import annotations

import re
import time

import pytest

from buildbot_dockerami.fleet import multimaster
from tests.harness import RETRY, SUCCESS, free_port, wait_for
from tests.helpers import ids, instances, live, peak_of_live
from tests.services import OWN_BUILDER

pytestmark = pytest.mark.integration

#: Heartbeat settings of the tests' masters (the example's Heartbeat service).
HEARTBEAT, EXPIRE_AFTER = 2, 8
#: README's bound on reclaiming a dead master's instances, with these settings.
RECLAIM_BOUND = (EXPIRE_AFTER + HEARTBEAT + multimaster.RECLAIM_INTERVAL
                 + multimaster.SYNC_INTERVAL)


def tag(instance: dict, key: str) -> str:
    return next(t["Value"] for t in instance["Tags"] if t["Key"] == key)


def freed_slot_messages(master) -> float:
    return sum(float(m.group(1)) for m in re.finditer(
        r"^dockerami_freed_slot_messages_total(?:\{[^}]*\})? (\S+)$", master.metrics().text,
        re.M))


def test_a_burst_on_every_master_respects_the_shared_cap(make_fleet, cloud):
    # Two workers per master and a cap of 3: only masters together can pass the cap.
    masters = make_fleet(3, FLEET_POOL_SIZE="2", FLEET_IDLE="0", FLEET_COMMAND="sleep 2")
    assert masters[0].control(action="set_pool", pool="linux", cap=3).status_code == 200
    for master in masters:  # every master reads the cap from the shared database
        wait_for(lambda m=master: m.fleet()["pools"]["linux"]["cap"] == 3, 60,
                 f"{master.basedir.name} to see the cap")
    with peak_of_live(cloud, interval=0.1) as peak:
        # A burst on every master at once: each one's requests can go to any master.
        brids = [(master, master.force()) for _ in range(4) for master in masters]
        results = [master.wait_request(brid, 900)["results"] for master, brid in brids]
    assert results == [SUCCESS] * 12
    assert 1 <= peak[0] <= 3, f"{peak[0]} instances ran at once with a shared cap of 3"
    owners = {tag(i, "buildbot:master") for i in instances(cloud)}
    assert len(owners) >= 2, f"only {owners} launched: the burst did not spread"
    # Slots freed on one master were told to the others over the message queue (read at
    # once, not at their next pass), and every master's queue works.
    heard = sum(freed_slot_messages(master) for master in masters)
    assert heard >= 1, "no master heard of a slot freed on another"
    assert [master.fleet()["mq_error"] for master in masters] == ["", "", ""]


def test_a_build_waiting_at_the_cap_starts_when_the_freed_slot_message_comes(
        make_fleet, cloud, tmp_path):
    """The mechanism, not its timing: B's periodic pass is an hour away
    (FLEET_SYNC_INTERVAL), so only A's freed-slot message can tell B that A's instance
    ended; B has never read the shared rows, so only the database refused B's slot."""
    go = tmp_path / "go"
    a, b = make_fleet(2, start=False, extra=OWN_BUILDER, FLEET_POOL_SIZE="1", FLEET_IDLE="0")
    a.env.update(FLEET_OWN_BUILDER="only-a",
                 FLEET_OWN_COMMAND=f"while [ ! -e {go} ]; do sleep 0.05; done")
    b.env.update(FLEET_OWN_BUILDER="only-b", FLEET_SYNC_INTERVAL="3600")
    a.start(timeout=180)
    assert a.control(action="set_pool", pool="linux", cap=1).status_code == 200
    b.start(timeout=180)  # reads the cap at its start (its pass would, in an hour)
    assert b.fleet()["pools"]["linux"]["cap"] == 1
    held = a.force("only-a", "force-only-a")
    wait_for(lambda: a.builds_for(held) and live(cloud), 120, "A's build on A's instance")
    (a_instance,) = ids(live(cloud))
    waiting = b.force("only-b", "force-only-b")  # only B has this builder
    wait_for(lambda: "is at its cap (1) on all masters together" in b.log(), 60,
             "B's build request to wait at the cap")
    assert not b.builds_for(waiting) and freed_slot_messages(b) == 0
    go.touch()  # A's build ends; the idle timeout of 0 ends its instance
    assert b.wait_request(waiting, 120)["results"] == SUCCESS
    assert a.wait_request(held, 60)["results"] == SUCCESS
    assert freed_slot_messages(b) >= 1
    (b_instance,) = [i for i in instances(cloud) if i["InstanceId"] != a_instance]
    assert tag(b_instance, "buildbot:master") == b.fleet()["master"]["tag"]
    terminated = cloud.faults.timeline("TerminateInstances", a_instance)[0].at
    launched = cloud.faults.timeline("RunInstances", b_instance["InstanceId"])[0].at
    assert terminated < launched  # the cap held: B launched once A's instance had ended


def test_a_master_that_cannot_reach_the_router_says_so(make_fleet, cloud):
    """buildbot logs nothing when its WAMP router is wrong: the master runs and hears
    nothing from the others. The plugin says it, in the log and on the Fleet page."""
    (master,) = make_fleet(1, start=False, FLEET_ROUTER_URL=f"ws://127.0.0.1:{free_port()}/ws")
    master.start(timeout=180)
    problem = wait_for(lambda: master.fleet()["mq_error"], multimaster.MQ_GRACE + 60,
                       "the master to say its message queue does not work")
    assert "not connected to the WAMP router" in problem, problem
    assert "dockerami: no working message queue: not connected" in master.log()


def a_pass_of(master, since_cap_set_on, cap: int) -> None:
    """Wait until ``master`` has made a shared pass (which reads the pools' limits from
    the database, then, on the leading master, keeps the pools warm) since now: it shows
    a cap set on another master (with the test's warm minimum of 1, kept as it is)."""
    response = since_cap_set_on.control(action="set_pool", pool="linux", cap=cap, min_warm=1)
    assert response.status_code == 200
    wait_for(lambda: master.fleet()["pools"]["linux"]["cap"] == cap, 30,
             f"a shared pass of {master.basedir.name}")


def test_a_warm_minimum_is_kept_once_not_per_master(make_fleet, cloud):
    idle_timeout = 2
    masters = make_fleet(2, FLEET_POOL_SIZE="2", FLEET_IDLE=str(idle_timeout))
    assert masters[1].control(action="set_pool", pool="linux", min_warm=1).status_code == 200
    wait_for(lambda: len(live(cloud)) >= 1
             and all(m.fleet()["pools"]["linux"]["idle"] == 1 for m in masters),
             120, "one warm instance, seen by both masters")
    (warm,) = ids(live(cloud))
    (row,) = [w for m in masters for w in m.fleet()["workers"] if w["state"] == "connected"]
    timed_out = row["timeline"]["connected"] + idle_timeout
    # Past the idle timeout, two passes of each master (caps far above the pool's size
    # mark them): still exactly that one instance, the only one ever launched.
    with peak_of_live(cloud) as peak:
        cap, after_timeout = 10, 0
        while after_timeout < 2:
            began = time.time()
            for one, other in (masters, masters[::-1]):
                cap += 1
                a_pass_of(other, since_cap_set_on=one, cap=cap)
            after_timeout += began > timed_out
    assert peak[0] == 1 and ids(live(cloud)) == [warm]
    assert cloud.faults.count("RunInstances") == 1
    leaders = [m for m in masters if m.fleet()["master"]["leads"]]
    assert len(leaders) == 1


def test_a_killed_masters_instances_are_reclaimed_and_its_build_is_built_by_another(
        make_fleet, cloud):
    a, b, c = make_fleet(3, start=False, FLEET_POOL_SIZE="2", FLEET_IDLE="600",
                      FLEET_COMMAND="sleep 20", FLEET_HEARTBEAT=str(HEARTBEAT),
                      FLEET_EXPIRE_AFTER=str(EXPIRE_AFTER), FLEET_RECONCILE="5")
    b.start(timeout=180)
    brid = b.force()  # only b runs: its build, on an instance tagged for b
    (build,) = wait_for(lambda: b.builds_for(brid), 120, "the build to start on b")
    wait_for(lambda: "running" in str(b.get(f"builds/{build['buildid']}")[0]["state_string"])
             or b.step_log(build["buildid"]) != "", 120, "the build's step to run on b")
    (b_instance,) = live(cloud)
    b_tag = tag(b_instance, "buildbot:master")
    a.start(timeout=180)
    c.start(timeout=180)

    # a's Fleet API shows b's instance, with its owner, and refuses to act on it.
    def shows_b() -> dict | None:
        rows = [r for r in a.fleet()["fleet"] if r["instance_id"] == b_instance["InstanceId"]]
        return rows[0] if rows else None

    row = wait_for(shows_b, 60, "a's fleet API to show b's instance")
    assert (row["master_tag"], row["here"], row["state"]) == (b_tag, False, "building")
    refused = a.control(action="terminate", worker=row["workers"][0],
                      instance_id=b_instance["InstanceId"])
    assert refused.status_code == 409 and "belongs to master" in refused.json()["error"]
    metrics = a.metrics().text
    a_tag = a.fleet()["master"]["tag"]
    assert f'dockerami_instances{{master="{a_tag}",state="building"}} 0' in metrics

    b.crash()
    killed = time.monotonic()
    wait_for(lambda: not live(cloud, **{"tag:buildbot:master": b_tag}), RECLAIM_BOUND + 60,
             "a to reclaim b's instance")
    took = time.monotonic() - killed
    assert took <= RECLAIM_BOUND + 30, f"reclaimed after {took:.0f}s, bound {RECLAIM_BOUND}s"
    # Logged once b's build requests are given back too (two transactions after the
    # termination): wait for it rather than read the log the moment the instance goes.
    reclaimer = wait_for(
        lambda: next((m for m in (a, c)
                      if "reclaimed its instances: " + b_instance["InstanceId"] in m.log()),
                     None), 30, "a live master to log the reclaim")

    # buildbot retried b's build; a live master builds it on an instance of its own.
    final = a.wait_request(brid, 300)
    assert final["results"] == SUCCESS
    builds = a.builds_for(brid)
    assert [x["results"] for x in builds] == [RETRY, SUCCESS]
    (new_instance,) = [i for i in instances(cloud)
                       if i["InstanceId"] != b_instance["InstanceId"]]
    assert tag(new_instance, "buildbot:master") in {a_tag, c.fleet()["master"]["tag"]}

    # Every live master shows what was reclaimed (from the shared tables), also the
    # reclaimer after a restart.
    def shows_reclaim(master) -> bool:
        dead = {m["tag"]: m for m in master.fleet()["masters"]}.get(b_tag)
        return dead is not None and (dead["active"], dead["reclaimed"]) == (
            False, [b_instance["InstanceId"]])

    for master in (a, c):
        wait_for(lambda m=master: shows_reclaim(m), 30, f"{master.basedir.name} to show it")
    assert reclaimer.stop()
    reclaimer.start(timeout=180)
    wait_for(lambda: shows_reclaim(reclaimer), 30, "the restarted reclaimer to show it")
