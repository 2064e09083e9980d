"""A stand-in for EC2 and the base AMI on one machine, for the demo and the tests.

``LocalCloud`` = a moto EC2 server on 127.0.0.1 (with fault injection) + a
hypervisor that boots each running instance's user data with a runtime. A
master pointed at it through ``AWS_ENDPOINT_URL`` cannot tell it from EC2,
except that instances are free and, unless ``delays`` say otherwise (see
``timing.Delays``), start in a blink.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import boto3

from buildbot_dockerami.localcloud.containers import ContainerRuntime, LegacyCrontabRuntime
from buildbot_dockerami.localcloud.ec2server import Ec2Server
from buildbot_dockerami.localcloud.hypervisor import Hypervisor, ProcessRuntime, Runtime
from buildbot_dockerami.localcloud.timing import Delays

#: Name of the base AMI registered in the local cloud; ami_filters can find it.
BASE_AMI_NAME = "dockerami-base-local"
#: The local cloud's base AMIs by architecture (as a Packer build of both makes them);
#: the hypervisor boots either the same way, on the local machine.
#: (x86_64 registered last: the newest, where no architecture is asked for).
BASE_AMI_NAMES = {"arm64": f"{BASE_AMI_NAME}-arm64", "x86_64": BASE_AMI_NAME}
LOCAL_ACCESS_KEY = "AKIDLOCALCLOUD"

__all__ = ["BASE_AMI_NAME", "BASE_AMI_NAMES", "Delays", "LocalCloud", "make_runtime"]


def make_runtime(runtime: str | Runtime, directory: Path) -> Runtime:
    """``process``: a buildbot-worker process per instance (no Docker needed);
    ``container``: the real bootstrap on the local Docker engine;
    ``legacy``: the seed's crontab line on the local Docker engine."""
    if not isinstance(runtime, str):
        return runtime
    if runtime == "process":
        return ProcessRuntime(directory)
    if runtime == "container":
        return ContainerRuntime(directory)
    if runtime == "legacy":
        return LegacyCrontabRuntime(directory)
    raise ValueError(f"unknown runtime {runtime!r}; choose process, container or legacy")


class LocalCloud:
    def __init__(self, state_dir: Path | str | None = None, port: int = 0,
                 region: str = "us-east-1", boot_delay: float = 0.0,
                 runtime: str | Runtime = "process", *, delays: Delays | None = None) -> None:
        """``boot_delay`` is a shorthand for ``delays.boot``."""
        self.region = region
        #: A state dir the cloud made itself is its to remove when it stops; a given one
        #: is the caller's (kept, e.g. to read the instances' logs after a run).
        self._owns_state_dir = not state_dir
        self.state_dir = Path(state_dir or tempfile.mkdtemp(prefix="dockerami-cloud-"))
        self.server = Ec2Server(port=port)
        self.delays = delays if delays is not None else Delays()
        if boot_delay:
            self.delays.boot = boot_delay
        self.delays.validate()
        self.server.faults.clock.delays = self.delays
        self.runtime = make_runtime(runtime, self.state_dir / "instances")
        self.hypervisor = Hypervisor(
            self.server.endpoint_url, region, self.runtime,
            lambda: self.server.instance_states(region), clock=self.server.faults.clock,
        )
        self.server.faults.console = self.hypervisor.console_output
        #: The x86_64 base AMI, and each architecture's (BASE_AMI_NAMES).
        self.base_ami_id = ""
        self.base_ami_ids: dict[str, str] = {}

    @property
    def endpoint_url(self) -> str:
        return self.server.endpoint_url

    @property
    def faults(self) -> Any:
        return self.server.faults

    def set_spot_price(self, instance_type: str, price: float, zone: str | None = None) -> None:
        """What DescribeSpotPriceHistory answers for the type, USD per hour, in ``zone``
        or in every zone moto offers it (moto's own answer is 0.00001 everywhere)."""
        self.server.faults.spot_prices[(instance_type, zone)] = price

    def env(self) -> dict[str, str]:
        """What a master (or any boto3 program) needs to talk to this cloud."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": LOCAL_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": "local",
            "AWS_DEFAULT_REGION": self.region,
        }

    def client(self, access_key: str = "AKIDINSPECTOR") -> Any:
        """A boto3 EC2 client for looking at the cloud (counted apart from the master)."""
        return boto3.client(
            "ec2", region_name=self.region, endpoint_url=self.endpoint_url,
            aws_access_key_id=access_key, aws_secret_access_key="local",
        )

    def start(self) -> LocalCloud:
        """Start serving, from an empty cloud.

        moto keeps its state per process, so two LocalClouds in one process would
        share instances: run one at a time (each start resets the state).
        """
        self.server.start()
        urllib.request.urlopen(
            urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST"),
            timeout=10,
        ).close()
        self.base_ami_ids = {
            arch: self.register_image(name, arch, "local stand-in for the dockerami base AMI")
            for arch, name in BASE_AMI_NAMES.items()}
        self.base_ami_id = self.base_ami_ids["x86_64"]
        self.hypervisor.start()
        logging.getLogger("dockerami.localcloud").info(
            "local cloud at %s, base AMI %s", self.endpoint_url, self.base_ami_id
        )
        return self

    def register_image(self, name: str, architecture: str = "x86_64",
                       description: str = "") -> str:
        """An available AMI of this ``architecture``. moto's RegisterImage takes no
        Architecture, so it is set on moto's own record of the image (its server runs
        in this process)."""
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.ec2.models import ec2_backends

        image_id = self.client().register_image(Name=name, Description=description)["ImageId"]
        ec2_backends[DEFAULT_ACCOUNT_ID][self.region].amis[image_id].architecture = architecture
        return image_id

    def stop(self) -> None:
        self.hypervisor.stop()
        self.server.stop()
        if self._owns_state_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def __enter__(self) -> LocalCloud:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
