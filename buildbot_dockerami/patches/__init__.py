"""Process-wide patches of buildbot and CPython, installed in one place.

Each changes something every master in the process shares, so each is installed once
(the installers are idempotent), at the moment it has to be:

- ``sqlite`` (buildbot's SQLite database keeps its connection instead of opening one
  per transaction): when the configuration loads, from a worker's ``checkConfig``,
  because buildbot creates its database engine after loading the configuration and
  before it reconfigures its services.
- ``rest`` (buildbot 4.2-4.3 write REST answers from a thread, which can take the web
  server down): when a worker is configured, and when the ``dockerami`` www plugin is;
  remove it once no supported buildbot has the bug.
- ``heap`` (the start-up heap frozen out of full garbage collections): when the master
  says it has started, i.e. once its configuration is loaded and every service
  reconfigured, before a burst of builds can be handed out in the middle of it.

Set ``DOCKERAMI_DISABLE_SQLITEPOOL`` or ``DOCKERAMI_DISABLE_RESTFIX`` to keep buildbot's
own behaviour (see each module).
"""

from __future__ import annotations

from typing import Any

from buildbot_dockerami.patches import heap, rest, sqlite


def at_config_load() -> None:
    """From a worker's checkConfig: before buildbot creates its database engine."""
    sqlite.install()


def at_configure(master: Any) -> None:
    """From a worker's reconfigService."""
    rest.install()
    heap.freeze_when_started(master)
