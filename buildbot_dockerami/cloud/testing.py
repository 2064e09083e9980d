"""An in-memory EC2 for tests, shipped with the package (as treq ships treq.testing) so
that tests of code built on the plugin can use it too.

``FakeEc2`` has the blocking methods of ``ec2.Ec2`` and answers them as the local
cloud's EC2 server does (moto, plus EC2's ClientToken rule, which moto lacks): the same
states right after each call, the same errors, the same tags. Its faults are those of
the local cloud's ``FaultInjector`` (``inject``, ``throttle``, ``drop``, ``hang``,
``clear``, ``count``), counted per call of a method: what ``Ec2`` raises once boto3's
retries are spent. tests/test_fake_ec2_conformance.py runs one set of tests against
both, so a test on the fake sees what the local cloud would show it.

``InlineThreads`` stands in for the thread pool and the reactor of an ``AsyncEc2``:
each call runs at once on the caller's thread, so a test on a fake clock needs no
running reactor, and an answer can be held back until the test hands it over.

Like moto, and unlike EC2: stop and start of a terminated instance succeed, user data
can be changed in any state, and security groups, key pairs and instance profiles are
taken as given (moto checks that security groups exist). Images are only those the
test registers (moto also lists its own public ones), x86_64 unless registered
otherwise. Instance types are those of ``INSTANCE_TYPES`` and the ones a test adds
(moto knows every EC2 type). Launch templates keep their data as given; a launch
through one takes its ImageId (when the launch names none), KeyName, SecurityGroupIds
and instance tags, as moto does.

No buildbot imports, and nothing of the fleet or worker layers.
"""

from __future__ import annotations

import fnmatch
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import ClientError, ReadTimeoutError
from twisted.python import failure

from buildbot_dockerami.cloud.ec2 import (
    DESCRIBE_CHUNK,
    AsyncEc2,
    LaunchSpec,
    image_filters,
    no_image_error,
)
from buildbot_dockerami.cloud.instances import (
    LAUNCH_TAG,
    MASTER_TAG,
    WORKER_TAG,
    InstanceStatus,
)

#: moto's account: images registered here are owned by it ("self").
ACCOUNT_ID = "123456789012"
#: State reasons as moto (and EC2) word them.
USER_SHUTDOWN = "Client.UserInitiatedShutdown: User initiated shutdown"
SPOT_RECLAIMED = "Server.SpotInstanceTermination: Spot instance termination"
#: GetConsoleOutput gives at most the last 64 KiB.
CONSOLE_LIMIT = 64 * 1024
#: Ec2's method -> the EC2 action it calls (what faults, counts and holds are named by).
ACTIONS = {
    "run_instance": "RunInstances",
    "describe": "DescribeInstances",
    "describe_tagged": "DescribeInstances",
    "terminate": "TerminateInstances",
    "stop": "StopInstances",
    "start": "StartInstances",
    "set_user_data": "ModifyInstanceAttribute",
    "console_output": "GetConsoleOutput",
    "newest_image": "DescribeImages",
    "image_architectures": "DescribeImages",
    "instance_architectures": "DescribeInstanceTypes",
    "launch_template_data": "DescribeLaunchTemplateVersions",
    "spot_prices": "DescribeSpotPriceHistory",
}
#: The instance types the fake knows from the start, with their architectures as EC2
#: (and moto) give them; ``FakeEc2.add_instance_type`` adds others.
INSTANCE_TYPES: Mapping[str, tuple[str, ...]] = {
    "t2.micro": ("i386", "x86_64"), "m1.small": ("i386", "x86_64"),
    "t3.nano": ("x86_64",), "t3.micro": ("x86_64",), "t3.large": ("x86_64",),
    "m5.large": ("x86_64",), "c5.large": ("x86_64",), "c5.xlarge": ("x86_64",),
    "c6i.large": ("x86_64",), "c7g.large": ("arm64",), "m7g.large": ("arm64",),
    "t4g.micro": ("arm64",),
}
#: Tags EC2 (and moto) put on an instance launched from a template.
TEMPLATE_ID_TAG = "aws:ec2launchtemplate:id"
TEMPLATE_VERSION_TAG = "aws:ec2launchtemplate:version"
#: The spot price moto answers for every type and zone it offers, USD per hour.
MOTO_SPOT_PRICE = 0.00001
#: Instance types the fake offers in spot price history (moto: every type it knows),
#: in the zones ``<region>a`` to ``<region>d``; ``set_spot_price`` adds others.
SPOT_TYPES = frozenset(f"{family}.{size}" for family in ("t3", "t3a", "t4g", "m5", "c5")
                       for size in ("nano", "micro", "small", "medium", "large", "xlarge"))


