"""What ``buildbot checkconfig`` and each launch verify, as "setting: message" strings.

Literal settings are checked at config time; renderable ones once rendered for a
build. The checks themselves live in protocol/userdata.py and validators.py.
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any

from buildbot.interfaces import IRenderable

from buildbot_dockerami.cloud.ec2 import resolve_region
from buildbot_dockerami.config import validators
from buildbot_dockerami.config.credentials import key_problems
from buildbot_dockerami.config.model import WORKER_SETTINGS, FleetWide, WorkerSettings
from buildbot_dockerami.fleet import architecture, schedule
from buildbot_dockerami.fleet.fallback import MARKETS, as_list
from buildbot_dockerami.fleet.reconcile_plan import MIN_INTERVAL
from buildbot_dockerami.fleet.stopped_pool import IDLE_ACTIONS
from buildbot_dockerami.protocol import caches, limits, registry, tls, userdata
from buildbot_dockerami.protocol.userdata import UserData, UserDataError

#: "none": an instance serves builds until idle; "container": a fresh container per
#: build on a kept instance; "instance": a fresh instance per build.
ISOLATION_MODES = ("none", "container", "instance")

#: Stand-ins for values only known at launch, used to check the size limit early.
_LONGEST_PASSWORD = "p" * 32
_LONGEST_MASTER = ".".join(["m" * 63] * 3 + ["m" * 61]) + ":65535"


def _is_renderable(value: Any) -> bool:
    return IRenderable.providedBy(value)


def config_problems(name: Any, password: Any, **values: Any) -> list[str]:
    """settings_problems for WorkerSettings fields given as keywords (the rest take
    their defaults)."""
    return settings_problems(name, password, WorkerSettings(**values))


def settings_problems(name: Any, password: Any, s: WorkerSettings) -> list[str]:
    """Every problem checkable before a build exists, as "setting: message" strings."""
    image, ami, ami_filters, ami_owners = s.image, s.ami, s.ami_filters, s.ami_owners
    instance_type, region, master_address = s.instance_type, s.region, s.master_address
    setup_repo, setup_branch, session, isolation = (s.setup_repo, s.setup_branch, s.session,
                                                    s.isolation)
    problems: list[str] = []

    def check(fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except UserDataError as e:
            problems.append(str(e))

    if name is None:
        problems.append("name: is required (the worker's name, the first argument)")
    else:
        check(userdata.check_word, "name", name)
    if password is not None and not _is_renderable(password):
        check(userdata.check_secret_word, "password", password)
    if image is None:
        problems.append("image: is required (the Docker image the instance runs)")
    elif not _is_renderable(image):
        check(userdata.check_image, image)
    if instance_type is None:
        problems.append("instance_type: is required (e.g. 't3.large')")
    elif not _is_renderable(instance_type):
        check(validators.check_instance_type, instance_type)
    if ami is not None and ami_filters is not None:
        problems.append("ami: give exactly one of ami= or ami_filters= (with ami_owners=)")
    elif ami is None and ami_filters is None and s.launch_template is None:
        problems.append("ami: give exactly one of ami= or ami_filters= (with ami_owners=), "
                        "or a launch_template whose ImageId is used")
    elif ami is not None and not _is_renderable(ami):
        before = len(problems)
        check(validators.check_ami, ami, _is_renderable)
        if len(problems) == before:
            problems.extend(architecture_problems(ami, instance_type))
    elif ami_filters is not None:
        check(validators.check_ami_filters, ami_filters, ami_owners)
    if ami_owners is not None and ami_filters is None:
        problems.append("ami_owners: only makes sense with ami_filters")
    if master_address is not None:
        check(userdata.check_master_address, master_address)
    for setting, value in (("setup_repo", setup_repo), ("setup_branch", setup_branch)):
        if value is not None and not _is_renderable(value):
            check(userdata.check_word, setting, value)
            check(check_not_option, setting, value)
    if setup_branch is not None and setup_repo is None:
        problems.append("setup_branch: needs setup_repo")
    if s.subnet_id is not None:
        check(validators.check_subnet_id, s.subnet_id)
    if s.security_group_ids is not None:
        check(validators.check_security_group_ids, s.security_group_ids)
    if s.tags is not None:
        check(validators.check_tags, s.tags)
    if s.block_device_mappings is not None:
        check(validators.check_block_device_mappings, s.block_device_mappings)
    if s.metadata_options is not None:
        check(validators.check_metadata_options, s.metadata_options)
    plain: list[tuple[str, Any, Callable[[Any], None]]] = [
        ("keypair_name", s.keypair_name, validators.check_keypair_name),
        ("instance_profile", s.instance_profile, validators.check_instance_profile),
        ("region", region, validators.check_region),
        ("endpoint_url", s.endpoint_url, validators.check_endpoint_url),
        ("session", session, validators.check_session),
        ("launch_template", s.launch_template, validators.check_launch_template),
    ]
    for setting, value, fn in plain:
        if value is None:
            continue
        if _is_renderable(value):
            problems.append(f"{setting}: cannot be a renderable (it is not rendered per build)")
        else:
            check(fn, value)
    if s.pool is not None and (not isinstance(s.pool, str) or not s.pool.strip()):
        problems.append(f"pool: {validators.short(s.pool)} must be a non-empty name")
    if isolation not in ISOLATION_MODES:
        problems.append(f"isolation: {isolation!r} is not one of {', '.join(ISOLATION_MODES)}")
    group = s.instance_group
    if group is not None:
        if isolation != "container":
            problems.append("instance_group: only with isolation='container'")
        elif not isinstance(group, str) or not group.strip() or any(c.isspace() for c in group):
            problems.append(f"instance_group: {group!r} must be a non-empty word")
    if _is_renderable(s.container_limits):
        problems.append("container_limits: cannot be a renderable (it is not rendered per "
                        "build)")
    else:
        problems += limits.problems(s.container_limits)
    bad_source = any(p.startswith(("region:", "session:")) for p in problems)
    if not bad_source and not resolve_region(region, session):
        problems.append(
            "region: no AWS region configured; pass region=... or set AWS_REGION / "
            "AWS_DEFAULT_REGION (or a region in ~/.aws/config)"
        )
    if not problems and not any(_is_renderable(v) for v in (image, setup_repo, setup_branch)):
        check(
            userdata.render,
            UserData(
                name,
                password if isinstance(password, str) else _LONGEST_PASSWORD,
                master_address or _LONGEST_MASTER,
                image,
                setup_repo,
                setup_branch,
            ),
        )
    return problems + fleet_problems(s) + lifecycle_problems(s) + warm_problems(s) + key_problems(
        s.identifier, s.secret_identifier, session) + tls.fingerprint_problems(
        s.master_tls_fingerprint) + registry_problems(s) + disk_problems(s) + drain_problems(s)


def registry_problems(s: WorkerSettings) -> list[str]:
    """``registry_credentials``: a known scheme and a valid name, not a renderable (the
    name goes into the user data as it is)."""
    if _is_renderable(s.registry_credentials):
        return ["registry_credentials: cannot be a renderable (it names where the "
                "credentials live, e.g. 'ssm:/ci/registry')"]
    return registry.problems(s.registry_credentials)


def settings_warnings(s: WorkerSettings) -> list[str]:
    """What checkconfig warns about (not errors: the setup may still work), as
    "setting: message" strings."""
    image = None if _is_renderable(s.image) else s.image
    return registry.warnings(image, s.registry_credentials, s.instance_profile)


def architecture_problems(ami: Any, instance_type: Any) -> list[str]:
    """An instance type whose architecture (known from its name) has no AMI in a
    per-architecture ``ami``: it could never launch."""
    if not isinstance(ami, Mapping) or instance_type is None or _is_renderable(instance_type):
        return []
    problems = []
    for itype in as_list(instance_type):
        arch = architecture.guess(itype) if isinstance(itype, str) else None
        if arch is not None and arch not in ami:
            problems.append(f"ami: has no AMI for {arch}, the architecture of instance_type "
                            f"{itype!r} (ami has {', '.join(sorted(map(str, ami)))})")
    return problems


def fleet_problems(s: FleetWide | WorkerSettings) -> list[str]:
    """The fleet-wide settings (on FleetSettings, or still on a worker)."""
    problems = []
    for setting, value, least in (
        ("reconcile_interval", s.reconcile_interval, MIN_INTERVAL),
        ("ec2_timeout", s.ec2_timeout, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int | float) or value < least:
            problems.append(f"{setting}: {value!r} must be a number of seconds >= {least:g}")
    if isinstance(s.max_stopped, Mapping):
        problems += schedule_problems("max_stopped", s.max_stopped)
    elif (isinstance(s.max_stopped, bool) or not isinstance(s.max_stopped, int)
            or s.max_stopped < 0):
        problems.append(f"max_stopped: {s.max_stopped!r} must be a whole number >= 0")
    age = s.max_stopped_age
    if isinstance(age, bool) or not isinstance(age, int | float) or age <= 0:
        problems.append(f"max_stopped_age: {age!r} must be seconds > 0")
    if not isinstance(s.launch_on_request, bool):
        problems.append(f"launch_on_request: {s.launch_on_request!r} must be True or False")
    if isinstance(s, FleetWide):
        problems += price_problems(s.prices)
        problems += token_service_problems(s.registry_token_services)
        for setting in ("ami_refresh_interval", "image_refresh_interval"):
            every = getattr(s, setting)
            if (isinstance(every, bool) or not isinstance(every, int | float)
                    or not MIN_INTERVAL <= every < float("inf")):
                problems.append(f"{setting}: {every!r} must be a number of seconds "
                                f">= {MIN_INTERVAL:g}")
    return problems


_HOST = re.compile(r"^(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
                   r"(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")


def token_service_problems(services: Any) -> list[str]:
    """FleetSettings' ``registry_token_services``: registry host -> token service host
    (or a list of them), host names only (no scheme, port or path)."""
    if services is None:
        return []
    example = "{'registry.example.com': 'gitlab.example.com'}"
    if not isinstance(services, Mapping):
        return [f"registry_token_services: {services!r} must be a dict of registry host -> "
                f"token service host, e.g. {example}"]
    problems = []
    for registry_host, hosts in services.items():
        named = [hosts] if isinstance(hosts, str) else hosts
        if not isinstance(named, list | tuple) or not named:
            problems.append(f"registry_token_services: {registry_host!r}: {hosts!r} must be "
                            "a host name or a list of them")
            continue
        for host in (registry_host, *named):
            if not isinstance(host, str) or not _HOST.match(host):
                problems.append(f"registry_token_services: {host!r} is not a host name in "
                                f"lowercase without scheme, port or path, e.g. {example}")
    return problems


def price_problems(prices: Any) -> list[str]:
    """FleetSettings' ``prices``: instance type (or ``stopped``) -> USD per hour."""
    if prices is None:
        return []
    if not isinstance(prices, Mapping):
        return [f"prices: {prices!r} must be a dict of instance type -> on-demand USD per "
                "hour, e.g. {'t3.large': 0.0832}"]
    problems = []
    for instance_type, price in prices.items():
        if not isinstance(instance_type, str) or not instance_type.strip():
            problems.append(f"prices: {instance_type!r} is not an instance type")
        elif (isinstance(price, bool) or not isinstance(price, int | float)
              or not 0 <= price < float("inf")):
            problems.append(f"prices: {instance_type}: {price!r} must be USD per hour, "
                            "a number >= 0")
    return problems


