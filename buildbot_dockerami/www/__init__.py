"""The operator surface in buildbot's web server: ``c['www']['plugins']['dockerami'] = {}``.

Serves, under ``/plugins/dockerami/``:
  ``scripts.js`` the Fleet page of the web UI (menu entry "Fleet", route #/dockerami);
  ``metrics``    the fleet's metrics for Prometheus (text format or OpenMetrics);
  ``api/fleet``  every worker's state and instance, and orphaned instances, as JSON;
  ``api/control`` POST: pre-warm a worker, terminate an instance or an orphan (authz).

Plugin settings: ``'anonymous_control': True`` lets visitors who are not logged in use
the controls (authz still applies; off unless set, see controls.py). The older
``{'prices': {'t3.large': 0.0832, ...}}`` (on-demand USD per hour) is handed to the
fleet, under FleetSettings' ``prices`` (the place for them now: builds and metrics use
them too).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from buildbot.www.plugin import Application
from twisted.internet import defer
from twisted.python import log
from twisted.web import resource

from buildbot_dockerami.config.checks import price_problems
from buildbot_dockerami.fleet.service import Fleet
from buildbot_dockerami.patches import rest as restfix
from buildbot_dockerami.www.controls import ControlResource, may_control
from buildbot_dockerami.www.jsonapi import AppResource, answer
from buildbot_dockerami.www.metrics import MetricsResource
from buildbot_dockerami.www.status import fleet_status


class FleetResource(AppResource):
    def render_GET(self, request: Any) -> Any:
        return answer(request, self._status(request), "fleet status")

    @defer.inlineCallbacks
    def _status(self, request: Any) -> Any:
        master = self.app.master
        status = yield fleet_status(Fleet.of(master), master.reactor.seconds())
        # Whether this user's page shows the controls (the API refuses others anyway).
        status["controls"] = yield may_control(master, request, self.app.config)
        return status


def page_prices(given: Any) -> dict[str, float]:
    """The older ``prices`` plugin setting, its unusable entries left out (and logged)."""
    problems = price_problems(given)
    for problem in problems:
        log.msg(f"dockerami: c['www']['plugins']['dockerami']: {problem}: ignored")
    if problems and not isinstance(given, Mapping):
        return {}
    usable = {}
    for instance_type, price in (given or {}).items():
        if not price_problems({instance_type: price}):
            usable[instance_type] = float(price)
    return usable


class FleetApplication(Application):
    config: Any = None

    def __init__(self) -> None:
        super().__init__(__name__, "buildbot-dockerami: fleet page, metrics, status", ui=True)
        self.resource.putChild(b"metrics", MetricsResource(self))
        api = resource.Resource()
        api.putChild(b"fleet", FleetResource(self))
        api.putChild(b"control", ControlResource(self))
        self.resource.putChild(b"api", api)

    def setConfiguration(self, config: Any) -> None:
        # Called only when the plugin is configured (buildbot imports every installed
        # plugin); the workaround for buildbot's threaded REST writes goes in here.
        super().setConfiguration(config)
        restfix.install()
        master = getattr(self, "master", None)
        if master is None:
            return
        prices = page_prices((config or {}).get("prices"))
        fleet = master.namedServices.get(Fleet.SERVICE_NAME)
        if fleet is None and prices:
            fleet = Fleet.of(master)
        if fleet is not None:
            fleet.page_prices = prices


ep = FleetApplication()
