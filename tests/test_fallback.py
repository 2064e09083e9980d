"""Capacity fallback: the options' order and cool-down (pure), and on a real master:
a capacity error on the first type launches the second, spot through RunInstances."""

from __future__ import annotations

import re

import pytest

from buildbot_dockerami.fleet import fallback
from buildbot_dockerami.fleet.fallback import Option
from tests.harness import RETRY, SUCCESS, master_cfg, wait_for
from tests.helpers import held_until, instances, state_of


def test_options_are_tried_market_then_type_then_subnet():
    assert fallback.options(["a.large", "b.large"], ["subnet-1", "subnet-2"],
                            "spot-or-on-demand") == [
        Option("a.large", "subnet-1", "spot"), Option("a.large", "subnet-2", "spot"),
        Option("b.large", "subnet-1", "spot"), Option("b.large", "subnet-2", "spot"),
        Option("a.large", "subnet-1", "on-demand"), Option("a.large", "subnet-2", "on-demand"),
        Option("b.large", "subnet-1", "on-demand"), Option("b.large", "subnet-2", "on-demand"),
    ]
    assert fallback.options("t3.micro", None, "on-demand") == [
        Option("t3.micro", None, "on-demand")]


def test_a_refused_option_cools_down_at_the_back_then_returns():
    cool = fallback.CoolDown(seconds=60)
    a, b, c = (Option(t, None, "on-demand") for t in ("a", "b", "c"))
    cool.failed(a, now=0)
    assert cool.order([a, b, c], now=10) == [b, c, a]
    cool.failed(b, now=20)
    assert cool.order([a, b, c], now=30) == [c, a, b]
    assert cool.order([a, b, c], now=61) == [a, c, b]  # a is back, b still cooling
    assert cool.order([a, b, c], now=100) == [a, b, c]


def test_a_rebalance_warning_cools_a_type_and_market_in_every_subnet():
    cool = fallback.CoolDown(seconds=60)
    options = fallback.options(["c7g.large", "c6i.large"], ["subnet-1", "subnet-2"],
                               "spot-or-on-demand")
    cool.avoid("c7g.large", "spot", now=0)
    ordered = cool.order(options, now=10)
    # c7g spot in both subnets last; c7g on-demand and c6i spot untouched, in order.
    assert ordered[-2:] == [Option("c7g.large", "subnet-1", "spot"),
                            Option("c7g.large", "subnet-2", "spot")]
    assert ordered[:-2] == [o for o in options if (o.instance_type, o.market) != (
        "c7g.large", "spot")]
    assert cool.order(options, now=61) == options  # back after the cool-down


def test_capacity_codes():
    assert fallback.is_capacity_error("InsufficientInstanceCapacity")
    assert fallback.is_capacity_error("SpotMaxPriceTooLow")
    assert not fallback.is_capacity_error("InvalidAMIID.NotFound")


@pytest.mark.integration
def test_capacity_error_on_the_first_type_launches_the_second(make_master, cloud):
    cloud.faults.inject("RunInstances", "InsufficientInstanceCapacity",
                        "We currently do not have sufficient m5.large capacity.", count=1)
    master = make_master(master_cfg(build_wait_timeout=0,
                                    instance_type=["m5.large", "c5.large"]))
    assert master.wait_request(master.force(), 90)["results"] == SUCCESS
    (instance,) = instances(cloud)
    assert instance["InstanceType"] == "c5.large"
    log = master.log()
    assert "RunInstances for m5.large (on-demand) failed (InsufficientInstanceCapacity)" in log
    # The refused type cools down: the next launch goes straight to the second type.
    assert master.wait_request(master.force(), 90)["results"] == SUCCESS
    launched = sorted(instances(cloud), key=lambda i: i["LaunchTime"])
    assert [i["InstanceType"] for i in launched] == ["c5.large", "c5.large"]
    assert cloud.faults.count("RunInstances") == 3


