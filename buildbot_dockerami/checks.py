"""What ``buildbot checkconfig`` and each launch verify, as "setting: message" strings.

Literal settings are checked at config time; renderable ones once rendered for a
build. The checks themselves live in userdata.py and settings.py.
"""

from __future__ import annotations

from typing import Any

from buildbot.interfaces import IRenderable

from buildbot_dockerami import settings, userdata
from buildbot_dockerami.cloud import resolve_region
from buildbot_dockerami.userdata import UserData, UserDataError

#: "none": an instance serves builds until idle; "container": a fresh container per
#: build on a kept instance; "instance": a fresh instance per build.
ISOLATION_MODES = ("none", "container", "instance")

#: Stand-ins for values only known at launch, used to check the size limit early.
_LONGEST_PASSWORD = "p" * 32
_LONGEST_MASTER = ".".join(["m" * 63] * 3 + ["m" * 61]) + ":65535"


def _is_renderable(value: Any) -> bool:
    return IRenderable.providedBy(value)


def config_problems(
    name: str,
    password: Any,
    *,
    image: Any,
    ami: Any,
    ami_filters: Any,
    ami_owners: Any,
    instance_type: Any,
    region: Any,
    master_address: Any,
    setup_repo: Any,
    setup_branch: Any,
    subnet_id: Any,
    security_group_ids: Any,
    tags: Any,
    block_device_mappings: Any,
    metadata_options: Any,
    session: Any,
    isolation: Any = "none",
    instance_group: Any = None,
) -> list[str]:
    """Every problem checkable before a build exists, as "setting: message" strings."""
    problems: list[str] = []

    def check(fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except UserDataError as e:
            problems.append(str(e))

    check(userdata.check_word, "name", name)
    if password is not None and not _is_renderable(password):
        check(userdata.check_word, "password", password)
    if image is None:
        problems.append("image: is required (the Docker image the instance runs)")
    elif not _is_renderable(image):
        check(userdata.check_image, image)
    if instance_type is None:
        problems.append("instance_type: is required (e.g. 't3.large')")
    elif not _is_renderable(instance_type):
        check(settings.check_instance_type, instance_type)
    if (ami is None) == (ami_filters is None):
        problems.append("ami: give exactly one of ami= or ami_filters= (with ami_owners=)")
    elif ami is not None and not _is_renderable(ami):
        check(settings.check_ami_id, ami)
    elif ami_filters is not None:
        check(settings.check_ami_filters, ami_filters, ami_owners)
    if ami_owners is not None and ami_filters is None:
        problems.append("ami_owners: only makes sense with ami_filters")
    if master_address is not None:
        check(userdata.check_master_address, master_address)
    for setting, value in (("setup_repo", setup_repo), ("setup_branch", setup_branch)):
        if value is not None and not _is_renderable(value):
            check(userdata.check_word, setting, value)
    if setup_branch is not None and setup_repo is None:
        problems.append("setup_branch: needs setup_repo")
    if subnet_id is not None:
        check(settings.check_subnet_id, subnet_id)
    if security_group_ids is not None:
        check(settings.check_security_group_ids, security_group_ids)
    if tags is not None:
        check(settings.check_tags, tags)
    if block_device_mappings is not None:
        check(settings.check_block_device_mappings, block_device_mappings)
    if metadata_options is not None:
        check(settings.check_metadata_options, metadata_options)
    if isolation not in ISOLATION_MODES:
        problems.append(f"isolation: {isolation!r} is not one of {', '.join(ISOLATION_MODES)}")
    if instance_group is not None:
        if isolation != "container":
            problems.append("instance_group: only with isolation='container'")
        elif (
            not isinstance(instance_group, str)
            or not instance_group.strip()
            or any(c.isspace() for c in instance_group)
        ):
            problems.append(f"instance_group: {instance_group!r} must be a non-empty word")
    if not resolve_region(region, session):
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
    return problems


def rendered_problems(values: dict[str, Any]) -> list[str]:
    """Checks for values only known once rendered for a build."""
    problems: list[str] = []
    checks: list[tuple[Any, tuple]] = [
        (userdata.check_image, (values["image"],)),
        (settings.check_instance_type, (values["instance_type"],)),
    ]
    if values["ami"] is not None:
        checks.append((settings.check_ami_id, (values["ami"],)))
    for setting in ("setup_repo", "setup_branch"):
        if values[setting] is not None:
            checks.append((userdata.check_word, (setting, values[setting])))
    for fn, args in checks:
        try:
            fn(*args)
        except UserDataError as e:
            problems.append(f"rendered {e}")
    return problems
