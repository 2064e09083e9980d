"""The operator surface in buildbot's web server: ``c['www']['plugins']['dockerami'] = {}``.

Serves, under ``/plugins/dockerami/``:
  ``scripts.js`` the Fleet page of the web UI (menu entry "Fleet", route #/dockerami);
  ``metrics``    the fleet's metrics for Prometheus (text format or OpenMetrics);
  ``api/fleet``  every worker's state and instance, and orphaned instances, as JSON;
  ``api/control`` POST: pre-warm a worker, terminate an instance or an orphan (authz).

Plugin settings: ``{'prices': {'t3.large': 0.0832, ...}}``, on-demand USD per hour,
for the estimated cost so far; ``'anonymous_control': True`` lets visitors who are not
logged in use the controls (authz still applies; off unless set, see controls.py).
"""

from __future__ import annotations

from typing import Any

from buildbot.www.plugin import Application
from twisted.internet import defer
from twisted.web import resource

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
        prices = (self.app.config or {}).get("prices", {})
        status = yield fleet_status(Fleet.of(master), master.reactor.seconds(), prices)
        # Whether this user's page shows the controls (the API refuses others anyway).
        status["controls"] = yield may_control(master, request, self.app.config)
        return status


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


ep = FleetApplication()