def client_error(action: str, code: str, message: str = "", status: int = 400) -> ClientError:
    """The ClientError boto3 raises for an EC2 error answer."""
    return ClientError({"Error": {"Code": code, "Message": message},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, action)


def no_answer() -> ReadTimeoutError:
    """What ``Ec2`` raises when EC2 never answers in time (retries spent)."""
    return ReadTimeoutError(endpoint_url="fake-ec2")


@dataclass
class FakeInstance:
    instance_id: str
    ami: str
    instance_type: str
    availability_zone: str
    tags: dict[str, str]
    user_data: str
    launched_at: float
    market: str
    client_token: str
    subnet_id: str | None
    metadata_options: dict[str, Any]
    key_name: str | None = None
    security_group_ids: tuple[str, ...] = ()
    state: str = "running"
    reason: str = ""
    console: str = ""

    def status(self, state: str | None = None) -> InstanceStatus:
        """As DescribeInstances says it (or, with ``state``, a call's answer)."""
        return InstanceStatus(
            instance_id=self.instance_id, state=state or self.state,
            reason="" if state else self.reason, instance_type=self.instance_type,
            availability_zone=self.availability_zone, worker=self.tags.get(WORKER_TAG, ""),
            master=self.tags.get(MASTER_TAG, ""), launch_token=self.tags.get(LAUNCH_TAG, ""),
            launched_at=self.launched_at, market=self.market,
        )


@dataclass
class FakeImage:
    image_id: str
    name: str
    creation_date: str
    owner_id: str = ACCOUNT_ID
    state: str = "available"
    architecture: str = "x86_64"


@dataclass
class FakeTemplate:
    template_id: str
    name: str
    #: Version n's LaunchTemplateData is versions[n - 1].
    versions: list[dict[str, Any]]
    default_version: int = 1

    def version(self, wanted: Any, action: str) -> tuple[int, dict[str, Any]]:
        """Version ``wanted`` ($Latest, $Default or a number), as moto looks it up, or
        its error for ``action``."""
        text = str(wanted).lower()
        number = (len(self.versions) if text == "$latest" else
                  self.default_version if text == "$default" else
                  int(text) if text.isdigit() else 0)
        if not 1 <= number <= len(self.versions):
            raise client_error(
                action, "InvalidLaunchTemplateId.VersionNotFound",
                f"Could not find the specified version {wanted} for the launch template "
                f"with ID {self.template_id}.")
        return number, self.versions[number - 1]


@dataclass
class _Fault:
    action: str
    remaining: int
    error: Exception | None = None  # for inject: raised instead of carrying out the call
    kind: str = "inject"  # or "drop" (carried out, answer lost), "hang" (not carried out)
    lost: Callable[[], Exception] = no_answer


@dataclass
class _Call:
    action: str
    argument: Any
    fault: _Fault | None = field(default=None, repr=False)


class FakeEc2:
    """EC2 in memory, with ``Ec2``'s methods and the local cloud's fault hooks.

    ``instances`` and ``images`` are what EC2 holds; ``calls`` every call made, as
    (action, argument) pairs, faulted ones too. Thread-safe: an ``AsyncEc2`` over real
    threads may call it from several at once.
    """

    def __init__(self, region: str = "us-east-1", clock: Callable[[], float] = time.time) -> None:
        self.region = region
        self.clock = clock
        self.instances: dict[str, FakeInstance] = {}
        self.images: dict[str, FakeImage] = {}
        self.subnets: dict[str, str] = {}
        self.instance_types: dict[str, tuple[str, ...]] = dict(INSTANCE_TYPES)
        self.templates: dict[str, FakeTemplate] = {}
        self.calls: list[tuple[str, Any]] = []
        self._faults: list[_Fault] = []
        self._tokens: dict[str, InstanceStatus] = {}
        #: Spot prices set by the test: (type, zone or None for every zone) -> USD/hour.
        self._spot_prices: dict[tuple[str, str | None], float] = {}
        self._lock = threading.RLock()

    # -- what the test sets up, and EC2's own doings (not calls) ---------------------------

    def register_image(self, name: str, creation_date: str | None = None,
                       architecture: str = "x86_64") -> str:
        """An available image owned by this account; ``creation_date`` as EC2 writes it
        (e.g. 2024-01-31T12:00:00.000Z), now by default."""
        image_id = "ami-" + uuid.uuid4().hex[:17]
        created = creation_date or time.strftime("%Y-%m-%dT%H:%M:%S.000Z",
                                                 time.gmtime(self.clock()))
        with self._lock:
            self.images[image_id] = FakeImage(image_id, name, created,
                                              architecture=architecture)
        return image_id

    def add_instance_type(self, instance_type: str, *architectures: str) -> None:
        """An instance type EC2 knows, running these architectures."""
        with self._lock:
            self.instance_types[instance_type] = tuple(architectures)

    def add_launch_template(self, name: str, data: Mapping[str, Any]) -> str:
        """A launch template (version 1, the default) with this LaunchTemplateData."""
        template_id = "lt-" + uuid.uuid4().hex[:17]
        with self._lock:
            self.templates[template_id] = FakeTemplate(template_id, name, [dict(data)])
        return template_id

    def add_template_version(self, template_id: str, data: Mapping[str, Any]) -> int:
        """A new version of the template (not made the default); its number."""
        with self._lock:
            versions = self.templates[template_id].versions
            versions.append(dict(data))
            return len(versions)

    def add_subnet(self, availability_zone: str) -> str:
        """A subnet in ``availability_zone``; launches into it are placed there."""
        subnet_id = "subnet-" + uuid.uuid4().hex[:17]
        with self._lock:
            self.subnets[subnet_id] = availability_zone
        return subnet_id

    def set_console(self, instance_id: str, text: str) -> None:
        """What the instance printed (GetConsoleOutput gives its last 64 KiB)."""
        with self._lock:
            self.instances[instance_id].console = text

    def terminated_elsewhere(self, instance_ids: Sequence[str]) -> None:
        """Another EC2 user (the console, another program) terminates: not one of this
        client's calls, so not in ``calls``."""
        with self._lock:
            for instance_id in instance_ids:
                self._end(self.instances[instance_id], USER_SHUTDOWN)

    def reclaim_spot(self, instance_id: str) -> None:
        """EC2 takes a spot instance back, as the local cloud's Hypervisor.interrupt does
        once its notice is over."""
        with self._lock:
            self._end(self.instances[instance_id], SPOT_RECLAIMED)

    def set_spot_price(self, instance_type: str, price: float, zone: str | None = None) -> None:
        """EC2's spot price for the type in ``zone``, or in every zone the fake offers
        (``<region>a`` to ``<region>d``) if None, as the local cloud's ``set_spot_price``
        sets it; the type is offered there from now on."""
        with self._lock:
            self._spot_prices[(instance_type, zone)] = price

    def status(self, instance_id: str) -> InstanceStatus:
        """What DescribeInstances would say of the instance, without a call."""
        with self._lock:
            return self.instances[instance_id].status()

    # -- faults: the FaultInjector's, per call of a method ---------------------------------

    def inject(self, action: str, code: str, message: str = "", count: int = 1,
               status: int = 400) -> None:
        """The next ``count`` calls of ``action`` fail with this EC2 error."""
        self._add(_Fault(action, count, client_error(action, code, message, status)))

    def throttle(self, action: str, count: int = 1) -> None:
        self.inject(action, "RequestLimitExceeded", "Request limit exceeded.", count, 503)

    def drop(self, action: str, count: int = 1, error: Exception | None = None) -> None:
        """The next ``count`` calls of ``action`` are carried out, but their answer is lost:
        they raise ``error`` (by default the read timeout boto3 raises)."""
        self._add(_Fault(action, count, kind="drop", lost=_raiser(error)))

    def hang(self, action: str, count: int = 1, error: Exception | None = None) -> None:
        """The next ``count`` calls of ``action`` never reach EC2: not carried out, they
        raise ``error`` (by default the read timeout boto3 raises)."""
        self._add(_Fault(action, count, kind="hang", lost=_raiser(error)))

    def clear(self) -> None:
        """Forget every queued fault: EC2 is healthy again."""
        with self._lock:
            self._faults.clear()

    def count(self, action: str) -> int:
        """Calls of ``action`` so far, faulted ones too."""
        with self._lock:
            return sum(1 for done, _ in self.calls if done == action)

    def requests(self, action: str) -> list[Any]:
        """The argument of every call of ``action`` so far (a LaunchSpec, a list of ids)."""
        with self._lock:
            return [argument for done, argument in self.calls if done == action]

    def _add(self, fault: _Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def _call(self, action: str, argument: Any) -> _Call:
        """Record the call and raise the fault due for it, if any; a dropped call is
        carried out first and ``_answer`` raises after."""
        with self._lock:
            self.calls.append((action, argument))
            fault = next((f for f in self._faults if f.action == action and f.remaining
                          and f.kind == "inject"), None)
            fault = fault or next((f for f in self._faults
                                   if f.action == action and f.remaining), None)
            if fault is None:
                return _Call(action, argument)
            fault.remaining -= 1
        if fault.kind == "inject":
            assert fault.error is not None
            raise fault.error
        if fault.kind == "hang":
            raise fault.lost()
        return _Call(action, argument, fault)

    @staticmethod
    def _answer(call: _Call, answer: Any) -> Any:
        if call.fault is not None:  # dropped: EC2 acted, the answer never came
            raise call.fault.lost()
        return answer

    # -- Ec2's methods -----------------------------------------------------------------------

    def run_instance(self, spec: LaunchSpec) -> InstanceStatus:
        call = self._call("RunInstances", spec)
        with self._lock:
            if spec.client_token and spec.client_token in self._tokens:
                return self._answer(call, self._tokens[spec.client_token])
            if not spec.tags:
                raise client_error("RunInstances", "InvalidParameterValue",
                                   "Tag specification must have at least one tag")
            ami, tags = spec.ami, dict(spec.tags)
            key_name, groups = spec.keypair_name, tuple(spec.security_group_ids or ())
            if spec.launch_template:
                template = self._template(spec.launch_template, "RunInstances")
                number, data = template.version(
                    spec.launch_template.get("Version", "$Default"), "RunInstances")
                ami = ami or data.get("ImageId", "")
                key_name = key_name or data.get("KeyName")
                groups = groups or tuple(data.get("SecurityGroupIds", ()))
                tags = {**_template_tags(data).get("instance", {}),
                        TEMPLATE_ID_TAG: template.template_id,
                        TEMPLATE_VERSION_TAG: str(number), **tags}
            zone = f"{self.region}a"
            if spec.subnet_id:
                if spec.subnet_id not in self.subnets:
                    raise client_error("RunInstances", "InvalidSubnetID.NotFound",
                                       f"The subnet ID '{spec.subnet_id}' does not exist")
                zone = self.subnets[spec.subnet_id]
            instance = FakeInstance(
                instance_id="i-" + uuid.uuid4().hex[:17], ami=ami,
                instance_type=spec.instance_type, availability_zone=zone,
                tags=tags, user_data=spec.user_data,
                launched_at=float(int(self.clock())),
                market="spot" if spec.market == "spot" else "on-demand",
                client_token=spec.client_token, subnet_id=spec.subnet_id,
                metadata_options=dict(spec.metadata_options),
                key_name=key_name, security_group_ids=groups,
                console="fake console output\n",
            )
            self.instances[instance.instance_id] = instance
            answer = instance.status("pending")
            if spec.client_token:
                self._tokens[spec.client_token] = answer
        return self._answer(call, answer)

    def describe(self, instance_ids: Sequence[str]) -> dict[str, InstanceStatus]:
        """Ids EC2 does not know are absent; one call per DESCRIBE_CHUNK ids, as Ec2's."""
        ids = list(instance_ids)
        found: dict[str, InstanceStatus] = {}
        for start in range(0, len(ids), DESCRIBE_CHUNK):
            chunk = ids[start:start + DESCRIBE_CHUNK]
            call = self._call("DescribeInstances", chunk)
            with self._lock:
                answer = {i: self.instances[i].status() for i in chunk if i in self.instances}
            found.update(self._answer(call, answer))
        return found

    def describe_tagged(self, tag: str, value: str) -> dict[str, InstanceStatus]:
        call = self._call("DescribeInstances", {f"tag:{tag}": value})
        with self._lock:
            answer = {i.instance_id: i.status() for i in self.instances.values()
                      if i.tags.get(tag) == value}
        return self._answer(call, answer)

    def terminate(self, instance_ids: Sequence[str]) -> dict[str, str]:
        call = self._call("TerminateInstances", list(instance_ids))
        with self._lock:
            for instance in self._known("TerminateInstances", instance_ids):
                self._end(instance, USER_SHUTDOWN)
        return self._answer(call, dict.fromkeys(instance_ids, "shutting-down"))

    def stop(self, instance_ids: Sequence[str]) -> dict[str, str]:
        call = self._call("StopInstances", list(instance_ids))
        with self._lock:
            for instance in self._known("StopInstances", instance_ids):
                instance.state, instance.reason = "stopped", USER_SHUTDOWN
        return self._answer(call, dict.fromkeys(instance_ids, "stopping"))

    def start(self, instance_ids: Sequence[str]) -> dict[str, str]:
        call = self._call("StartInstances", list(instance_ids))
        with self._lock:
            for instance in self._known("StartInstances", instance_ids):
                instance.state, instance.reason = "running", ""
        return self._answer(call, dict.fromkeys(instance_ids, "pending"))

    def set_user_data(self, instance_id: str, user_data: str) -> None:
        call = self._call("ModifyInstanceAttribute", (instance_id, user_data))
        with self._lock:
            (instance,) = self._known("ModifyInstanceAttribute", [instance_id])
            instance.user_data = user_data
        return self._answer(call, None)

    def console_output(self, instance_id: str) -> str:
        call = self._call("GetConsoleOutput", instance_id)
        with self._lock:
            (instance,) = self._known("GetConsoleOutput", [instance_id])
            text = instance.console[-CONSOLE_LIMIT:]
        return self._answer(call, text)

    def newest_image(self, filters: Sequence[Mapping[str, Any]],
                     owners: Sequence[str] | None, architecture: str | None = None) -> str:
        call = self._call("DescribeImages", (list(filters), owners, architecture))
        with self._lock:
            images = [i for i in self.images.values() if _owned(i, owners)
                      and all(_matches(i, f) for f in image_filters(filters, architecture))]
        if not images:
            self._answer(call, None)
            raise no_image_error(filters, owners, architecture)
        return self._answer(call, max(images, key=lambda i: i.creation_date).image_id)

    def image_architectures(self, ami_ids: Sequence[str]) -> dict[str, str]:
        call = self._call("DescribeImages", list(ami_ids))
        with self._lock:
            answer = {i: self.images[i].architecture for i in ami_ids if i in self.images}
        return self._answer(call, answer)

    def instance_architectures(self, instance_types: Sequence[str]) -> dict[str, tuple[str, ...]]:
        call = self._call("DescribeInstanceTypes", list(instance_types))
        with self._lock:
            unknown = [t for t in instance_types if t not in self.instance_types]
            if unknown:
                raise client_error(
                    "DescribeInstanceTypes", "InvalidInstanceType",
                    f"The following supplied instance types do not exist: [{', '.join(unknown)}]")
            answer = {t: self.instance_types[t] for t in instance_types}
        return self._answer(call, answer)

    def launch_template_data(self, template: Mapping[str, Any]) -> dict[str, Any]:
        call = self._call("DescribeLaunchTemplateVersions", dict(template))
        with self._lock:
            found = self._template(template, "DescribeLaunchTemplateVersions")
            _, data = found.version(template.get("Version", "$Default"),
                                    "DescribeLaunchTemplateVersions")
            answer = dict(data)
        return self._answer(call, answer)

    def _template(self, ref: Mapping[str, Any], action: str) -> FakeTemplate:
        """The template ``ref`` names, or moto's error for ``action``."""
        if "LaunchTemplateId" in ref:
            found = self.templates.get(ref["LaunchTemplateId"])
            if found is None:
                raise client_error(
                    action, "InvalidLaunchTemplateId.NotFound",
                    f"The specified launch template, with template ID "
                    f"{ref['LaunchTemplateId']}, does not exist.")
            return found
        for candidate in self.templates.values():
            if candidate.name == ref.get("LaunchTemplateName"):
                return candidate
        raise client_error(action, "InvalidLaunchTemplateName.NotFoundException",
                           _TEMPLATE_NOT_FOUND[action].format(ref.get("LaunchTemplateName")))

    def spot_prices(self, instance_types: Sequence[str],
                    zones: Sequence[str]) -> dict[tuple[str, str], float]:
        types, places = sorted(set(instance_types)), sorted(set(zones))
        if not types or not places:
            return {}
        call = self._call("DescribeSpotPriceHistory", (types, places))
        region_zones = {f"{self.region}{letter}" for letter in "abcd"}
        answer = {}
        with self._lock:
            for instance_type in types:
                for zone in places:
                    price = self._spot_prices.get((instance_type, zone))
                    if price is None and zone in region_zones:
                        price = self._spot_prices.get((instance_type, None), (
                            MOTO_SPOT_PRICE if instance_type in SPOT_TYPES else None))
                    if price is not None:
                        answer[(instance_type, zone)] = price
        return self._answer(call, answer)

    def _known(self, action: str, instance_ids: Sequence[str]) -> list[FakeInstance]:
        """The instances, or EC2's error for the whole call if one is unknown."""
        for instance_id in instance_ids:
            if instance_id not in self.instances:
                raise client_error(action, "InvalidInstanceID.NotFound",
                                   f"The instance ID '{instance_id}' does not exist")
        return [self.instances[i] for i in instance_ids]

    @staticmethod
    def _end(instance: FakeInstance, reason: str) -> None:
        instance.state, instance.reason = "terminated", reason


def _raiser(error: Exception | None) -> Callable[[], Exception]:
    return (lambda: error) if error is not None else no_answer


def _owned(image: FakeImage, owners: Sequence[str] | None) -> bool:
    return not owners or any(o in ("self", image.owner_id) for o in owners)


_IMAGE_FILTERS: dict[str, Callable[[FakeImage], str]] = {
    "name": lambda i: i.name, "image-id": lambda i: i.image_id, "state": lambda i: i.state,
    "owner-id": lambda i: i.owner_id, "architecture": lambda i: i.architecture,
}
#: moto words "no such template name" differently in the two calls.
_TEMPLATE_NOT_FOUND = {
    "DescribeLaunchTemplateVersions":
        "The specified launch template, with template name {}, does not exist.",
    "RunInstances":
        "At least one of the launch templates specified in the request does not exist.",
}


def _template_tags(data: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """A LaunchTemplateData's TagSpecifications, by resource type."""
    return {spec["ResourceType"]: {t["Key"]: t["Value"] for t in spec.get("Tags", [])}
            for spec in data.get("TagSpecifications", [])}


def _matches(image: FakeImage, flt: Mapping[str, Any]) -> bool:
    if flt["Name"] not in _IMAGE_FILTERS:
        raise NotImplementedError(f"FakeEc2 does not filter images by {flt['Name']!r}")
    value = _IMAGE_FILTERS[flt["Name"]](image)
    return any(fnmatch.fnmatchcase(value, pattern) for pattern in flt["Values"])


class InlineThreads:
    """The thread pool and the reactor of an ``AsyncEc2`` (``client(ec2)``), in one:
    each call runs at once on the caller's thread and its answer comes back at once,
    unless its EC2 action is held (``hold``): then the call is carried out, and its
    answer waits for ``release``, as one slow to arrive."""

    def __init__(self) -> None:
        self.holding: set[str] = set()
        self._held: list[tuple[str, Callable[[], None]]] = []

    def client(self, ec2: Any) -> AsyncEc2:
        """An AsyncEc2 over ``ec2`` (a FakeEc2, or anything with Ec2's methods)."""
        return AsyncEc2(ec2, self, self)  # type: ignore[arg-type]

    def hold(self, *actions: str) -> None:
        """Answers to these actions (e.g. "DescribeInstances") wait for ``release``."""
        self.holding.update(actions)

    def held(self, action: str | None = None) -> int:
        return sum(1 for name, _ in self._held if action in (None, name))

    def release(self, action: str | None = None, count: int | None = None) -> int:
        """Hand back the oldest ``count`` (default: all) held answers to ``action`` (any,
        if None); returns how many. Later calls of a held action are still held."""
        chosen = [entry for entry in self._held if action in (None, entry[0])][:count]
        for entry in chosen:
            self._held.remove(entry)
        for _, hand_back in chosen:
            hand_back()
        return len(chosen)

    # -- what deferToThreadPool asks of a thread pool and a reactor ---------------------------

    def callInThreadWithCallback(self, on_result: Callable[[bool, Any], None],
                                 func: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        try:
            result, ok = func(*args, **kwargs), True
        except Exception:
            result, ok = failure.Failure(), False
        action = ACTIONS.get(getattr(func, "__name__", ""), "")
        if action in self.holding:
            self._held.append((action, lambda: on_result(ok, result)))
        else:
            on_result(ok, result)

    def callFromThread(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        func(*args, **kwargs)
