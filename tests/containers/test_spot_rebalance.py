"""EC2's spot rebalance recommendation, with the real bootstrap and image on the engine:
the instance drains (its running build finishes, it takes no new one, then it is
terminated) and its type goes to the back of the spot capacity options."""

from __future__ import annotations

import pytest

from tests.docker_support import only_instance
from tests.harness import SUCCESS, master_cfg, wait_for
from tests.helpers import state_of

pytestmark = pytest.mark.integration

#: The build runs until its container is told the instance retires, then a bit more.
WAIT_FOR_DRAIN = (
    "echo started; n=0; until [ -e /run/dockerami/host/retired ] || [ $n -ge 600 ]; "
    "do sleep 0.2; n=$((n+1)); done; echo told: $(cat /run/dockerami/host/retired); sleep 3"
)


def test_a_rebalance_recommendation_drains_the_spot_instance_after_its_build(
        make_master, cloud, engine, worker_image):
    master = make_master(master_cfg(
        image=worker_image, command=WAIT_FOR_DRAIN, build_wait_timeout=600,
        worker_extra="market='spot',", plugins={"dockerami": {}}))
    brid = master.force()
    build = wait_for(lambda: master.builds_for(brid), 120, "the build to start")[0]
    wait_for(lambda: "started" in master.step_log(build["buildid"]), 180, "the step to run")
    instance = only_instance(cloud)
    instance_id = instance["InstanceId"]

    cloud.hypervisor.recommend_rebalance(instance_id)
    retiring = wait_for(lambda: master.fleet()["workers"][0]["instance"]["retired"], 60,
                        "the Fleet API to show the instance draining")
    assert retiring.startswith("spot_rebalance: EC2 recommends rebalancing"), retiring
    assert "RETIRING: spot_rebalance" in cloud.runtime.console(instance_id)
    assert f"{instance['InstanceType']} (spot) goes to the back of the capacity options" \
        in master.log()

    # The running build is not interrupted: it finishes, then the instance is terminated.
    final = master.wait_request(brid, 120)
    assert final["results"] == SUCCESS and final["buildid"] == build["buildid"]
    assert [b["buildid"] for b in master.builds_for(brid)] == [build["buildid"]]
    assert "told: spot_rebalance: " in master.step_log(build["buildid"])
    wait_for(lambda: state_of(cloud, instance_id) == "terminated", 60, "the termination")
    assert 'dockerami_retirements_total{reason="spot_rebalance"} 1.0' in master.metrics().text
    assert "spot interruption" not in master.log()  # a drain, not an interruption
