"""The Grafana dashboard shipped in grafana/: every metric and label its queries use is
served by a real master's ``/plugins/dockerami/metrics``, and it loads as provisioned.

The PromQL is read minimally, enough for the dashboard's own queries: a metric is an
identifier ``dockerami_...`` outside string literals (histograms by their ``_bucket``,
``_sum``, ``_count`` series, counters by their ``_total`` series, exactly as Prometheus
stores them); its labels are the names in its ``{...}`` selector, and those of every
``by (...)``/``without (...)`` (and ``on``/``ignoring``) of the expression, which must be
on each metric in it; ``label_values(metric, label)`` in a variable. A label Prometheus
adds when it scrapes (``job``, ``instance``) is not in ``/metrics`` and is allowed.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from prometheus_client import parser as text_format
from prometheus_client.openmetrics import parser as openmetrics_format
from twisted.internet import task

from buildbot_dockerami.fleet.pools import PoolLimits
from buildbot_dockerami.fleet.service import Fleet
from buildbot_dockerami.www.metrics import exposition
from tests.harness import REPO, SUCCESS, master_cfg, wait_for

DASHBOARD = REPO / "grafana" / "dockerami.json"
PROVISIONING = REPO / "grafana" / "provisioning" / "dashboards.yaml"
PROMETHEUS_ACCEPT = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
#: Labels Prometheus attaches to every series of a scrape target: never in /metrics.
TARGET_LABELS = frozenset({"job", "instance"})
#: What the dashboard must show (issue 21, part 6): instances by state and pool, launches
#: and failures by reason, time from request to worker, EC2 calls, fallbacks, spot, cost.
REQUIRED = {
    "dockerami_instances": {"state"},
    "dockerami_pool_instances": {"pool"},
    "dockerami_instance_launches_total": set(),
    "dockerami_launch_failures_total": {"reason"},
    "dockerami_provisioning_seconds_bucket": {"le"},
    "dockerami_ec2_requests_total": {"operation"},
    "dockerami_ec2_throttles_total": {"operation"},
    "dockerami_launch_fallbacks_total": {"code"},
    "dockerami_spot_interruptions_total": set(),
    "dockerami_cost_dollars_total": {"pool", "market"},
}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_SELECTOR = re.compile(r"\b(dockerami_[a-z0-9_]+)\b\s*(\{[^}]*\})?")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")
_LABEL_VALUES = re.compile(r"label_values\(\s*(dockerami_[a-z0-9_]+)[^,]*,\s*(\w+)\s*\)")
_LEGEND = re.compile(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")


def references(expr: str) -> dict[str, set[str]]:
    """Metric name -> the label names the expression uses on it."""
    found: dict[str, set[str]] = {}
    # Matchers first (their values are strings), then names outside any string.
    for name, selector in _SELECTOR.findall(expr):
        labels = set(_MATCHER.findall(_STRING.sub('""', selector))) if selector else set()
        found.setdefault(name, set()).update(labels)
    bare = _STRING.sub('""', expr)
    for name in re.findall(r"\b(dockerami_[a-z0-9_]+)\b", bare):
        found.setdefault(name, set())
    grouping = {label.strip() for group in _GROUPING.findall(bare)
                for label in group.split(",") if label.strip()}
    for labels in found.values():
        labels.update(grouping)
    for name, label in _LABEL_VALUES.findall(expr):
        found.setdefault(name, set()).add(label)
    return found


def grouping_labels(expr: str) -> set[str]:
    return {label.strip() for group in _GROUPING.findall(_STRING.sub('""', expr))
            for label in group.split(",") if label.strip()}


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those folded in rows too."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panels(panel)


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(where, expression, legend) of every panel target and query variable."""
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield (f"panel {panel.get('title')!r} {target.get('refId')}", target["expr"],
                   target.get("legendFormat", ""))
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]
            yield (f"variable {variable['name']!r}",
                   query["query"] if isinstance(query, dict) else query, "")


def exposed(text: str, openmetrics: bool = False) -> dict[str, set[str]]:
    """Series name (``_total``, ``_bucket``... included) -> its label names, as
    prometheus_client's own parser reads the page."""
    parse = (openmetrics_format if openmetrics else text_format).text_string_to_metric_families
    series: dict[str, set[str]] = {}
    for family in parse(text):
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


def problems(dashboard: dict[str, Any], series: dict[str, set[str]]) -> list[str]:
    """What the dashboard asks for that the page does not have, one line each."""
    found = []
    for where, expr, legend in queries(dashboard):
        for name, labels in sorted(references(expr).items()):
            if name not in series:
                found.append(f"{where}: no series {name} in /metrics")
                continue
            for label in sorted(labels - series[name] - TARGET_LABELS):
                found.append(f"{where}: {name} has no label {label!r} "
                             f"(it has {sorted(series[name])})")
        for label in _LEGEND.findall(legend):
            if label not in grouping_labels(expr):
                found.append(f"{where}: legend {{{{{label}}}}} is not kept by the query")
    return found


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def in_process_page(openmetrics: bool = False) -> dict[str, set[str]]:
    """The metrics page of a fleet with one pool, without a master (the fast lane)."""
    fleet = Fleet(task.Clock(), "dashboard-test")
    fleet.pool_limits["pool"] = PoolLimits()
    # A master's workers each have a launch counter from the start; this fleet has none.
    fleet.metrics.inc("dockerami_instance_launches_total", {"worker": "w0"}, by=0)
    body, _ = exposition(fleet, PROMETHEUS_ACCEPT if openmetrics else "")
    return exposed(body.decode(), openmetrics)


