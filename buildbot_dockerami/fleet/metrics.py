"""Fleet metrics for Prometheus: counts kept by the fleet, exposed through a
``prometheus_client`` custom collector that reads the fleet's state at scrape time.

Counters and histograms are plain numbers under a lock (EC2 request counts arrive
from the boto3 thread pool); gauges are computed from the workers when scraped.
Series every fleet has are present from the start with zero, so that ``rate()`` and
``increase()`` alerts see a counter before it first fires. The www plugin serves
them (``/plugins/dockerami/metrics``, www/metrics.py).
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from buildbot_dockerami.fleet import fallback

if TYPE_CHECKING:
    from buildbot_dockerami.fleet.service import Fleet

Labels = tuple[tuple[str, str], ...]

#: Provisioning latency buckets, seconds: from a launch request to the worker connecting.
LATENCY_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200)

#: The EC2 operations the plugin calls (every AsyncEc2 method's, tests/test_metrics.py
#: holds it to cloud/testing.ACTIONS): their request and throttle counters exist from
#: the start.
EC2_OPERATIONS = ("DescribeImages", "DescribeInstanceTypes", "DescribeInstances",
                  "DescribeLaunchTemplateVersions", "DescribeSpotPriceHistory",
                  "GetConsoleOutput", "ModifyInstanceAttribute", "RunInstances",
                  "StartInstances", "StopInstances", "TerminateInstances")
#: Launch failure reasons (dockerami_launch_failures_total) the plugin names itself, the
#: one place they are spelled: ``RunInstances:<EC2 error code>`` are EC2's.
INVALID_SETTING = "invalid_setting"  # a rendered setting that can never launch
POOL_CAP = "pool_cap"  # the pool is at its cap on all masters
LAUNCH_TEMPLATE = "launch_template"  # the template cannot be read or sets user data
NO_AMI = "no_ami"  # no AMI found for the instance type(s)
NO_ANSWER = "RunInstances:no_answer"  # RunInstances never answered, no instance found
NEVER_CONNECTED = "never_connected"  # missing_timeout passed
#: EC2 states a booting instance can die into (besides not being found at all).
DEAD_STATES = ("shutting-down", "stopped", "stopping", "terminated")


def died(state: str | None) -> str:
    """The reason for an instance that died while booting: ``instance_<state>``."""
    return f"instance_{state if state is not None else 'not_found'}"


#: Every reason that is not an EC2 error code: each counter exists (at 0) from the start.
FAILURE_REASONS = tuple(sorted(
    (INVALID_SETTING, POOL_CAP, LAUNCH_TEMPLATE, NO_AMI, NO_ANSWER, NEVER_CONNECTED,
     died(None), *map(died, DEAD_STATES))))
ISOLATION_MODES = ("none", "container", "instance")
INSTANCE_STATES = ("booting", "connected", "building", "idle", "terminating", "stopped")


@dataclass(frozen=True)
class Family:
    kind: str
    help: str
    label: str | None = None
    #: Label values present (at zero) before anything is counted.
    seeds: tuple[str, ...] = ()


#: Names as callers use them (``inc("dockerami_ec2_requests_total", ...)``); for counters
#: prometheus_client adds ``_total`` itself, so the family is named without it.
FAMILIES = {
    "dockerami_instance_launches_total": Family(
        "counter", "Instances launched (RunInstances that succeeded), by worker.", "worker"),
    "dockerami_launch_failures_total": Family(
        "counter", "Launches or boots that failed, by reason.", "reason", FAILURE_REASONS),
    "dockerami_provisioning_seconds": Family(
        "histogram", "Seconds from a launch request to its worker connecting.", "isolation",
        ISOLATION_MODES),
    "dockerami_ec2_requests_total": Family(
        "counter", "EC2 API requests sent (retries included), by operation.", "operation",
        EC2_OPERATIONS),
    "dockerami_ec2_throttles_total": Family(
        "counter", "EC2 API requests refused for throttling, by operation.", "operation",
        EC2_OPERATIONS),
    "dockerami_launch_answers_lost_total": Family(
        "counter", "RunInstances calls that never answered, by what the token lookup found.",
        "outcome", ("found", "not_found")),
    "dockerami_launch_fallbacks_total": Family(
        "counter", "Launch attempts refused for capacity and retried with the next "
        "(type, subnet, market), by EC2 error code.", "code",
        tuple(sorted(fallback.CAPACITY_CODES))),
    "dockerami_untracked_terminated_total": Family(
        "counter", "Instances tagged for this master that no worker tracked, terminated."),
    "dockerami_instances_lost_total": Family(
        "counter", "Tracked instances EC2 reported gone (spot, console, ...), by state.",
        "state", ("shutting-down", "stopped", "stopping", "terminated")),
    "dockerami_spot_interruptions_total": Family(
        "counter", "Spot instances interrupted by EC2 (notice or reclaim)."),
    "dockerami_stopped_starts_total": Family(
        "counter", "Stopped warm instances started again for a build."),
    "dockerami_connections_refused_total": Family(
        "counter", "Worker connections refused: not from the instance launched for them."),
    "dockerami_freed_slot_messages_total": Family(
        "counter", "Other masters' messages that a slot of a capped pool was freed (each "
        "read at once, not at the next pass)."),
    "dockerami_retirements_total": Family(
        "counter", "Instances that retire, by reason: their bootstrap said so (disk_full: "
        "the disk stayed too full after pruning) or the master drains them (max_builds, "
        "max_age, refresh_ami, refresh_image, spot_rebalance).", "reason",
        ("disk_full", "max_builds", "max_age", "refresh_ami", "refresh_image", "spot_rebalance",
         "other")),
    "dockerami_reclaimed_total": Family(
        "counter", "Instances of a dead master (heartbeat expired) this master terminated."),
    # Also labelled ``pool`` (empty outside a worker_pool; each pool's series from the
    # start, fleet/spending.py).
    "dockerami_cost_dollars_total": Family(
        "counter", "Estimated USD this master's instances cost, by pool and market "
        "(spot: EC2's spot price; on-demand: the configured or default price).", "market",
        ("on-demand", "spot")),
    "dockerami_instances": Family(
        "gauge", "Instances this master owns, by state.", "state", INSTANCE_STATES),
    "dockerami_terminations_failing": Family(
        "gauge", "Instances whose termination failed and is being retried."),
    "dockerami_pool_instances": Family(
        "gauge", "Instances this master has running or on their way, by pool (every "
        "configured pool, at zero too; stopped ones not counted).", "pool"),
}


def _labels(labels: Mapping[str, str] | None) -> Labels:
    return tuple(sorted((labels or {}).items()))


class Metrics:
    """The fleet's counters and histograms. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, dict[Labels, float]] = {}
        self._histograms: dict[str, dict[Labels, list[float]]] = {}

    def inc(self, name: str, labels: Mapping[str, str] | None = None, by: float = 1) -> None:
        with self._lock:
            series = self._counters.setdefault(name, {})
            key = _labels(labels)
            series[key] = series.get(key, 0) + by

    def observe(self, name: str, value: float, labels: Mapping[str, str] | None = None) -> None:
        with self._lock:
            self._histograms.setdefault(name, {}).setdefault(_labels(labels), []).append(value)

    def counter(self, name: str, labels: Mapping[str, str] | None = None) -> float:
        with self._lock:
            return self._counters.get(name, {}).get(_labels(labels), 0)

    def snapshot(self) -> tuple[dict[str, dict[Labels, float]], dict[str, dict[Labels, list]]]:
        with self._lock:
            return ({n: dict(s) for n, s in self._counters.items()},
                    {n: {k: list(v) for k, v in s.items()} for n, s in self._histograms.items()})


