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
