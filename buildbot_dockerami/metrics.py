"""Fleet metrics in the Prometheus text format. Pure: counters, histograms, rendering.

No client library: a handful of series, rendered on request by the www plugin
(``/plugins/dockerami/metrics``).
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable, Mapping

Labels = tuple[tuple[str, str], ...]

#: Provisioning latency buckets, seconds: from a launch request to the worker connecting.
LATENCY_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200)

HELP = {
    "dockerami_instance_launches_total": ("counter", "Instances launched (RunInstances)."),
    "dockerami_launch_failures_total": (
        "counter", "Launches or boots that failed, by reason."),
    "dockerami_provisioning_seconds": (
        "histogram", "Seconds from a launch request to its worker connecting."),
    "dockerami_ec2_requests_total": (
        "counter", "EC2 API requests sent (retries included), by operation."),
    "dockerami_ec2_throttles_total": (
        "counter", "EC2 API requests refused for throttling, by operation."),
    "dockerami_launch_answers_lost_total": (
        "counter", "RunInstances calls that never answered, by what the token lookup found."),
    "dockerami_untracked_terminated_total": (
        "counter", "Instances tagged for this master that no worker tracked, terminated."),
    "dockerami_instances_lost_total": (
        "counter", "Tracked instances EC2 reported gone (spot, console, ...), by state."),
    "dockerami_spot_interruptions_total": (
        "counter", "Spot instances interrupted by EC2 (notice or reclaim)."),
    "dockerami_launch_fallbacks_total": (
        "counter", "Launch options EC2 refused for capacity, the next one tried, by code."),
    "dockerami_connections_refused_total": (
        "counter", "Worker connections refused: not from the instance launched for them."),
    "dockerami_instances": ("gauge", "Instances this master owns, by state."),
    "dockerami_terminations_failing": (
        "gauge", "Instances whose termination failed and is being retried."),
}


def _labels(labels: Mapping[str, str] | None) -> Labels:
    return tuple(sorted((labels or {}).items()))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _format(name: str, labels: Labels, value: float) -> str:
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
    number = repr(float(value)) if value != int(value) else str(int(value))
    return f"{name}{{{inner}}} {number}" if inner else f"{name} {number}"


class Metrics:
    """Thread-safe: EC2 request counts arrive from the boto3 thread pool."""

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

    def render(self, gauges: Mapping[str, Iterable[tuple[Mapping[str, str], float]]]) -> str:
        """The exposition text; ``gauges`` are computed by the caller at scrape time."""
        lines: list[str] = []

        def header(name: str) -> None:
            kind, text = HELP.get(name, ("untyped", name))
            lines.append(f"# HELP {name} {text}")
            lines.append(f"# TYPE {name} {kind}")

        with self._lock:
            counters = {n: dict(s) for n, s in self._counters.items()}
            histograms = {
                n: {k: list(v) for k, v in s.items()} for n, s in self._histograms.items()
            }
        for name in sorted(set(counters) | {n for n, (k, _) in HELP.items() if k == "counter"}):
            header(name)
            for labels, value in sorted(counters.get(name, {}).items()):
                lines.append(_format(name, labels, value))
        for name in sorted(set(histograms) | {n for n, (k, _) in HELP.items()
                                              if k == "histogram"}):
            header(name)
            for labels, values in sorted(histograms.get(name, {}).items()):
                ordered = sorted(values)
                for bound in LATENCY_BUCKETS:
                    count = bisect.bisect_right(ordered, bound)
                    lines.append(_format(f"{name}_bucket", (*labels, ("le", str(bound))), count))
                lines.append(_format(f"{name}_bucket", (*labels, ("le", "+Inf")), len(ordered)))
                lines.append(_format(f"{name}_sum", labels, sum(ordered)))
                lines.append(_format(f"{name}_count", labels, len(ordered)))
        for name, series in sorted(gauges.items()):
            header(name)
            for labels, value in series:
                lines.append(_format(name, _labels(labels), value))
        return "\n".join(lines) + "\n"