def test_the_reader_finds_metrics_selectors_groupings_and_variables() -> None:
    expr = ('histogram_quantile(0.9, sum by (le, isolation) (rate('
            'dockerami_provisioning_seconds_bucket{job=~"$job", state!="dockerami_x"}'
            '[$__rate_interval]))) / on (job) sum(dockerami_instances)')
    assert references(expr) == {
        "dockerami_provisioning_seconds_bucket": {"job", "state", "le", "isolation"},
        "dockerami_instances": {"le", "isolation", "job"},
    }
    assert references("label_values(dockerami_instances, job)") == {
        "dockerami_instances": {"job"}}
    assert references('sum(rate(dockerami_ec2_requests_total[5m])) * 60') == {
        "dockerami_ec2_requests_total": set()}


def test_made_up_metrics_labels_and_legends_are_reported() -> None:
    series = in_process_page()
    shipped = dashboard()
    assert problems(shipped, series) == []

    broken = copy.deepcopy(shipped)
    targets = [t for p in panels(broken) for t in p.get("targets", [])]
    targets[0]["expr"] = 'sum(dockerami_made_up_total{job=~"$job"})'
    targets[1]["expr"] = 'sum by (flavour) (dockerami_instances{state="building"})'
    targets[2]["expr"] = "sum(rate(dockerami_ec2_requests[5m]))"  # the family, not _total
    targets[3]["expr"] = "sum(dockerami_provisioning_seconds)"  # a histogram has no such series
    targets[4]["legendFormat"] = "{{reason}}"
    found = problems(broken, series)
    assert len(found) == 5, found
    assert "no series dockerami_made_up_total" in found[0]
    assert "dockerami_instances has no label 'flavour'" in found[1]
    assert "no series dockerami_ec2_requests in" in found[2]
    assert "no series dockerami_provisioning_seconds in" in found[3]
    assert "legend {{reason}} is not kept" in found[4]


def test_the_dashboard_covers_the_fleet_and_is_provisioning_ready() -> None:
    shipped = dashboard()
    used: dict[str, set[str]] = {}
    for _, expr, _ in queries(shipped):
        for name, labels in references(expr).items():
            used.setdefault(name, set()).update(labels)
    for name, labels in REQUIRED.items():
        assert name in used and labels <= used[name], (name, used.get(name))
    # Loadable both ways: imported in the UI or provisioned from a file (no __inputs to
    # fill in), every query through the data source variable.
    assert shipped["id"] is None and shipped["uid"] and "__inputs" not in shipped
    (source,) = [v for v in shipped["templating"]["list"] if v["type"] == "datasource"]
    assert (source["name"], source["query"]) == ("DS_PROMETHEUS", "prometheus")
    chosen = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    ids, cells = set(), set()
    for panel in panels(shipped):
        assert panel["datasource"] == chosen, panel["title"]
        assert all(t["datasource"] == chosen for t in panel["targets"]), panel["title"]
        assert panel["id"] not in ids
        ids.add(panel["id"])
        box = panel["gridPos"]
        assert box["x"] + box["w"] <= 24, panel["title"]
        area = {(box["x"] + dx, box["y"] + dy) for dx in range(box["w"]) for dy in range(box["h"])}
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
    provisioning = yaml.safe_load(PROVISIONING.read_text())
    assert provisioning["apiVersion"] == 1
    (provider,) = provisioning["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")


@pytest.mark.parametrize("openmetrics", [False, True])
def test_every_query_is_served_by_the_fleets_metrics(openmetrics: bool) -> None:
    assert problems(dashboard(), in_process_page(openmetrics)) == []


@pytest.mark.integration
def test_every_metric_and_label_the_dashboard_uses_is_on_a_real_masters_page(make_master):
    master = make_master(master_cfg(pool="'pool', count=2", build_wait_timeout=600,
                                    plugins={"dockerami": {}}))
    shipped = dashboard()
    for accept, openmetrics in (("", False), (PROMETHEUS_ACCEPT, True)):
        series = exposed(master.metrics(accept).text, openmetrics)
        assert series["dockerami_pool_instances"] == {"pool"}
        assert problems(shipped, series) == []
    # The per-pool series counts the pool's instance once a build has booted one.
    assert master.wait_request(master.force(), 90)["results"] == SUCCESS
    pool_line = 'dockerami_pool_instances{pool="pool"} 1.0'
    wait_for(lambda: pool_line in master.metrics().text, 30, "the pool's instance counted")
