"""``/plugins/dockerami/metrics``: the fleet's metrics for Prometheus.

The format follows the scraper's Accept header, as prometheus_client's own HTTP
handlers do: OpenMetrics when asked for (Prometheus asks by default), the classic
text format otherwise (curl, older scrapers).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from buildbot_dockerami.fleet.metrics import FleetCollector
from buildbot_dockerami.fleet.service import Fleet
from buildbot_dockerami.www.jsonapi import AppResource


def exposition(fleet: Fleet, accept: str) -> tuple[bytes, str]:
    """The scrape's body and content type for this Accept header."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(fleet))
    encoder, content_type = choose_encoder(accept)
    return encoder(registry), content_type


class MetricsResource(AppResource):
    def render_GET(self, request: Any) -> bytes:
        accept = (request.getHeader(b"accept") or b"").decode("latin-1")
        body, content_type = exposition(Fleet.of(self.app.master), accept)
        request.setHeader(b"content-type", content_type.encode())
        return body
