"""The fleet's shared truth in the masters' database (buildbot's, through its DB layer).

One row per instance of every master (``dockerami_instances``): who owns it, which
pool it counts against and which of the pool's numbered slots it holds. The slot is
what makes a cap hold across masters: ``(pool, slot)`` is unique, a new instance
needs a free slot below the cap, and the database refuses the second of two masters
racing for the same one. Rows are written before RunInstances (a claim) and mirror
each master's instances afterwards; a dead master's rows go when a live master has
reclaimed its instances (``dockerami_reclaims`` says which live master does it).

Every function here runs in buildbot's DB thread (``master.db.pool.do``) and takes
the SQLAlchemy connection first. With one master and SQLite the same tables live in
its own database.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

metadata = sa.MetaData()

instances = sa.Table(
    "dockerami_instances",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    # buildbot's masters.id of the owning master.
    sa.Column("masterid", sa.Integer, nullable=False),
    # The instance key: the worker's name, or the slot group's for shared instances.
    sa.Column("owner", sa.String(256), nullable=False),
    sa.Column("pool", sa.String(256), nullable=True),
    sa.Column("slot", sa.Integer, nullable=True),
    sa.Column("instance_id", sa.String(64), nullable=False, server_default=""),
    sa.Column("instance_type", sa.String(64), nullable=False, server_default=""),
    # claimed (no launch yet), launching, booting, idle, building.
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("workers", sa.Text, nullable=False, server_default=""),
    sa.Column("claimed_at", sa.Integer, nullable=False),
    sa.UniqueConstraint("masterid", "owner", name="dockerami_instances_owner"),
    sa.UniqueConstraint("pool", "slot", name="dockerami_instances_slot"),
)

reclaims = sa.Table(
    "dockerami_reclaims",
    metadata,
    # The dead master, and the heartbeat its death is judged by.
    sa.Column("masterid", sa.Integer, primary_key=True),
    sa.Column("last_active", sa.Integer, nullable=False),
    # The live master doing (or that did) the reclaiming.
    sa.Column("by_masterid", sa.Integer, nullable=False),
    sa.Column("done", sa.Boolean, nullable=False),
)

#: What each reclaim of a dead master ended, for every master's Fleet page (kept across
#: restarts; the last reclaim of each dead master). A table of its own, so databases
#: made by an earlier release get it from ``create_all`` without a migration.
reclaim_reports = sa.Table(
    "dockerami_reclaim_reports",
    metadata,
    sa.Column("masterid", sa.Integer, primary_key=True),
    sa.Column("by_masterid", sa.Integer, nullable=False),
    sa.Column("at", sa.Integer, nullable=False),
    # Instance ids, space-separated.
    sa.Column("instance_ids", sa.Text, nullable=False, server_default=""),
)

#: States of a row whose instance is not up yet (counted as on its way to warm).
STARTING = frozenset({"claimed", "launching", "booting"})


@dataclass(frozen=True)
class Row:
    masterid: int
    owner: str
    pool: str | None
    slot: int | None
    instance_id: str
    instance_type: str
    state: str
    workers: tuple[str, ...]
    claimed_at: int


@dataclass(frozen=True)
class MasterRow:
    masterid: int
    name: str
    active: bool
    last_active: int


def _row(r: Any) -> Row:
    return Row(r.masterid, r.owner, r.pool, r.slot, r.instance_id, r.instance_type, r.state,
               tuple(w for w in r.workers.split(",") if w), r.claimed_at)


def create_tables(conn: Any) -> None:
    """Create the plugin's tables if missing; two masters starting at once may race,
    and the loser finds them made."""
    try:
        metadata.create_all(conn, checkfirst=True)
        conn.commit()
    except sa.exc.DBAPIError:
        conn.rollback()
        existing = set(sa.inspect(conn).get_table_names())
        if not {t.name for t in metadata.sorted_tables} <= existing:
            raise


def read(conn: Any) -> tuple[list[Row], list[MasterRow]]:
    """Every instance row, and buildbot's masters."""
    rows = [_row(r) for r in conn.execute(sa.select(instances)).fetchall()]
    masters_tbl = sa.table("masters", sa.column("id"), sa.column("name"),
                           sa.column("active"), sa.column("last_active"))
    masters = [MasterRow(r.id, r.name, bool(r.active), int(r.last_active or 0))
               for r in conn.execute(sa.select(masters_tbl)).fetchall()]
    return rows, masters


@dataclass(frozen=True)
class Claim:
    """A master asking for a slot of ``pool`` for ``owner``'s next instance."""

    masterid: int
    owner: str
    pool: str
    cap: int | None
    now: int


def claim(conn: Any, want: Claim) -> bool:
    """Take (or refresh) a slot of the pool for the owner's next instance; False when
    every slot below the cap is taken, by any master."""
    masterid, owner, pool, cap, now = want.masterid, want.owner, want.pool, want.cap, want.now
    mine = sa.and_(instances.c.masterid == masterid, instances.c.owner == owner)
    if conn.execute(sa.select(instances.c.id).where(mine)).first() is not None:
        # Held already (a booting or running instance, or a claim being used): refreshed,
        # so that a mirror pass does not take it away before the launch is seen.
        conn.execute(instances.update().where(mine).values(claimed_at=now, state="claimed"))
        conn.commit()
        return True
    fresh = {"masterid": masterid, "owner": owner, "pool": pool, "state": "claimed",
             "claimed_at": now, "instance_id": "", "instance_type": "", "workers": ""}
    if cap is None:
        conn.execute(instances.insert().values(**fresh, slot=None))
        conn.commit()
        return True
    held = conn.execute(sa.select(instances.c.slot).where(instances.c.pool == pool)).fetchall()
    if len(held) >= cap:
        return False
    taken = {r.slot for r in held}
    for slot in range(cap):
        if slot in taken:
            continue
        try:
            conn.execute(instances.insert().values(**fresh, slot=slot))
            conn.commit()
            return True
        except sa.exc.IntegrityError:
            conn.rollback()  # another master took this slot first: try the next
    return False


