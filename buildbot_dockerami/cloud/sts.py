"""AssumeRole for one build, and the credentials file a build is given.

The master assumes a build's role with its own credential chain (boto3's: environment,
``~/.aws``, its instance profile; ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_STS`` are
honoured), so no long-lived key ever reaches a build. ``Sts`` is blocking boto3;
``AsyncSts`` runs it off the reactor thread, as ``ec2.AsyncEc2`` does. No buildbot
imports here.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import boto3
from botocore.exceptions import BotoCoreError, ClientError
from twisted.internet import threads
from twisted.python.threadpool import ThreadPool

from buildbot_dockerami.cloud.ec2 import DEFAULT_TIMEOUT, boto_config

#: STS's bounds for DurationSeconds (the role's MaxSessionDuration may lower the top,
#: and role chaining, a master that itself runs on a role, caps it at one hour).
MIN_DURATION = 900
MAX_DURATION = 43200
#: RoleSessionName: 2-64 characters of [A-Za-z0-9_+=,.@-].
SESSION_NAME_MAX = 64
_NOT_IN_SESSION_NAME = re.compile(r"[^A-Za-z0-9_+=,.@-]+")
#: Session tag values: letters, digits, spaces and _.:/=+-@, at most 256.
_NOT_IN_TAG_VALUE = re.compile(r"[^\w .:/=+@-]+")
TAG_VALUE_MAX = 256
#: The session tags every build's session carries (a role policy can use them as
#: ``aws:PrincipalTag/buildbot:builder``).
BUILDER_TAG = "buildbot:builder"
BUILD_TAG = "buildbot:build"


class StsError(Exception):
    """AssumeRole failed; the message is STS's code and text (never a credential)."""


@dataclass(frozen=True)
class RoleCredentials:
    """One AssumeRole answer. Only ``access_key_id`` and ``expiration`` may be shown."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str = field(repr=False)
    expiration: datetime
    #: arn:aws:sts::<account>:assumed-role/<role>/<session name>
    assumed_role_arn: str = ""

    def secrets(self) -> dict[str, str]:
        """Each value a log must never show, by the name it is masked with."""
        return {"aws_access_key_id": self.access_key_id,
                "aws_secret_access_key": self.secret_access_key,
                "aws_session_token": self.session_token}


def session_name(builder: str, number: int | str) -> str:
    """``<builder>-<number>`` in STS's character set, the builder cut so that the whole
    fits 64 characters and the build number is always whole (CloudTrail shows it)."""
    suffix = f"-{number}"
    cleaned = _NOT_IN_SESSION_NAME.sub("-", builder).strip("-") or "build"
    return cleaned[: SESSION_NAME_MAX - len(suffix)] + suffix


def session_tags(builder: str, number: int | str) -> list[dict[str, str]]:
    def value(text: str) -> str:
        return (_NOT_IN_TAG_VALUE.sub("-", text) or "-")[:TAG_VALUE_MAX]

    return [{"Key": BUILDER_TAG, "Value": value(builder)},
            {"Key": BUILD_TAG, "Value": value(str(number))}]


def credentials_file(credentials: RoleCredentials, role_arn: str) -> str:
    """The shared credentials file AWS SDKs and the CLI read (its ``default`` profile)."""
    expires = credentials.expiration.strftime("%Y-%m-%dT%H:%M:%SZ")
    return (
        f"# Role {role_arn}, assumed by the buildbot master for this build.\n"
        f"# Expires {expires}; renewed between steps; removed when the build ends.\n"
        "[default]\n"
        f"aws_access_key_id = {credentials.access_key_id}\n"
        f"aws_secret_access_key = {credentials.secret_access_key}\n"
        f"aws_session_token = {credentials.session_token}\n"
    )


class Sts:
    """Blocking STS calls through one boto3 client. Call only from a worker thread."""

    def __init__(self, region: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 session: boto3.session.Session | None = None) -> None:
        session = session or boto3.session.Session()
        # No region anywhere: boto3 uses STS's global endpoint.
        self.client = session.client("sts", region_name=region or session.region_name,
                                     config=boto_config(timeout))

    def assume_role(self, role_arn: str, name: str, duration: int,
                    tags: Sequence[dict[str, str]] = ()) -> RoleCredentials:
        args: dict[str, Any] = {"RoleArn": role_arn, "RoleSessionName": name,
                                "DurationSeconds": duration}
        if tags:
            args["Tags"] = list(tags)
        try:
            answer = self.client.assume_role(**args)
        except ClientError as e:
            error = e.response.get("Error", {})
            raise StsError(f"AssumeRole of {role_arn}: {error.get('Code', 'error')}: "
                           f"{error.get('Message', '')}") from None
        except BotoCoreError as e:
            raise StsError(f"AssumeRole of {role_arn}: {e}") from None
        found = answer["Credentials"]
        return RoleCredentials(
            access_key_id=found["AccessKeyId"], secret_access_key=found["SecretAccessKey"],
            session_token=found["SessionToken"], expiration=found["Expiration"],
            assumed_role_arn=answer.get("AssumedRoleUser", {}).get("Arn", ""))


_clients: dict[str | None, Sts] = {}
_clients_lock = threading.Lock()


def shared(region: str | None) -> Sts:
    """One client per region for the whole master (making one costs far more CPU than a
    call); boto3 clients may be used from several threads at once."""
    with _clients_lock:
        if region not in _clients:
            _clients[region] = Sts(region)
        return _clients[region]


class AsyncSts:
    """``Sts`` with every call returning a Deferred, run in ``pool``."""

    def __init__(self, pool: ThreadPool, reactor: Any, region: str | None = None) -> None:
        self._pool = pool
        self._reactor = reactor
        self.region = region

    def assume_role(self, role_arn: str, name: str, duration: int,
                    tags: Sequence[dict[str, str]] = ()) -> Any:
        def call() -> RoleCredentials:
            return shared(self.region).assume_role(role_arn, name, duration, tags)

        return threads.deferToThreadPool(self._reactor, self._pool, call)
