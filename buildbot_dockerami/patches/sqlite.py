"""buildbot's SQLite database keeps its connection, instead of opening one per transaction.

buildbot (4.3 at least, ``db/enginestrategy.special_case_sqlite``) gives a file SQLite
database SQLAlchemy's ``NullPool``, a choice its comment dates to SQLAlchemy 0.6/0.7:
every transaction opens the file, reads the schema, and on close (the last connection
to a WAL database) checkpoints the WAL, and a burst of latent builds costs buildbot
thousands of transactions, all on its one database thread (for SQLite). What a kept
connection saves is measured in bench/README.md (docs/bursts.md sums it up).

The replacement is what SQLAlchemy 2 itself chooses for a file SQLite database:
``QueuePool`` with ``check_same_thread=False`` (buildbot runs one database thread for
SQLite, so one pooled connection is used at a time). Installed when the configuration
loads, before buildbot creates its engine. Left alone: an operator's ``poolclass`` or
``check_same_thread`` (``c['db']['engine_kwargs']`` or the URL), a buildbot that no
longer chooses ``NullPool``, in-memory and other databases. A side effect: the WAL file
(``state.sqlite-wal``) now stays while the master runs (SQLite checkpoints it every
1000 pages), so a backup copies the database with SQLite's ``.backup``, not ``cp``.
"""

from __future__ import annotations

import os
from typing import Any

from sqlalchemy.pool import NullPool, QueuePool
from twisted.python import log

#: Set (to anything but "" or "0") to keep buildbot's one-connection-per-transaction.
DISABLE_ENV = "DOCKERAMI_DISABLE_SQLITEPOOL"

_INSTALLED = "_dockerami_sqlitepool"


def keep_connection(choose: Any) -> Any:
    """Wrap buildbot's ``special_case_sqlite(url, kwargs) -> (url, kwargs, max_conns)``."""

    def special_case_sqlite(u: Any, kwargs: dict[str, Any]) -> Any:
        operators_choice = "poolclass" in kwargs or "check_same_thread" in {
            **kwargs.get("connect_args", {}), **u.query}
        u, kwargs, max_conns = choose(u, kwargs)
        if not operators_choice and kwargs.get("poolclass") is NullPool and max_conns == 1:
            kwargs["poolclass"] = QueuePool
            # The connection buildbot opens to turn WAL on (in the thread that creates
            # the engine) is then used by its database thread.
            kwargs["connect_args"] = {**kwargs.get("connect_args", {}),
                                      "check_same_thread": False}
            log.msg("dockerami: buildbot's SQLite database keeps its connection "
                    "(QueuePool) instead of opening one per transaction")
        return u, kwargs, max_conns

    setattr(special_case_sqlite, _INSTALLED, True)
    special_case_sqlite.__wrapped__ = choose  # type: ignore[attr-defined]
    return special_case_sqlite


def install(strategy: Any = None) -> bool:
    """Wrap buildbot's SQLite special case; True if it is (now) wrapped. Idempotent."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return False
    if strategy is None:
        from buildbot.db import enginestrategy as strategy
    choose = getattr(strategy, "special_case_sqlite", None)
    if choose is None:
        return False
    if not getattr(choose, _INSTALLED, False):
        strategy.special_case_sqlite = keep_connection(choose)
    return True
