"""``FleetSettings``: the fleet-wide settings of a master, set once in ``c['services']``.

    c['services'].append(FleetSettings(reconcile_interval=30, ec2_timeout=20,
                                       max_stopped=10, max_stopped_age=24 * 3600,
                                       launch_on_request=True))

They concern every DockerAMILatentWorker of the master (one reconciler, one stopped
pool, the EC2 clients, the build queue), so no worker's configuration decides them.
Workers still take these keywords for one release, with a checkconfig warning; with
FleetSettings configured, its values win.
"""

from __future__ import annotations

from typing import Any

from buildbot import config
from buildbot.util import service

from buildbot_dockerami.config.checks import fleet_problems
from buildbot_dockerami.config.model import FLEET_WIDE, FleetWide
from buildbot_dockerami.fleet.service import Fleet


class FleetSettings(service.BuildbotService):
    name = "dockerami-fleet-settings"

    def checkConfig(self, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - set(FLEET_WIDE))
        for setting in unknown:
            config.error(f"FleetSettings: {setting}: unknown setting (one of "
                         f"{', '.join(FLEET_WIDE)})")
        if unknown:
            return
        for problem in fleet_problems(FleetWide(**kwargs)):
            config.error(f"FleetSettings: {problem}")

    def reconfigService(self, **kwargs: Any) -> Any:
        Fleet.of(self.master).configure(FleetWide(**kwargs))
        return super().reconfigService()

    def stopService(self) -> Any:
        # Removed from the configuration: the workers' own keywords (or defaults) again.
        # (When the master stops, the fleet stops after this and does not care.)
        fleet = self.master.namedServices.get(Fleet.SERVICE_NAME)
        if fleet is not None and not fleet.stopping:
            fleet.configure(None)
        return super().stopService()
