"""Fleet metrics: the Prometheus rendering, and the www plugin on a real master."""

from __future__ import annotations

import re

import pytest
import requests

from buildbot_dockerami.metrics import Metrics
from tests.harness import SUCCESS, master_cfg, wait_for


def test_render_counters_histograms_and_gauges() -> None:
    metrics = Metrics()
    metrics.inc("dockerami_instance_launches_total", {"worker": "w0"})
    metrics.inc("dockerami_instance_launches_total", {"worker": "w0"})
    metrics.inc("dockerami_launch_failures_total", {"reason": 'say "hi"\n'})
    for seconds in (0.5, 3, 700):
        metrics.observe("dockerami_provisioning_seconds", seconds, {"isolation": "none"})
    text = metrics.render({"dockerami_instances": [({"state": "booting"}, 2)]})
    lines = text.splitlines()
    assert 'dockerami_instance_launches_total{worker="w0"} 2' in lines
    assert 'dockerami_launch_failures_total{reason="say \\"hi\\"\\n"} 1' in lines
    assert 'dockerami_provisioning_seconds_bucket{isolation="none",le="1"} 1' in lines
    assert 'dockerami_provisioning_seconds_bucket{isolation="none",le="5"} 2' in lines
    assert 'dockerami_provisioning_seconds_bucket{isolation="none",le="+Inf"} 3' in lines
    assert 'dockerami_provisioning_seconds_count{isolation="none"} 3' in lines
    assert 'dockerami_provisioning_seconds_sum{isolation="none"} 703.5' in lines
    assert 'dockerami_instances{state="booting"} 2' in lines
    assert "# TYPE dockerami_provisioning_seconds histogram" in lines
    # Series with no samples yet still announce themselves.
    assert "# TYPE dockerami_ec2_throttles_total counter" in lines


def scrape(master) -> dict[str, float]:
    url = f"http://127.0.0.1:{master.www_port}/plugins/dockerami/metrics"
    response = requests.get(url, timeout=10)
    response.raise_for_status()
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r"^(\S+) (\S+)$", response.text, re.MULTILINE)}


@pytest.mark.integration
def test_metrics_page_counts_launches_requests_throttles_and_latency(make_master, cloud):
    cloud.faults.throttle("RunInstances", count=1)
    config = master_cfg(build_wait_timeout=600).replace(
        "'plugins': {}", "'plugins': {'dockerami': {}}")
    master = make_master(config)
    assert master.wait_request(master.force(), 90)["results"] == SUCCESS
    values = wait_for(lambda: (v := scrape(master)).get(
        'dockerami_instances{state="connected"}') == 1 and v, 30, "the idle instance")
    assert values['dockerami_instance_launches_total{worker="w0"}'] == 1
    assert values['dockerami_ec2_requests_total{operation="RunInstances"}'] == 2
    assert values['dockerami_ec2_throttles_total{operation="RunInstances"}'] == 1
    assert values['dockerami_provisioning_seconds_count{isolation="none"}'] == 1
    assert values['dockerami_instances{state="building"}'] == 0
    assert values["dockerami_terminations_failing"] == 0


@pytest.mark.integration
def test_fleet_api_shows_workers_instances_costs_and_orphans(make_master, cloud):
    config = master_cfg(build_wait_timeout=600, workers=2,
                        worker_extra="reconcile_interval=5,").replace(
        "'plugins': {}", "'plugins': {'dockerami': {'prices': {'t3.micro': 0.0104}}}")
    master = make_master(config)
    assert master.wait_request(master.force(), 90)["results"] == SUCCESS
    url = f"http://127.0.0.1:{master.www_port}/plugins/dockerami/api/fleet"

    def fleet() -> dict:
        response = requests.get(url, timeout=10)
        response.raise_for_status()
        return response.json()

    def settled() -> dict | None:
        current = fleet()
        states = sorted(w["state"] for w in current["workers"])
        return current if states == ["connected", "not running"] else None

    status = wait_for(settled, 30, "one worker connected, one not running")
    w0, w1 = sorted(status["workers"], key=lambda w: w["state"])  # the build's, the other
    (instance,) = [i for r in cloud.client().describe_instances()["Reservations"]
                   for i in r["Instances"]]
    assert w0["instance"]["id"] == instance["InstanceId"]
    assert w0["instance"]["type"] == "t3.micro"
    assert w0["instance"]["availability_zone"] == instance["Placement"]["AvailabilityZone"]
    assert w0["instance"]["cost_so_far"] is not None
    assert {"requested", "connected", "build_started"} <= set(w0["timeline"])
    assert w0["timeline"]["requested"] <= w0["timeline"]["connected"]
    assert (w1["state"], w1["instance"]) == ("not running", None)
    assert status["orphans"] == []

    # An instance tagged for this master that no worker owns, e.g. left by a crash.
    orphan = cloud.client().run_instances(
        ImageId=cloud.base_ami_id, MinCount=1, MaxCount=1, InstanceType="t3.nano",
        TagSpecifications=[{"ResourceType": "instance", "Tags": [
            {"Key": "buildbot:master", "Value": status["master_id"]}]}],
    )["Instances"][0]["InstanceId"]
    # Listed once the reconciler has seen it (within one interval), terminated at the
    # next pass.
    listed = wait_for(lambda: fleet()["orphans"], 10, "the orphan to be listed")
    assert [o["id"] for o in listed] == [orphan]
    wait_for(lambda: not fleet()["orphans"] and cloud.client().describe_instances(
        InstanceIds=[orphan])["Reservations"][0]["Instances"][0]["State"]["Name"]
        in ("shutting-down", "terminated"), 20, "the reconciler to terminate the orphan")