@pytest.mark.integration
def test_spot_goes_through_run_instances_market_options(make_master, cloud):
    master = make_master(master_cfg(build_wait_timeout=0, worker_extra="market='spot',"))
    assert master.wait_request(master.force(), 90)["results"] == SUCCESS
    (instance,) = instances(cloud)
    assert instance.get("InstanceLifecycle") == "spot"
    assert cloud.faults.count("RequestSpotInstances") == 0


@pytest.mark.integration
def test_spot_interruption_mid_build_retries_the_build_elsewhere(make_master, cloud):
    master = make_master(master_cfg(
        build_wait_timeout=600, command="echo started; pwd; sleep 6",
        worker_extra="market='spot', reconcile_interval=5,", plugins={"dockerami": {}}))
    brid = master.force()
    build = wait_for(lambda: master.builds_for(brid), 60, "the build to start")[0]
    wait_for(lambda: "started" in master.step_log(build["buildid"]), 60, "the step to run")
    (interrupted,) = [i["InstanceId"] for i in instances(cloud)]
    cloud.hypervisor.interrupt(interrupted, notice=2)

    final = master.wait_request(brid, 120)
    assert final["results"] == SUCCESS, master.log()[-3000:]
    first = master.builds_for(brid)[0]
    assert first["results"] == RETRY
    assert "spot interruption" in master.log()
    assert interrupted not in master.step_log(final["buildid"])
    state = {i["InstanceId"]: i for i in instances(cloud)}[interrupted]["State"]["Name"]
    assert state in ("shutting-down", "terminated")
    metrics = master.metrics().text
    assert re.search(r"dockerami_spot_interruptions_total(\{\})? 1(\.0)?\n", metrics), metrics
    status = master.fleet()
    assert status["workers"][0]["instance"]["market"] == "spot"


@pytest.mark.integration
def test_a_rebalance_recommendation_drains_a_process_runtime_instance_after_its_build(
        make_master, cloud, tmp_path):
    """The process runtime has no bootstrap: it does what the bootstrap and the image
    would (the reason as worker info, then SIGHUP). The master drains, not interrupts:
    the running build finishes, then the instance ends; its type cools down for spot."""
    go = tmp_path / "go"
    master = make_master(master_cfg(
        build_wait_timeout=600, plugins={"dockerami": {}},
        instance_type=["m5.large", "c5.large"], worker_extra="market='spot',",
        command=held_until(go)))
    brid = master.force()
    build = wait_for(lambda: master.builds_for(brid), 60, "the build to start")[0]
    wait_for(lambda: "started" in master.step_log(build["buildid"]), 60, "the step to run")
    (instance,) = instances(cloud)
    assert instance["InstanceType"] == "m5.large"

    cloud.hypervisor.recommend_rebalance(instance["InstanceId"])
    retiring = wait_for(lambda: master.fleet()["workers"][0]["instance"]["retired"], 60,
                        "the Fleet API to show the instance draining")
    assert retiring.startswith("spot_rebalance: EC2 recommends rebalancing"), retiring
    assert "m5.large (spot) goes to the back of the capacity options" in master.log()
    assert state_of(cloud, instance["InstanceId"]) == "running"
    assert not master.get(f"buildrequests/{brid}")[0]["complete"]

    go.touch()
    final = master.wait_request(brid, 120)
    assert final["results"] == SUCCESS and final["buildid"] == build["buildid"]  # no retry
    wait_for(lambda: state_of(cloud, instance["InstanceId"]) == "terminated", 60,
             "the drained instance to be terminated after its build")
    assert 'dockerami_retirements_total{reason="spot_rebalance"} 1.0' in master.metrics().text
    assert "spot interruption" not in master.log()
    # The next launch goes to the type that was not recommended against.
    assert master.wait_request(master.force(), 120)["results"] == SUCCESS
    fresh = [i for i in instances(cloud) if i["InstanceId"] != instance["InstanceId"]]
    assert [i["InstanceType"] for i in fresh] == ["c5.large"]