def _label_names(series: Iterable[Labels], family: Family | None) -> tuple[str, ...]:
    names = {name for labels in series for name, _ in labels}
    if family is not None and family.label:
        names.add(family.label)
    return tuple(sorted(names))


def _seeded(series: Mapping[Labels, Any], family: Family | None, seeds: Iterable[str],
            zero: Any) -> dict[Labels, Any]:
    """``series`` plus a zero sample for every seed value not yet in it (for a family
    without labels: its one sample)."""
    result = dict(series)
    if family is not None and family.label:
        for value in seeds:
            result.setdefault(((family.label, value),), zero)
    elif family is not None:
        result.setdefault((), zero)
    return result


def _buckets(values: list[float]) -> list[tuple[str, float]]:
    ordered = sorted(values)
    counts = [(floatToGoString(b), bisect.bisect_right(ordered, b)) for b in LATENCY_BUCKETS]
    return [*counts, ("+Inf", len(ordered))]


def families(metrics: Metrics, gauges: Mapping[str, Mapping[Labels, float]],
             workers: Iterable[str] = ()) -> list[Metric]:
    """Every metric family, from the counts, the scrape-time ``gauges`` and the names of
    the fleet's workers (instance groups for slots), which get a zero launch counter."""
    counters, histograms = metrics.snapshot()
    seeds = {"dockerami_instance_launches_total": tuple(workers)}
    # Per kind: its series by name, which declared families are present even unused
    # (gauges: only those given), the family type, a zero sample and a sample's values.
    kinds = (
        (counters, "counter", CounterMetricFamily, 0, lambda value: (value,)),
        (histograms, "histogram", HistogramMetricFamily, [],
         lambda values: (_buckets(values), sum(values))),
        (gauges, "", GaugeMetricFamily, 0, lambda value: (value,)),
    )
    result: list[Metric] = []
    for by_name, declared, make, zero, sample in kinds:
        for name in sorted(set(by_name) | {n for n, f in FAMILIES.items() if f.kind == declared}):
            family = FAMILIES.get(name)
            series = _seeded(by_name.get(name, {}), family,
                             seeds.get(name, family.seeds if family else ()), zero)
            names = _label_names(series, family)
            metric = make(name, family.help if family else name, labels=names)
            for labels, value in sorted(series.items()):
                given = dict(labels)
                metric.add_metric([given.get(n, "") for n in names], *sample(value))
            result.append(metric)
    return result


