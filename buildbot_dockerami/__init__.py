"""buildbot-dockerami: elastic EC2 build machines for buildbot, defined by Docker images."""

from buildbot_dockerami.worker import DockerAMILatentWorker

__all__ = ["DockerAMILatentWorker"]
__version__ = "0.1.0"
