"""buildbot's SQLite database keeps its connection (sqlite.py)."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import sqlalchemy as sa
from buildbot.db import enginestrategy
from sqlalchemy.engine import url
from sqlalchemy.pool import NullPool, QueuePool, StaticPool

from buildbot_dockerami.patches import sqlite
from tests.harness import SUCCESS, master_cfg

#: buildbot's own function, whether or not this process installed the wrapper.
BUILDBOTS = getattr(enginestrategy.special_case_sqlite, "__wrapped__",
                    enginestrategy.special_case_sqlite)


def strategy() -> types.SimpleNamespace:
    """A stand-in for buildbot's enginestrategy module, holding buildbot's function."""
    return types.SimpleNamespace(special_case_sqlite=BUILDBOTS)


def test_a_file_database_gets_a_queue_pool_and_any_other_choice_is_kept(tmp_path: Path):
    module = strategy()
    assert sqlite.install(module)
    choose = module.special_case_sqlite
    _, kwargs, conns = choose(url.make_url("sqlite:///state.sqlite"), {"basedir": str(tmp_path)})
    assert (kwargs["poolclass"], kwargs["connect_args"], conns) == (
        QueuePool, {"check_same_thread": False}, 1)
    # The operator's own pool, and an in-memory database, stay as they are.
    _, kwargs, _ = choose(url.make_url("sqlite:///state.sqlite"),
                          {"basedir": str(tmp_path), "poolclass": StaticPool})
    assert kwargs["poolclass"] is StaticPool
    assert "poolclass" not in choose(url.make_url("sqlite://"), {"basedir": str(tmp_path)})[1]
    # check_same_thread set by the operator (engine_kwargs or URL): buildbot's NullPool.
    for u, extra in (("sqlite:///state.sqlite", {"connect_args": {"check_same_thread": True}}),
                     ("sqlite:///state.sqlite?check_same_thread=true", {})):
        _, kwargs, _ = choose(url.make_url(u), {"basedir": str(tmp_path), **extra})
        assert kwargs["poolclass"] is NullPool
        assert kwargs.get("connect_args", {}) == extra.get("connect_args", {})
    # Other connection arguments are kept.
    _, kwargs, _ = choose(url.make_url("sqlite:///state.sqlite"),
                          {"basedir": str(tmp_path), "connect_args": {"timeout": 30}})
    assert kwargs["connect_args"] == {"timeout": 30, "check_same_thread": False}


def test_installing_twice_wraps_once_and_the_switch_leaves_buildbot_alone(monkeypatch):
    module = strategy()
    sqlite.install(module)
    sqlite.install(module)
    assert module.special_case_sqlite.__wrapped__ is BUILDBOTS
    monkeypatch.setenv(sqlite.DISABLE_ENV, "1")
    untouched = strategy()
    assert not sqlite.install(untouched)
    assert untouched.special_case_sqlite is BUILDBOTS


@pytest.mark.parametrize("keep", [True, False])
def test_transactions_share_one_connection(tmp_path: Path, monkeypatch, keep: bool):
    """What the wrapper is for: buildbot's engine, 30 transactions, connections opened."""
    if keep:
        monkeypatch.setattr(enginestrategy, "special_case_sqlite",
                            sqlite.keep_connection(BUILDBOTS))
    else:
        monkeypatch.setattr(enginestrategy, "special_case_sqlite", BUILDBOTS)
    engine = enginestrategy.create_engine("sqlite:///state.sqlite", basedir=str(tmp_path))
    opened = []
    sa.event.listen(engine.pool, "connect", lambda *_: opened.append(1))
    try:
        for i in range(30):
            with engine.connect() as conn:
                conn.exec_driver_sql("create table if not exists t (n integer)")
                conn.exec_driver_sql(f"insert into t values ({i})")
                conn.commit()
        with engine.connect() as conn:
            assert conn.exec_driver_sql("select count(*) from t").scalar() == 30
    finally:
        engine.dispose()
    assert isinstance(engine.pool, QueuePool if keep else NullPool)
    # Kept: the connection buildbot opened to turn WAL on serves every transaction.
    assert len(opened) == (0 if keep else 31)


@pytest.mark.integration
def test_a_master_with_the_plugin_keeps_its_sqlite_connection(make_master):
    master = make_master(master_cfg())
    assert master.wait_request(master.force(), 90)["results"] == SUCCESS
    assert master.log().count("SQLite database keeps its connection (QueuePool)") == 1