def mirror(conn: Any, masterid: int, local: Mapping[str, dict[str, Any]], now: int,
           claim_grace: float, *, ended: Collection[str] = ()) -> None:
    """Make this master's rows say what its instances are now. A claim that led to no
    instance within ``claim_grace`` seconds is given back, and at once one whose owner
    is in ``ended`` (its instance came and went before a mirror saw it running)."""
    rows = {r.owner: r for r in
            (_row(x) for x in conn.execute(
                sa.select(instances).where(instances.c.masterid == masterid)).fetchall())}
    for owner, row in rows.items():
        where = sa.and_(instances.c.masterid == masterid, instances.c.owner == owner)
        values = local.get(owner)
        if values is None:
            if (row.state == "claimed" and now - row.claimed_at < claim_grace
                    and owner not in ended):
                continue
            conn.execute(instances.delete().where(where))
            continue
        changed = {k: v for k, v in _columns(values).items() if getattr(row, k) != v}
        if changed:
            conn.execute(instances.update().where(where).values(
                **{k: ",".join(v) if k == "workers" else v for k, v in changed.items()}))
    for owner, values in local.items():
        if owner not in rows and values.get("instance_id"):
            # Running without a claim (a worker in no pool, or started before the
            # database answered): counted, so caps see it, in no numbered slot. A launch
            # not yet made gets no row here: its own claim decides whether it may be.
            columns = _columns(values)
            conn.execute(instances.insert().values(
                masterid=masterid, owner=owner, pool=values.get("pool"), slot=None,
                claimed_at=now, **{**columns, "workers": ",".join(columns["workers"])}))
    conn.commit()


def _columns(values: Mapping[str, Any]) -> dict[str, Any]:
    return {"instance_id": values.get("instance_id") or "",
            "instance_type": values.get("instance_type") or "",
            "state": values["state"], "workers": tuple(values.get("workers", ()))}


def take_reclaim(conn: Any, dead: MasterRow, me: int, live: set[int]) -> bool:
    """Whether this master is the one to reclaim ``dead``'s instances for this death
    (judged by its last heartbeat). One live master wins; a winner that died itself
    is taken over."""
    values = {"masterid": dead.masterid, "last_active": dead.last_active,
              "by_masterid": me, "done": False}
    try:
        conn.execute(reclaims.insert().values(**values))
        conn.commit()
        return True
    except sa.exc.IntegrityError:
        conn.rollback()
    result = conn.execute(reclaims.update().where(sa.and_(
        reclaims.c.masterid == dead.masterid,
        sa.or_(
            reclaims.c.last_active != dead.last_active,  # an earlier death, done with
            sa.and_(reclaims.c.done == sa.false(),
                    sa.or_(reclaims.c.by_masterid == me,
                           reclaims.c.by_masterid.not_in(sorted(live)))),
        ),
    )).values(**values))
    conn.commit()
    return result.rowcount == 1


def reclaimed(conn: Any, dead: int, me: int, terminated: list[str] | None = None,
              now: int = 0) -> None:
    """The dead master's instances are gone: so are its rows, and its slots are free;
    what was terminated is reported for every master to show."""
    conn.execute(instances.delete().where(instances.c.masterid == dead))
    conn.execute(reclaims.update().where(sa.and_(
        reclaims.c.masterid == dead, reclaims.c.by_masterid == me)).values(done=True))
    conn.execute(reclaim_reports.delete().where(reclaim_reports.c.masterid == dead))
    conn.execute(reclaim_reports.insert().values(
        masterid=dead, by_masterid=me, at=now, instance_ids=" ".join(terminated or ())))
    conn.commit()


@dataclass(frozen=True)
class ReclaimReport:
    """The last reclaim of a dead master: by whom, when, and the instances it ended."""

    by_masterid: int
    at: int
    instance_ids: tuple[str, ...]


def reports(conn: Any) -> dict[int, ReclaimReport]:
    """Dead master id -> its last reclaim's report."""
    return {r.masterid: ReclaimReport(r.by_masterid, r.at, tuple(r.instance_ids.split()))
            for r in conn.execute(sa.select(reclaim_reports)).fetchall()}


def reclaims_done(conn: Any) -> dict[int, int]:
    """Dead master id -> the heartbeat of the death whose reclaiming is finished."""
    return {r.masterid: r.last_active for r in
            conn.execute(sa.select(reclaims).where(reclaims.c.done == sa.true())).fetchall()}


def forget(conn: Any, masterids: list[int]) -> None:
    """Drop the rows of masters that stopped cleanly (they ended their own instances)."""
    conn.execute(instances.delete().where(instances.c.masterid.in_(masterids)))
    conn.commit()


def unclaim_requests(conn: Any, claims: sa.Table, brids: list[int], dead: int) -> None:
    """Give back build requests a dead master had claimed (buildbot's ``buildrequest_claims``
    table, passed in from its model)."""
    conn.execute(claims.delete().where(claims.c.brid.in_(brids), claims.c.masterid == dead))
    conn.commit()
