"""Fleet metrics: both Prometheus formats, parsed by prometheus_client's own parsers, and
the www plugin on a real master."""

from __future__ import annotations

import ast
from collections.abc import Iterable
from typing import Any

import pytest
from prometheus_client import parser as text_format
from prometheus_client.openmetrics import parser as openmetrics_format
from twisted.internet import task

from buildbot_dockerami.cloud.ec2 import AsyncEc2
from buildbot_dockerami.cloud.testing import ACTIONS
from buildbot_dockerami.fleet import metrics
from buildbot_dockerami.fleet.metrics import Metrics
from buildbot_dockerami.fleet.service import Fleet
from buildbot_dockerami.www.metrics import exposition
from tests.harness import REPO, SUCCESS, master_cfg, wait_for

PROMETHEUS_ACCEPT = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"


#: Where a launch failure's reason is given: the call and the argument that names it.
REASON_GIVERS = {"_count_failure": 0, "LaunchFailed": 0, "LaunchRefused": 0}
#: Arguments that pass on a reason given elsewhere (a LaunchFailed's, a BootState's).
PASSED_ON = {"e.reason", "state.failure"}


def emitted_reasons() -> set[str]:
    """Every launch failure reason in the plugin's code that is not an EC2 error code
    (``RunInstances:{code}``), read from the source: a reason spelled as a literal
    instead of a metrics constant fails here."""
    found: set[str] = set()
    for path in sorted((REPO / "buildbot_dockerami").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func).rsplit(".", 1)[-1]
            args = ([node.args[REASON_GIVERS[name]]]
                    if name in REASON_GIVERS and len(node.args) > REASON_GIVERS[name] else [])
            args += [k.value for k in node.keywords if name == "BootState" and k.arg == "failure"]
            for arg in args:
                text = ast.unparse(arg)
                where = f"{path.relative_to(REPO)}:{node.lineno}: {text}"
                if text in PASSED_ON or text.startswith("f'RunInstances:{"):
                    continue
                if isinstance(arg, ast.Name) and arg.id == "failed":  # boot_state's died()
                    found.update([metrics.died(None), *map(metrics.died, metrics.DEAD_STATES)])
                    continue
                assert text.startswith("metrics.") and not isinstance(arg, ast.Call), where
                found.add(getattr(metrics, text.split(".", 1)[1]))
    return found


def test_every_reason_but_ec2_codes_is_seeded() -> None:
    assert emitted_reasons() == set(metrics.FAILURE_REASONS)
    found = samples(text_format.text_string_to_metric_families(
        exposition(Fleet(task.Clock(), "seeds"), "")[0].decode()))
    for reason in metrics.FAILURE_REASONS:
        assert sample(found, "dockerami_launch_failures_total", reason=reason) == 0, reason


def test_every_ec2_operation_the_plugin_calls_is_seeded_in_both_families() -> None:
    assert set(metrics.EC2_OPERATIONS) == set(ACTIONS.values())
    assert set(ACTIONS) == {n for n in vars(AsyncEc2) if not n.startswith("_")}
    found = samples(text_format.text_string_to_metric_families(
        exposition(Fleet(task.Clock(), "seeds"), "")[0].decode()))
    for family in ("dockerami_ec2_requests_total", "dockerami_ec2_throttles_total"):
        for operation in ACTIONS.values():
            assert sample(found, family, operation=operation) == 0, (family, operation)


def fleet_with_counts() -> Fleet:
    fleet = Fleet(task.Clock(), "metrics-test")
    fleet.metrics.inc("dockerami_instance_launches_total", {"worker": "w0"})
    fleet.metrics.inc("dockerami_instance_launches_total", {"worker": "w0"})
    fleet.metrics.inc("dockerami_launch_failures_total", {"reason": 'say "hi"\n'})
    fleet.metrics.inc("dockerami_ec2_requests_total", {"operation": "RunInstances"}, by=3)
    for seconds in (0.5, 3, 700):
        fleet.metrics.observe("dockerami_provisioning_seconds", seconds, {"isolation": "none"})
    return fleet


def samples(families: Iterable[Any]) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value for f in families for s in f.samples}


def sample(found: dict, name: str, **labels: str) -> float:
    return found[(name, frozenset(labels.items()))]