def labelled(metrics: Iterable[Metric], common: Mapping[str, str]) -> list[Metric]:
    """The families with ``common`` labels on every sample: with several masters,
    ``master``, so that each series is one master's own doing and a sum over masters
    is the fleet's."""
    result = list(metrics)
    for metric in result:
        metric.samples = [s._replace(labels={**s.labels, **common}) for s in metric.samples]
    return result


def common_labels(fleet: Fleet) -> dict[str, str]:
    """``{'master': <tag id>}`` under ``c['multiMaster']``; nothing for one master."""
    shared = getattr(fleet, "shared", None)
    config = getattr(getattr(shared, "master", None), "config", None)
    return {"master": fleet.master_id} if getattr(config, "multiMaster", False) else {}


#: Most advanced first: an instance shown once, in the state of its busiest slot.
_STATE_RANK = {"booting": 0, "connected": 1, "building": 2}


def instance_states(fleet: Fleet) -> Counter[str]:
    """How many instances this master owns, by state."""
    states: dict[str, str] = {}
    for worker in list(fleet.workers):
        instance = worker.instance
        if instance is None:
            continue
        if worker.busy:
            state = "building"
        elif worker.conn is not None:
            state = "connected"
        else:
            state = "booting"
        previous = states.get(instance.instance_id)
        if previous is None or _STATE_RANK[state] > _STATE_RANK[previous]:
            states[instance.instance_id] = state
    for group in fleet.groups.values():
        if group.instance is not None and group.instance.instance_id not in states:
            states[group.instance.instance_id] = "terminating" if group.terminating else "idle"
    for instance_id in fleet.stopped.by_instance():
        states.setdefault(instance_id, "stopped")
    return Counter(states.values())


def pool_instances(fleet: Fleet) -> dict[str, int]:
    """How many instances this master has running or on their way, per pool: every pool
    it knows, at zero too, so a dashboard's per-pool series start before the first launch.
    Read from memory, like every gauge here: a scrape never calls EC2."""
    pool_of: dict[str, str] = {}
    for worker in list(fleet.workers):
        if worker.pool is not None and worker.instance is not None:
            pool_of[worker.instance.instance_id] = worker.pool
    for group in fleet.groups.values():
        pool = next((m.pool for m in group.members.values() if getattr(m, "pool", None)), None)
        if group.instance is not None and pool is not None:
            pool_of.setdefault(group.instance.instance_id, pool)
    counts = Counter(pool_of.values())
    return {pool: counts.get(pool, 0) for pool in sorted(set(fleet.pool_limits) | set(counts))}


class FleetCollector:
    """A prometheus_client collector over one master's fleet (fleet.Fleet)."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    def collect(self) -> Iterator[Metric]:
        fleet = self.fleet
        fleet.spending.accrue()  # the cost counter up to now (memory only, no EC2 call)
        counts = instance_states(fleet)
        gauges = {
            "dockerami_instances": {(("state", s),): counts.get(s, 0) for s in INSTANCE_STATES},
            "dockerami_terminations_failing": {(): len(fleet.undead)},
            "dockerami_pool_instances": {
                (("pool", pool),): n for pool, n in pool_instances(fleet).items()},
        }
        owners = {w.group.name if w.group is not None else w.name for w in list(fleet.workers)}
        yield from labelled(families(fleet.metrics, gauges, sorted(owners)),
                            common_labels(fleet))
