"""Where ``Heartbeat`` was imported from before the layers became packages:
``from buildbot_dockerami.multimaster import Heartbeat`` keeps working for one release.
Import it as ``from buildbot_dockerami import Heartbeat``."""

from buildbot_dockerami.fleet.multimaster import Heartbeat

__all__ = ["Heartbeat"]