def lifecycle_problems(s: WorkerSettings) -> list[str]:
    """The market and what an idle instance becomes."""
    problems = []
    if s.market not in MARKETS:
        problems.append(f"market: {s.market!r} is not one of {', '.join(MARKETS)}")
    if s.idle_action not in IDLE_ACTIONS:
        problems.append(f"idle_action: {s.idle_action!r} is not one of "
                        f"{', '.join(IDLE_ACTIONS)}")
    elif s.idle_action == "stop" and s.isolation != "none":
        problems.append("idle_action: 'stop' needs isolation='none' (an isolated build "
                        "never reuses what another build left on the disk)")
    return problems


def schedule_problems(setting: str, spec: Any) -> list[str]:
    """A number or periods (fleet/schedule.py): overlaps, days, times, zones."""
    if _is_renderable(spec):
        return [f"{setting}: cannot be a renderable (it is not rendered per build)"]
    try:
        schedule.parse(spec)
    except schedule.ScheduleError as e:
        return [f"{setting}: {e}"]
    return []


def warm_problems(s: WorkerSettings) -> list[str]:
    """A configured warm minimum belongs to a pool."""
    if s.min_warm is None:
        return []
    if s.pool is None:
        return ["min_warm: needs pool= (a warm minimum is a pool's: use worker_pool(...))"]
    return schedule_problems("min_warm", s.min_warm)


