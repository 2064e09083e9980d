"""buildbot's SQLite database keeps its connection, instead of opening one per transaction.

buildbot (4.3 at least, ``db/enginestrategy.special_case_sqlite``) gives a file SQLite
database SQLAlchemy's ``NullPool``, a choice its comment dates to SQLAlchemy 0.6/0.7:
every transaction opens the file, parses the schema, and on close (the last connection
to a WAL database) checkpoints the WAL. Measured on buildbot's own schema: 1.64 ms per
transaction against 0.34 ms with a kept connection; a burst of 50 latent builds costs
buildbot ~8,100 transactions, all on its one database thread (for SQLite), so the
master's CPU for the burst fell from ~21 s to ~9 s and a build started ~0.1 s after its
worker connected instead of 0.4-2 s (bench/README.md).

The replacement is what SQLAlchemy 2.x itself chooses for a file SQLite database:
``QueuePool`` with ``check_same_thread=False`` (buildbot already runs one database
thread for SQLite, so one pooled connection is used at a time). Installed when the
configuration is loaded, before buildbot creates its engine; an operator's own
``c['db']['engine_kwargs']['poolclass']`` is left alone, and so is a buildbot that no
longer chooses ``NullPool``. In-memory and other databases are untouched.
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
        operators_choice = "poolclass" in kwargs
        u, kwargs, max_conns = choose(u, kwargs)
        if not operators_choice and kwargs.get("poolclass") is NullPool and max_conns == 1:
            kwargs["poolclass"] = QueuePool
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
