"""AWS keys given in master.cfg, as buildbot's EC2LatentWorker takes them:
``identifier`` (access key id) and ``secret_identifier`` (secret access key), strings or
renderables such as ``util.Secret('aws_secret')``.

buildbot renders them through the master's secrets providers on every (re)config (the
worker lists them in ``secrets``); the worker then hands them to the EC2 layer as
``cloud.Credentials``, whose repr hides the secret. Here: what checkconfig accepts.
No value is ever put in a message.
"""

from __future__ import annotations

from typing import Any

from buildbot.interfaces import IRenderable


def _usable(value: Any) -> bool:
    return IRenderable.providedBy(value) or (isinstance(value, str) and value.strip() != "")


def key_problems(identifier: Any, secret_identifier: Any, session: Any) -> list[str]:
    """Problems with the key settings, as "setting: message" strings (values never shown)."""
    if identifier is None and secret_identifier is None:
        return []
    if identifier is None or secret_identifier is None:
        missing = "identifier" if identifier is None else "secret_identifier"
        return [f"{missing}: give both identifier= and secret_identifier=, or neither "
                "(boto3's default credential chain)"]
    problems = [
        f"{setting}: must be a non-empty string or a renderable such as util.Secret(...), "
        f"not {type(value).__name__}"
        for setting, value in (("identifier", identifier), ("secret_identifier", secret_identifier))
        if not _usable(value)
    ]
    if session is not None:
        problems.append("identifier: give either identifier=/secret_identifier= or session=, "
                        "not both")
    return problems
