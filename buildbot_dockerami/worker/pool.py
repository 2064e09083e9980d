"""``worker_pool``: the workers of several instances, each with its isolated build
slots, for ``c['workers']``."""

from __future__ import annotations

from typing import Any

from buildbot import config

from buildbot_dockerami.config.checks import schedule_problems
from buildbot_dockerami.worker.latent import DockerAMILatentWorker


def worker_pool(name: str, *, count: int = 1, slots: int = 1, min_warm: Any = None,
                **worker_settings: Any) -> list[DockerAMILatentWorker]:
    """The workers of ``count`` instances with ``slots`` isolated build slots each, for
    ``c['workers']``. Every slot is its own worker and container; the workers of one
    instance share it (``instance_group``). Names: ``name-K`` with one slot per
    instance, ``name-K-S`` with several (K, S from 1). ``min_warm``: the pool's warm
    minimum, a number or periods (docs/warm-capacity.md), carried by every worker."""
    if not isinstance(count, int) or count < 1 or not isinstance(slots, int) or slots < 1:
        config.error(f"worker_pool {name!r}: count and slots must be positive integers")
        return []
    if min_warm is not None:
        # Checked once here, not once per worker.
        problems = schedule_problems("min_warm", min_warm)
        for problem in problems:
            config.error(f"worker_pool {name!r}: {problem}")
        if problems:
            return []
        worker_settings["min_warm"] = min_warm
    if slots > 1:
        isolation = worker_settings.setdefault("isolation", "container")
        if isolation != "container":
            config.error(f"worker_pool {name!r}: slots: several slots need "
                         f"isolation='container', not {isolation!r}")
            return []
    workers = []
    for k in range(1, count + 1):
        group = f"{name}-{k}"
        for s in range(1, slots + 1):
            worker_name = group if slots == 1 else f"{group}-{s}"
            kwargs = dict(worker_settings, pool=name)
            if worker_settings.get("isolation") == "container":
                kwargs["instance_group"] = group
            workers.append(DockerAMILatentWorker(worker_name, **kwargs))
    return workers
