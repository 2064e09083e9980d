"""What the fleet page shows: each worker's state and instance, and orphaned instances."""

from __future__ import annotations

from typing import Any

from buildbot.worker.latent import States
from twisted.internet import defer

from buildbot_dockerami.cloud import instances
from buildbot_dockerami.fleet import pools, retirement
from buildbot_dockerami.fleet.service import Fleet
from buildbot_dockerami.fleet.spending import Spending
from buildbot_dockerami.protocol import imageready, limits


def worker_state(worker: Any) -> str:
    """One word for the operator: not running, launching, booting, connected, building,
    recycling (a container slot between builds), terminating, quarantine."""
    group = worker.group
    if worker.busy:
        return "building"
    if (group is not None and group.terminating) or worker.state == States.INSUBSTANTIATING:
        return "terminating"
    if worker.instance is not None and worker.conn is not None:
        return "connected"
    if worker.instance is not None:
        return "recycling" if worker.recycling else "booting"
    if worker.state in (States.SUBSTANTIATING, States.SUBSTANTIATING_STARTING,
                        States.INSUBSTANTIATING_SUBSTANTIATING):
        return "launching"
    if worker.quarantine_timer is not None:
        return "quarantine"
    return "not running"


@defer.inlineCallbacks
def current_builds(worker: Any) -> Any:
    builds = []
    for builder in worker.botmaster.builders.values():
        for build in builder.building:
            if build.workername == worker.name and build.buildid is not None:
                builds.append({
                    "buildid": build.buildid,
                    "number": build.number,
                    "builder": builder.name,
                    "builderid": (yield builder.getBuilderId()),
                })
    return builds


@defer.inlineCallbacks
def worker_row(worker: Any, now: float, spending: Spending) -> Any:
    instance = worker.instance
    row: dict[str, Any] = {
        "name": worker.name,
        "workerid": worker.workerid,
        "state": worker_state(worker),
        "isolation": worker.isolation,
        "pool": worker.pool,
        "instance_group": worker.group.name if worker.group is not None else None,
        "paused": worker.isPaused(),
        "last_failure": worker.last_failure,
        "builds": (yield current_builds(worker)),
        "timeline": dict(worker.timeline) if instance is not None else {},
        # When the image was ready and whether it was already on the disk or how long its
        # pull took, as the image reported it (None: it did not, e.g. a seed image).
        "image_ready": (imageready.row(worker.timeline, worker.image_ready)
                        if instance is not None else None),
        # Memory, pids and CPU limits: as configured (a key not given: the bootstrap's
        # default) and as the container reported them at connect (None: not reported).
        "container_limits": limits.row(
            worker.container_limits, worker.limits_reported if instance is not None else None),
        "instance": None,
        # Its last finished build's cost (fleet/spending.py), as set on the build.
        "last_build_cost": spending.last_build.get(worker.name),
    }
    if instance is not None:
        uptime = max(0.0, now - instance.launched_at)
        price = spending.price(instance)  # as known: never asks EC2
        row["instance"] = {
            "id": instance.instance_id,
            "type": instance.instance_type,
            "availability_zone": instance.availability_zone,
            "market": instance.market,
            "image": instance.image,
            # What its workers reported running (fleet/image_refresh.py), or null.
            "image_digest": getattr(instance, "image_digest", "") or None,
            "ami": instance.ami,
            "launched_at": instance.launched_at,
            "uptime_seconds": round(uptime, 1),
            "usd_per_hour": None if price is None else price.usd_per_hour,
            "price_source": None if price is None else price.source,
            "cost_so_far": None if price is None else round(price.of(uptime), 6),
            # Why it retires: its bootstrap said so (its disk stayed too full), or the
            # master drains it (retirement.DRAIN_REASONS). It takes no new build and is
            # terminated after its running ones (fleet/retirement.py). A drain is
            # planned, no fault: the page shows the two apart.
            "retired": retirement.retired(instance) or None,
            "draining": retirement.planned(retirement.retired(instance)),
        }
    return row


def stopped_row(entry: Any, now: float, price: float | None) -> dict[str, Any]:
    """A stopped instance kept for reuse; it costs its storage (``price``: the operator's
    ``prices['stopped']``, USD per hour per stopped instance, if given)."""
    age = max(0.0, now - entry.stopped_at)
    instance = entry.instance
    return {
        "id": instance.instance_id, "worker": entry.owner, "type": instance.instance_type,
        "image": instance.image, "stopped_at": entry.stopped_at,
        "stopped_seconds": round(age, 1),
        "storage_cost_so_far": None if price is None else round(price * age / 3600, 4),
    }


def orphans(fleet: Fleet) -> defer.Deferred:
    """Instances tagged for this master that no live worker owns (e.g. left by a crash),
    as the reconciler last saw them: readers never call EC2. The reconciler terminates
    them on its next pass; until then they are listed here."""
    return defer.succeed([
        {"id": status.instance_id, "state": status.state, "type": status.instance_type,
         "availability_zone": status.availability_zone, "worker": status.worker,
         "client": client}
        for client, status in fleet.reconciler.orphans()
    ])


@defer.inlineCallbacks
def fleet_status(fleet: Fleet, now: float) -> Any:
    rows = []
    for worker in sorted(fleet.workers, key=lambda w: w.name):
        rows.append((yield worker_row(worker, now, fleet.spending)))
    return {
        "master_id": fleet.master_id,
        "pools": {pool: pools.pool_status(fleet, pool) for pool in sorted(fleet.pool_limits)},
        "workers": rows,
        "orphans": [
            {k: v for k, v in o.items() if k != "client"} for o in (yield orphans(fleet))
        ],
        "terminations_failing": fleet.undead,
        # Today's (UTC) spending on this master's instances, from its memory.
        "cost": fleet.spending.today(),
        "stopped": [stopped_row(entry, now, fleet.spending.stopped_price())
                    for entry in sorted(fleet.stopped.entries.values(), key=lambda e: e.owner)],
        "reconciler": {
            "interval": fleet.reconciler.interval,
            "checked_at": fleet.reconciler.checked_at,
            "error": fleet.reconciler.last_error,
        },
        # Instances by state over the last hours, from memory (fleet/history.py).
        "history": fleet.history.status(),
        **shared_status(fleet),
    }


def shared_status(fleet: Fleet) -> dict[str, Any]:
    """The fleet of every master sharing this database: its masters, and one row per
    instance with its owning master (the others' as last read, at most a few seconds
    old). Only an instance's own master acts on it."""
    shared = fleet.shared
    if shared is None:
        return {"master": None, "masters": [], "fleet": []}
    return {
        "master": {"id": shared.masterid, "name": shared.master.name, "tag": fleet.master_id,
                   "leads": shared.leads()},
        "masters": [
            {"id": m.masterid, "name": m.name, "active": m.active,
             "tag": instances.master_id(m.name), "reclaimed": shared.reclaimed(m.masterid)}
            for m in sorted(shared.masters, key=lambda m: m.masterid)
        ],
        "fleet": shared.view(),
        "shared_error": shared.last_error,
        "mq_error": shared.mq_error,
    }