def disk_problems(s: WorkerSettings) -> list[str]:
    """Caches and the free-space floor (protocol/caches.py): literal values only, and
    caches only where an instance serves more than one build."""
    problems = []
    for setting, value, check in (("caches", s.caches, caches.cache_problems),
                                  ("disk_floor", s.disk_floor, caches.disk_floor_problems)):
        if _is_renderable(value):
            problems.append(f"{setting}: cannot be a renderable (it is not rendered per build)")
        else:
            problems += check(value)
    if s.caches is not None and s.isolation == "instance":
        problems.append("caches: not with isolation='instance' (each build's instance is "
                        "terminated with its disk; use isolation='container')")
    return problems


def drain_problems(s: WorkerSettings) -> list[str]:
    """When an instance drains (fleet/retirement.py): a whole number of builds, seconds."""
    problems = []
    count = s.max_builds_per_instance
    if count is not None and (isinstance(count, bool) or not isinstance(count, int)
                              or count < 1):
        problems.append(f"max_builds_per_instance: {count!r} must be a whole number >= 1 "
                        "(or None: no cap)")
    age = s.max_instance_age
    if age is not None and (isinstance(age, bool) or not isinstance(age, int | float)
                            or not 0 < age < float("inf")):
        problems.append(f"max_instance_age: {age!r} must be seconds > 0 (or None: no cap)")
    return problems


