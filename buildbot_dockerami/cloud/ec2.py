"""The EC2 operations the plugin needs, and a way to run them off the reactor thread.

``Ec2`` is plain blocking boto3. ``AsyncEc2`` runs each call in a dedicated
thread pool: every call is short (no waiting for a boot inside a thread), so
``CALLS_AT_ONCE`` threads serve a whole fleet. No buildbot imports here.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import boto3
from botocore.config import Config
from twisted.internet import threads
from twisted.python.threadpool import ThreadPool

from buildbot_dockerami.cloud.instances import (
    LAUNCH_TAG,
    MASTER_TAG,
    WORKER_TAG,
    InstanceStatus,
    tag_specifications,
)

T = TypeVar("T")

#: Seconds an EC2 answer may take before the call is retried (boto3's default is 60).
DEFAULT_TIMEOUT = 20.0
#: Attempts per call: boto3's standard retry mode backs off on throttling, 5xx, connection
#: errors and timeouts by itself, re-sending the same request (and so the same ClientToken).
MAX_ATTEMPTS = 6
#: EC2 calls one master has in flight at once: the fleet's threads (boto3 keeps as
#: many connections). EC2 takes a while to answer each call (the local cloud's ``api``
#: delay): with 8, a burst's launches went out in waves of 8, each one answer late.
#: Bursts larger than this still go out in waves; 64 measured worse on a 50-build
#: burst (the workers then connect closer together: bench/README.md).
CALLS_AT_ONCE = 32


def boto_config(timeout: float = DEFAULT_TIMEOUT) -> Config:
    """Every call has a deadline: a hung answer is retried, never waited for forever."""
    return Config(
        retries={"mode": "standard", "max_attempts": MAX_ATTEMPTS},
        connect_timeout=min(5.0, timeout), read_timeout=timeout,
        user_agent_extra="dockerami", max_pool_connections=CALLS_AT_ONCE,
    )


#: RunInstances' MetadataOptions unless metadata_options says otherwise (or a launch
#: template sets them): IMDSv2 only, the metadata service refuses token-less (v1)
#: requests; hop limit 2 so a bridged container of the seed's AMI can reach it.
DEFAULT_METADATA_OPTIONS: Mapping[str, Any] = {
    "HttpTokens": "required",
    "HttpEndpoint": "enabled",
    "HttpPutResponseHopLimit": 2,
}

#: DescribeInstances accepts at most this many values per filter.
DESCRIBE_CHUNK = 200
#: The spot price history's product descriptions of Linux: EC2 answers "Linux/UNIX" in
#: today's accounts, and "(Amazon VPC)" for the same price in some older ones (and moto).
SPOT_LINUX = ("Linux/UNIX", "Linux/UNIX (Amazon VPC)")


class CloudError(Exception):
    """An EC2 call failed in a way worth showing the operator verbatim."""


@dataclass(frozen=True)
class LaunchSpec:
    #: "" with a launch template: the template's ImageId is used.
    ami: str
    instance_type: str
    user_data: str
    tags: Mapping[str, str]
    subnet_id: str | None = None
    security_group_ids: Sequence[str] | None = None
    keypair_name: str | None = None
    instance_profile: str | None = None
    block_device_mappings: Sequence[Mapping[str, Any]] | None = None
    metadata_options: Mapping[str, Any] = field(default_factory=dict)
    #: Makes RunInstances idempotent: a retry after a lost answer returns the same instance.
    client_token: str = ""
    #: "spot" asks for a one-time spot instance through RunInstances (not the legacy API).
    market: str = "on-demand"
    #: RunInstances' LaunchTemplate ({'LaunchTemplateName' or 'LaunchTemplateId': ...,
    #: 'Version': ...}): the base that every other argument here overrides.
    launch_template: Mapping[str, Any] | None = None
    #: The template's own tags by resource type ("instance", "volume"): sent again with
    #: ours, so they hold whether EC2 merges the request's tags with the template's or not.
    template_tags: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    def run_instances_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {
            "InstanceType": self.instance_type,
            "MinCount": 1,
            "MaxCount": 1,
            "UserData": self.user_data,  # boto3 base64-encodes it
            "TagSpecifications": tag_specifications(self.tags, self.template_tags),
            "InstanceInitiatedShutdownBehavior": "terminate",
        }
        if self.ami:
            args["ImageId"] = self.ami
        if self.launch_template:
            args["LaunchTemplate"] = {key: str(value)
                                      for key, value in self.launch_template.items()}
        if self.client_token:
            args["ClientToken"] = self.client_token
        if self.market == "spot":
            args["InstanceMarketOptions"] = {
                "MarketType": "spot",
                "SpotOptions": {"SpotInstanceType": "one-time",
                                "InstanceInterruptionBehavior": "terminate"},
            }
        if self.metadata_options:
            args["MetadataOptions"] = dict(self.metadata_options)
        if self.subnet_id:
            args["SubnetId"] = self.subnet_id
        if self.security_group_ids:
            args["SecurityGroupIds"] = list(self.security_group_ids)
        if self.keypair_name:
            args["KeyName"] = self.keypair_name
        if self.instance_profile:
            key = "Arn" if self.instance_profile.startswith("arn:") else "Name"
            args["IamInstanceProfile"] = {key: self.instance_profile}
        if self.block_device_mappings:
            args["BlockDeviceMappings"] = [dict(m) for m in self.block_device_mappings]
        return args


@dataclass(frozen=True)
class Credentials:
    """Explicit AWS keys (the workers' identifier / secret_identifier settings)."""

    access_key_id: str
    secret_access_key: str = field(repr=False)


def resolve_region(region: str | None, session: boto3.session.Session | None = None) -> str | None:
    """Explicit region, then the session chain (AWS_DEFAULT_REGION, config), then AWS_REGION."""
    if region:
        return region
    session = session or boto3.session.Session()
    return session.region_name or os.environ.get("AWS_REGION") or None


def _status(instance: Mapping[str, Any]) -> InstanceStatus:
    reason = instance.get("StateReason", {}).get("Message") or instance.get(
        "StateTransitionReason", ""
    )
    tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
    launched = instance.get("LaunchTime")
    return InstanceStatus(
        instance_id=instance["InstanceId"],
        state=instance["State"]["Name"],
        reason=reason or "",
        instance_type=instance.get("InstanceType", ""),
        availability_zone=instance.get("Placement", {}).get("AvailabilityZone", ""),
        worker=tags.get(WORKER_TAG, ""),
        master=tags.get(MASTER_TAG, ""),
        launch_token=tags.get(LAUNCH_TAG, ""),
        launched_at=launched.timestamp() if hasattr(launched, "timestamp") else 0.0,
        market=instance.get("InstanceLifecycle") or "on-demand",
    )


#: What names a launch template in RunInstances' LaunchTemplate (exactly one of them).
TEMPLATE_KEYS = ("LaunchTemplateName", "LaunchTemplateId")


def template_name(template: Mapping[str, Any]) -> str:
    """How messages name a launch template: its name or id, and its version."""
    ref = next((template[k] for k in TEMPLATE_KEYS if k in template), "?")
    return f"{ref!r} version {template.get('Version', '$Default')}"


def image_filters(filters: Sequence[Mapping[str, Any]],
                  architecture: str | None = None) -> list[dict[str, Any]]:
    """DescribeImages filters: the operator's, available images only, and the
    architecture if one is asked for."""
    extra = [{"Name": "state", "Values": ["available"]}]
    if architecture:
        extra.append({"Name": "architecture", "Values": [architecture]})
    return [dict(f) for f in filters] + extra


def no_image_error(filters: Sequence[Mapping[str, Any]], owners: Sequence[str] | None,
                   architecture: str | None) -> CloudError:
    arch = f" for {architecture}" if architecture else ""
    return CloudError(
        f"no available AMI{arch} matches ami_filters={list(filters)!r} ami_owners={owners!r}")


#: Error codes EC2 uses when it throttles a caller.
THROTTLE_CODES = frozenset({"RequestLimitExceeded", "Throttling", "ThrottlingException"})

Observer = Callable[[str], None]


class Ec2:
    """Blocking EC2 calls through one boto3 client. Call only from a worker thread.

    ``on_request`` and ``on_throttle`` are told the operation name of every HTTP
    request sent (retries included) and of every throttled one, for metrics.
    """

    def __init__(
        self,
        region: str | None = None,
        endpoint_url: str | None = None,
        session: boto3.session.Session | None = None,
        on_request: Observer | None = None,
        on_throttle: Observer | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        credentials: Credentials | None = None,
    ) -> None:
        if credentials is not None:
            session = boto3.session.Session(
                aws_access_key_id=credentials.access_key_id,
                aws_secret_access_key=credentials.secret_access_key,
            )
        session = session or boto3.session.Session()
        self.region = resolve_region(region, session)
        if not self.region:
            raise CloudError(
                "no AWS region: pass region=..., or set AWS_REGION / AWS_DEFAULT_REGION"
            )
        self.client = session.client(
            "ec2", region_name=self.region, endpoint_url=endpoint_url,
            config=boto_config(timeout),
        )
        events = self.client.meta.events
        if on_request is not None:
            events.register(
                "before-send.ec2",
                lambda event_name, **_: on_request(event_name.rsplit(".", 1)[-1]),
            )
        if on_throttle is not None:

            def throttled(response: Any = None, operation: Any = None, **_: Any) -> None:
                code = (response or (None, {}))[1].get("Error", {}).get("Code")
                if code in THROTTLE_CODES:
                    on_throttle(operation.name)

            events.register("needs-retry.ec2", throttled)

    def run_instance(self, spec: LaunchSpec) -> InstanceStatus:
        response = self.client.run_instances(**spec.run_instances_args())
        return _status(response["Instances"][0])

    def describe(self, instance_ids: Sequence[str]) -> dict[str, InstanceStatus]:
        """One DescribeInstances per 200 ids; ids EC2 does not know are simply absent.

        A filter is used rather than InstanceIds because InstanceIds fails the whole
        call when any one id is unknown (eventual consistency right after launch).
        """
        found: dict[str, InstanceStatus] = {}
        ids = list(instance_ids)
        for start in range(0, len(ids), DESCRIBE_CHUNK):
            chunk = ids[start : start + DESCRIBE_CHUNK]
            paginator = self.client.get_paginator("describe_instances")
            pages = paginator.paginate(Filters=[{"Name": "instance-id", "Values": chunk}])
            for page in pages:
                for reservation in page["Reservations"]:
                    for instance in reservation["Instances"]:
                        status = _status(instance)
                        found[status.instance_id] = status
        return found

    def describe_tagged(self, tag: str, value: str) -> dict[str, InstanceStatus]:
        found: dict[str, InstanceStatus] = {}
        paginator = self.client.get_paginator("describe_instances")
        for page in paginator.paginate(Filters=[{"Name": f"tag:{tag}", "Values": [value]}]):
            for reservation in page["Reservations"]:
                for instance in reservation["Instances"]:
                    status = _status(instance)
                    found[status.instance_id] = status
        return found

    def terminate(self, instance_ids: Sequence[str]) -> dict[str, str]:
        """Terminate and return each instance's state as EC2 reports it afterwards."""
        response = self.client.terminate_instances(InstanceIds=list(instance_ids))
        return {
            item["InstanceId"]: item["CurrentState"]["Name"]
            for item in response["TerminatingInstances"]
        }

    def stop(self, instance_ids: Sequence[str]) -> dict[str, str]:
        response = self.client.stop_instances(InstanceIds=list(instance_ids))
        return {item["InstanceId"]: item["CurrentState"]["Name"]
                for item in response["StoppingInstances"]}

    def start(self, instance_ids: Sequence[str]) -> dict[str, str]:
        response = self.client.start_instances(InstanceIds=list(instance_ids))
        return {item["InstanceId"]: item["CurrentState"]["Name"]
                for item in response["StartingInstances"]}

    def set_user_data(self, instance_id: str, user_data: str) -> None:
        """Only while the instance is stopped (EC2's rule): a fresh credential per start.
        Unlike RunInstances', this UserData is given base64-encoded (boto3 then encodes
        the blob once more for the wire)."""
        self.client.modify_instance_attribute(
            InstanceId=instance_id, UserData={"Value": base64.b64encode(user_data.encode())})

    def console_output(self, instance_id: str) -> str:
        response = self.client.get_console_output(InstanceId=instance_id, Latest=True)
        return response.get("Output") or ""

    def newest_image(
        self, filters: Sequence[Mapping[str, Any]], owners: Sequence[str] | None,
        architecture: str | None = None,
    ) -> str:
        """The newest available image matching ``filters`` (and, if given, of that
        ``architecture``: an extra DescribeImages filter)."""
        args: dict[str, Any] = {"Filters": image_filters(filters, architecture)}
        if owners:
            args["Owners"] = list(owners)
        images = self.client.describe_images(**args)["Images"]
        if not images:
            raise no_image_error(filters, owners, architecture)
        newest = max(images, key=lambda image: image.get("CreationDate", ""))
        return newest["ImageId"]

    def image_architectures(self, ami_ids: Sequence[str]) -> dict[str, str]:
        """DescribeImages by id: each image's architecture ("" when EC2 names none). Ids
        EC2 does not know are absent (a filter, not ImageIds, which fails the call)."""
        response = self.client.describe_images(
            Filters=[{"Name": "image-id", "Values": list(ami_ids)}])
        return {image["ImageId"]: image.get("Architecture") or ""
                for image in response["Images"]}

    def instance_architectures(self, instance_types: Sequence[str]) -> dict[str, tuple[str, ...]]:
        """DescribeInstanceTypes: the architectures each type runs (ProcessorInfo's
        SupportedArchitectures, e.g. ('arm64',) or ('i386', 'x86_64')). A type EC2 does
        not know fails the whole call (InvalidInstanceType)."""
        found: dict[str, tuple[str, ...]] = {}
        paginator = self.client.get_paginator("describe_instance_types")
        for page in paginator.paginate(InstanceTypes=list(instance_types)):
            for item in page["InstanceTypes"]:
                found[item["InstanceType"]] = tuple(
                    item.get("ProcessorInfo", {}).get("SupportedArchitectures", []))
        return found

    def launch_template_data(self, template: Mapping[str, Any]) -> dict[str, Any]:
        """DescribeLaunchTemplateVersions: the LaunchTemplateData of the template's
        version (``template`` as RunInstances' LaunchTemplate; no Version: $Default)."""
        args: dict[str, Any] = {key: template[key] for key in TEMPLATE_KEYS if key in template}
        args["Versions"] = [str(template.get("Version", "$Default"))]
        versions = self.client.describe_launch_template_versions(**args)[
            "LaunchTemplateVersions"]
        if not versions:
            raise CloudError(f"launch template {template_name(template)} has no such version")
        return dict(versions[0].get("LaunchTemplateData") or {})

    def spot_prices(self, instance_types: Iterable[str],
                    zones: Iterable[str]) -> dict[tuple[str, str], float]:
        """The Linux spot price in effect now, USD per hour, of each (instance type,
        availability zone) EC2 offers among these: one DescribeSpotPriceHistory (and its
        pages) for them all. A start and end time of now asks for the price in effect
        then, not a history; pairs EC2 does not offer are absent."""
        types, zones = sorted(set(instance_types)), sorted(set(zones))
        if not types or not zones:
            return {}
        now = datetime.now(UTC)
        paginator = self.client.get_paginator("describe_spot_price_history")
        newest: dict[tuple[str, str], tuple[datetime, float]] = {}
        for page in paginator.paginate(
                InstanceTypes=types, ProductDescriptions=list(SPOT_LINUX),
                Filters=[{"Name": "availability-zone", "Values": zones}],
                StartTime=now, EndTime=now):
            for item in page["SpotPriceHistory"]:
                key = (item["InstanceType"], item["AvailabilityZone"])
                stamp = item.get("Timestamp") or now
                if key not in newest or stamp > newest[key][0]:
                    newest[key] = (stamp, float(item["SpotPrice"]))
        return {key: price for key, (_, price) in newest.items()}


class AsyncEc2:
    """``Ec2`` with every call returning a Deferred, run in a shared thread pool."""

    def __init__(self, ec2: Ec2, pool: ThreadPool, reactor: Any) -> None:
        self.ec2 = ec2
        self._pool = pool
        self._reactor = reactor
        #: Answers the fleet keeps per client because they rarely or never change
        #: (fleet/architecture.py: instance types' architectures; fleet/templates.py:
        #: launch template data, for a while). Keys are the keeper's own.
        self.memo: dict[Any, Any] = {}

    def _call(self, fn: Callable[..., T], *args: Any) -> Any:
        return threads.deferToThreadPool(self._reactor, self._pool, fn, *args)

    def run_instance(self, spec: LaunchSpec) -> Any:
        return self._call(self.ec2.run_instance, spec)

    def describe(self, instance_ids: Sequence[str]) -> Any:
        return self._call(self.ec2.describe, instance_ids)

    def describe_tagged(self, tag: str, value: str) -> Any:
        return self._call(self.ec2.describe_tagged, tag, value)

    def terminate(self, instance_ids: Sequence[str]) -> Any:
        return self._call(self.ec2.terminate, instance_ids)

    def console_output(self, instance_id: str) -> Any:
        return self._call(self.ec2.console_output, instance_id)

    def stop(self, instance_ids: Sequence[str]) -> Any:
        return self._call(self.ec2.stop, instance_ids)

    def start(self, instance_ids: Sequence[str]) -> Any:
        return self._call(self.ec2.start, instance_ids)

    def set_user_data(self, instance_id: str, user_data: str) -> Any:
        return self._call(self.ec2.set_user_data, instance_id, user_data)

    def newest_image(
        self, filters: Sequence[Mapping[str, Any]], owners: Sequence[str] | None,
        architecture: str | None = None,
    ) -> Any:
        return self._call(self.ec2.newest_image, filters, owners, architecture)

    def image_architectures(self, ami_ids: Sequence[str]) -> Any:
        return self._call(self.ec2.image_architectures, ami_ids)

    def instance_architectures(self, instance_types: Sequence[str]) -> Any:
        return self._call(self.ec2.instance_architectures, instance_types)

    def launch_template_data(self, template: Mapping[str, Any]) -> Any:
        return self._call(self.ec2.launch_template_data, template)

    def spot_prices(self, instance_types: Iterable[str], zones: Iterable[str]) -> Any:
        return self._call(self.ec2.spot_prices, list(instance_types), list(zones))