@pytest.mark.parametrize(("accept", "content_type", "parse"), [
    ("", "text/plain; version=0.0.4", text_format.text_string_to_metric_families),
    ("text/plain", "text/plain; version=0.0.4", text_format.text_string_to_metric_families),
    (PROMETHEUS_ACCEPT, "application/openmetrics-text",
     openmetrics_format.text_string_to_metric_families),
])
def test_both_formats_parse_with_counts_zeros_and_histograms(
        accept: str, content_type: str, parse: Any) -> None:
    body, served_as = exposition(fleet_with_counts(), accept)
    assert served_as.startswith(content_type)
    found = samples(parse(body.decode()))  # the parsers reject clashing or malformed series
    assert sample(found, "dockerami_instance_launches_total", worker="w0") == 2
    assert sample(found, "dockerami_launch_failures_total", reason='say "hi"\n') == 1
    assert sample(found, "dockerami_ec2_requests_total", operation="RunInstances") == 3
    # Counters that never fired are there, at zero, for rate() alerts.
    assert sample(found, "dockerami_ec2_throttles_total", operation="RunInstances") == 0
    assert sample(found, "dockerami_ec2_requests_total", operation="TerminateInstances") == 0
    assert sample(found, "dockerami_launch_failures_total", reason="never_connected") == 0
    assert sample(found, "dockerami_launch_fallbacks_total",
                  code="InsufficientInstanceCapacity") == 0
    assert sample(found, "dockerami_provisioning_seconds_bucket", isolation="none", le="1.0") == 1
    assert sample(found, "dockerami_provisioning_seconds_bucket", isolation="none", le="5.0") == 2
    assert sample(found, "dockerami_provisioning_seconds_bucket", isolation="none",
                  le="+Inf") == 3
    assert sample(found, "dockerami_provisioning_seconds_count", isolation="none") == 3
    assert sample(found, "dockerami_provisioning_seconds_sum", isolation="none") == 703.5
    assert sample(found, "dockerami_provisioning_seconds_count", isolation="container") == 0
    assert sample(found, "dockerami_instances", state="booting") == 0
    assert sample(found, "dockerami_terminations_failing") == 0


def test_openmetrics_names_counters_without_their_total_suffix() -> None:
    body, _ = exposition(fleet_with_counts(), PROMETHEUS_ACCEPT)
    text = body.decode()
    assert "# TYPE dockerami_ec2_requests counter" in text
    assert "# TYPE dockerami_ec2_requests_total" not in text
    assert text.endswith("# EOF\n")
    families = {f.name: f.type for f in openmetrics_format.text_string_to_metric_families(text)}
    assert families["dockerami_instance_launches"] == "counter"
    assert families["dockerami_provisioning_seconds"] == "histogram"
    assert families["dockerami_instances"] == "gauge"


def test_the_interface_callers_use_keeps_counting() -> None:
    metrics = Metrics()
    metrics.inc("dockerami_ec2_requests_total", {"operation": "RunInstances"})
    metrics.inc("dockerami_ec2_requests_total", {"operation": "RunInstances"}, by=2)
    assert metrics.counter("dockerami_ec2_requests_total", {"operation": "RunInstances"}) == 3
    assert metrics.counter("dockerami_ec2_requests_total", {"operation": "Other"}) == 0
    # A counter the table does not know yet is exposed too, with its own labels.
    metrics.inc("dockerami_reconciled_total", {"action": "adopted"})
    fleet = Fleet(task.Clock(), "m")
    fleet.metrics = metrics
    found = samples(text_format.text_string_to_metric_families(
        exposition(fleet, "")[0].decode()))
    assert sample(found, "dockerami_reconciled_total", action="adopted") == 1


def scrape(master, accept: str = "") -> dict[str, float]:
    """The page as a plain client or (with ``accept``) Prometheus sees it, parsed by
    prometheus_client; keys like 'name{label="value"}'."""
    response = master.metrics(accept)
    if accept:
        assert response.headers["content-type"].startswith("application/openmetrics-text")
        parsed = openmetrics_format.text_string_to_metric_families(response.text)
    else:
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        parsed = text_format.text_string_to_metric_families(response.text)
    values = {}
    for family in parsed:
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            values[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return values


@pytest.mark.integration
def test_metrics_page_counts_launches_requests_throttles_and_latency(make_master, cloud):
    cloud.faults.throttle("RunInstances", count=1)
    master = make_master(master_cfg(build_wait_timeout=600, plugins={"dockerami": {}}))
    assert master.wait_request(master.force(), 90)["results"] == SUCCESS
    values = wait_for(lambda: (v := scrape(master)).get(
        'dockerami_instances{state="connected"}') == 1 and v, 30, "the idle instance")
    assert values['dockerami_instance_launches_total{worker="w0"}'] == 1
    assert values['dockerami_ec2_requests_total{operation="RunInstances"}'] == 2
    assert values['dockerami_ec2_throttles_total{operation="RunInstances"}'] == 1
    assert values['dockerami_provisioning_seconds_count{isolation="none"}'] == 1
    assert values['dockerami_instances{state="building"}'] == 0
    assert values["dockerami_terminations_failing"] == 0
    # What Prometheus itself asks for: the same numbers, as OpenMetrics.
    scraped = scrape(master, PROMETHEUS_ACCEPT)
    assert scraped['dockerami_instance_launches_total{worker="w0"}'] == 1
    assert scraped['dockerami_ec2_throttles_total{operation="RunInstances"}'] == 1
    assert scraped['dockerami_launch_failures_total{reason="never_connected"}'] == 0
    assert scraped['dockerami_instances{state="connected"}'] == 1


@pytest.mark.integration
def test_fleet_api_shows_workers_instances_costs_and_orphans(make_master, cloud):
    master = make_master(master_cfg(
        build_wait_timeout=600, workers=2, worker_extra="reconcile_interval=5,",
        plugins={"dockerami": {"prices": {"t3.micro": 0.0104}}}))
    assert master.wait_request(master.force(), 90)["results"] == SUCCESS
    fleet = master.fleet

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