def cache_builds_problems(s: WorkerSettings, max_builds: Any) -> list[str]:
    """Without isolation one container serves every build, and holds one builder's caches
    at a time: builds of two builders must not overlap in it."""
    if s.caches is not None and s.isolation == "none" and max_builds != 1:
        return ["caches: with isolation='none' needs max_builds=1 (the worker's one "
                "container holds one builder's caches at a time), or use "
                "isolation='container'"]
    return []


def check_not_option(setting: str, value: str) -> None:
    """The image hands setup_repo and setup_branch to git: a leading '-' is an option."""
    if isinstance(value, str) and value.startswith("-"):
        raise UserDataError(setting, "must not start with '-' (git would take it as an option)")


def rendered_problems(values: dict[str, Any]) -> list[str]:
    """Checks for values only known once rendered for a build. A rendered value may hold
    a secret (util.Secret, util.Interpolate('%(secret:...)s')), so no message quotes it."""
    problems: list[str] = []
    checks: list[tuple[Any, str, tuple]] = [
        (userdata.check_image, "image", (values["image"],)),
        (validators.check_instance_type, "instance_type", (values["instance_type"],)),
    ]
    if values["ami"] is not None:
        checks.append((validators.check_ami, "ami", (values["ami"],)))
    for setting in ("setup_repo", "setup_branch"):
        if values[setting] is not None:
            checks.append((userdata.check_secret_word, setting, (setting, values[setting])))
            checks.append((check_not_option, setting, (setting, values[setting])))
    for fn, setting, args in checks:
        try:
            fn(*args)
        except UserDataError as e:
            value = values[setting]
            message = e.message
            # an AMI per architecture: each of its ids is a rendered value too
            for part in [value, *(value.values() if isinstance(value, Mapping) else ())]:
                message = message.replace(repr(part), "the rendered value")
                if isinstance(part, str) and part:
                    message = message.replace(part, "***")
            problems.append(f"rendered {e.setting}: {message}")
    return problems


# -- buildbot's own worker settings and unknown keywords --------------------------------


def accepted_keywords(cls: type) -> set[str]:
    """Every keyword a worker of ``cls`` takes: the settings model's, and those some
    checkConfig in its MRO names (buildbot's)."""
    names: set[str] = set(WORKER_SETTINGS)
    for klass in cls.__mro__:
        fn = klass.__dict__.get("checkConfig")
        if fn is None:
            continue
        for p in inspect.signature(fn).parameters.values():
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self":
                names.add(p.name)
    return names


def _optional(fn: Callable[[Any], None]) -> Callable[[Any], None]:
    return lambda value: None if value is None else fn(value)


#: buildbot's latent-worker settings and what each must be. build_wait_timeout 0 ends
#: the instance after each build, -1 keeps it; missing_timeout bounds a boot.
BUILDBOT_SETTINGS: Mapping[str, Callable[[Any], None]] = {
    "build_wait_timeout": lambda v: validators.check_seconds(
        "build_wait_timeout", v, minimum=0, allow_never=True),
    "missing_timeout": lambda v: validators.check_seconds("missing_timeout", v, minimum=1),
    "check_instance_interval": lambda v: validators.check_seconds(
        "check_instance_interval", v, minimum=validators.MIN_CHECK_INSTANCE_INTERVAL),
    "keepalive_interval": _optional(lambda v: validators.check_seconds(
        "keepalive_interval", v, minimum=1)),
    "max_builds": validators.check_max_builds,
    "properties": _optional(lambda v: validators.check_mapping("properties", v)),
    "defaultProperties": _optional(lambda v: validators.check_mapping("defaultProperties", v)),
}


def buildbot_settings(kwargs: Mapping[str, Any],
                      accepted: set[str]) -> tuple[list[str], dict[str, Any]]:
    """Problems with the keywords our checkConfig does not name itself (buildbot's, or
    misspelled ones), and those keywords minus the bad ones: what buildbot's own
    checkConfig can take without raising a TypeError at the operator."""
    problems: list[str] = []
    usable: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key not in accepted:
            close = difflib.get_close_matches(key, sorted(accepted), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append(f"{key}: unknown setting{hint}")
            continue
        check = BUILDBOT_SETTINGS.get(key)
        try:
            if check is not None:
                check(value)
        except UserDataError as e:
            problems.append(str(e))
            continue
        usable[key] = value
    return problems, usable
