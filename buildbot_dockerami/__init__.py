"""buildbot-dockerami: elastic EC2 build machines for buildbot, defined by Docker images."""

from buildbot_dockerami.worker import DockerAMILatentWorker, worker_pool

__all__ = ["DockerAMILatentWorker", "worker_pool"]
__version__ = "0.1.0"
