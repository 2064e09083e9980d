"""buildbot-dockerami: elastic EC2 build machines for buildbot, defined by Docker images."""

from importlib.resources import files

from buildbot_dockerami.fleet.multimaster import Heartbeat
from buildbot_dockerami.steps.aws import AwsCredentials
from buildbot_dockerami.steps.mirror import MirroredGit
from buildbot_dockerami.worker.fleet_settings import FleetSettings
from buildbot_dockerami.worker.latent import DockerAMILatentWorker
from buildbot_dockerami.worker.pool import worker_pool

__all__ = ["AwsCredentials", "DockerAMILatentWorker", "FleetSettings", "Heartbeat",
           "MirroredGit", "worker_pool"]
#: The one version source is www/VERSION: buildbot's plugin loader requires that file,
#: and setup.cfg reads it too.
__version__ = files(__name__).joinpath("www", "VERSION").read_text().strip()
