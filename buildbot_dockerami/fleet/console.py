"""An instance's console output: why a boot failed, in the bootstrap's last words, with
the worker's password masked before anything is shown or logged."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.python import log

from buildbot_dockerami.fleet.boot import last_console_words
from buildbot_dockerami.protocol import userdata

#: Longest console output tail logged when an instance never connected.
TAIL_CHARS = 4000


@defer.inlineCallbacks
def output(instance: Any, password: str, log_prefix: str) -> Any:
    """The instance's console, ``password`` masked, or None if EC2 has none for it."""
    try:
        text = yield instance.client.console_output(instance.instance_id)
    except Exception as e:
        log.msg(f"{log_prefix}: no console output for {instance.instance_id}: {e}")
        return None
    return userdata.redact(text, password)


def explained(reason: str, text: str | None) -> str:
    """A failed boot's reason with the console's last words, if it has any."""
    last = last_console_words(text or "")
    return f"{reason}; console: {last}" if last else reason


def log_never_connected(log_prefix: str, instance: Any, text: str | None) -> None:
    if text is not None:
        log.msg(f"{log_prefix}: instance {instance.instance_id} never connected; console "
                f"output:\n{text[-TAIL_CHARS:]}")
