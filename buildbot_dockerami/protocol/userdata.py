"""The seed's user-data protocol: render, parse and validate. Pure functions, no I/O.

Layout (lines joined by ``\\n``, no trailing newline)::

    1  <worker-name> <password> <master-host>:<port>
    2  <docker image reference>
    3  <setup repo URL>          (optional)
    4  <setup repo branch>       (optional)
    5+ key=value extensions      (ignored by the seed's readers)

Line 1 is read by ``read NAME PASSWORD MASTER`` and line 2 is pasted unquoted
into ``sh`` by the seed's base AMI, so every field is checked here before it
can reach an instance.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

#: EC2 rejects user data larger than this, counted before base64 encoding.
MAX_USER_DATA_BYTES = 16 * 1024

#: Characters that ``sh`` treats specially when a word is pasted unquoted.
SHELL_ACTIVE = set("$`\\\"';&|<>(){}[]*?!~#%^ \t\r\n")

# The grammar of github.com/distribution/reference, which `docker run` uses.
_ALNUM = r"[a-z0-9]+"
_SEP = r"(?:[._]|__|-+)"
_PATH_COMPONENT = rf"{_ALNUM}(?:{_SEP}{_ALNUM})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?"
_NAME = rf"(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
IMAGE_REFERENCE = re.compile(rf"^(?P<name>{_NAME})(?::{_TAG})?(?:@{_DIGEST})?$")

_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
_IPV6 = re.compile(r"^\[[0-9A-Fa-f:.]+\]$")
_EXTENSION_KEY = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")


class UserDataError(ValueError):
    """A value that cannot travel in the seed's user-data format.

    ``setting`` names the worker setting that carried the value, so a
    config-time error can point the operator at the right keyword.
    """

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting
        self.message = message


@dataclass(frozen=True)
class UserData:
    worker_name: str
    password: str
    master: str
    image: str
    setup_repo: str | None = None
    setup_branch: str | None = None
    extensions: Mapping[str, str] = field(default_factory=dict)

    @property
    def master_host(self) -> str:
        return self.master.rsplit(":", 1)[0]

    @property
    def master_port(self) -> int:
        return int(self.master.rsplit(":", 1)[1])


def check_word(setting: str, value: str, *, secret: bool = False) -> None:
    """A value of line 1, 3 or 4: one non-empty word, since readers split on spaces.

    A ``secret`` value is never quoted in the error; only what kind of character is wrong.
    """
    if not isinstance(value, str):
        raise UserDataError(setting, f"must be a string, not {type(value).__name__}")
    if not value:
        raise UserDataError(setting, "must not be empty")
    kinds = [kind for kind, present in (
        ("whitespace", any(c.isspace() for c in value)),
        ("control characters", any(not c.isspace() and (ord(c) < 32 or ord(c) == 127)
                                   for c in value)),
    ) if present]
    if kinds:
        shown = "the value" if secret else repr(value)
        raise UserDataError(setting, f"{shown} contains {' and '.join(kinds)}")


def check_secret_word(setting: str, value: str) -> None:
    """check_word for a password or a rendered value: errors never include the value."""
    check_word(setting, value, secret=True)


def check_master_address(value: str, setting: str = "master_address") -> None:
    check_word(setting, value)
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise UserDataError(setting, f"{value!r} must be host:port")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise UserDataError(setting, f"{value!r} has no valid port (1-65535)")
    if not (_HOSTNAME.match(host) or _IPV6.match(host)):
        raise UserDataError(setting, f"{value!r} has no valid host name or address")


def check_image(value: str, setting: str = "image") -> None:
    """Line 2 is word-split by ``sh``: only a plain Docker reference may go there."""
    if not isinstance(value, str):
        raise UserDataError(setting, f"must be a string, not {type(value).__name__}")
    if not value:
        raise UserDataError(setting, "must not be empty")
    active = sorted({c for c in value if c in SHELL_ACTIVE})
    if active:
        raise UserDataError(
            setting,
            f"{value!r} contains shell-active characters {''.join(active)!r}; "
            "the base AMI pastes this line unquoted into sh",
        )
    match = IMAGE_REFERENCE.match(value)
    if not match:
        raise UserDataError(
            setting,
            f"{value!r} is not a valid Docker image reference "
            "(expected e.g. 'org/worker-linux:2015-10-19b', lowercase repository names)",
        )
    if len(match.group("name")) > 255:
        raise UserDataError(setting, f"repository name in {value!r} is longer than 255")


def check_extension(key: str, value: str) -> None:
    if not _EXTENSION_KEY.match(key):
        raise UserDataError("extensions", f"bad extension key {key!r}")
    if "\n" in value or "\r" in value:
        raise UserDataError("extensions", f"extension {key!r} must be a single line")


def render(data: UserData) -> str:
    """The exact user-data text, after validating every field."""
    check_word("name", data.worker_name)
    check_secret_word("password", data.password)
    check_master_address(data.master)
    check_image(data.image)
    lines = [f"{data.worker_name} {data.password} {data.master}", data.image]
    if data.setup_repo is not None:
        check_word("setup_repo", data.setup_repo)
    if data.setup_branch is not None:
        check_word("setup_branch", data.setup_branch)
        if data.setup_repo is None:
            raise UserDataError("setup_branch", "needs setup_repo")
    if data.setup_repo is not None or data.extensions:
        # Empty lines keep the positions of 3-4 when only extensions are present.
        lines += [data.setup_repo or "", data.setup_branch or ""]
    for key, value in data.extensions.items():
        check_extension(key, value)
        lines.append(f"{key}={value}")
    text = "\n".join(lines)
    size = len(text.encode())
    if size > MAX_USER_DATA_BYTES:
        raise UserDataError(
            "user data", f"is {size} bytes; EC2 allows at most {MAX_USER_DATA_BYTES}"
        )
    return text


def parse(text: str) -> UserData:
    """Read user data the way the seed's scripts do (a trailing newline is tolerated)."""
    lines = text.rstrip("\n").split("\n")
    if len(lines) < 2:
        raise UserDataError("user data", "needs at least two lines (worker, image)")
    first = lines[0].split()
    if len(first) != 3:
        raise UserDataError("user data", "line 1 must be '<name> <password> <host>:<port>'")
    name, password, master = first
    check_master_address(master, "user data line 1")
    image = lines[1].strip()
    check_image(image, "user data line 2")
    repo = lines[2].strip() if len(lines) > 2 and lines[2].strip() else None
    branch = lines[3].strip() if len(lines) > 3 and lines[3].strip() else None
    extensions: dict[str, str] = {}
    for line in lines[4:]:
        key, sep, value = line.partition("=")
        if sep:
            extensions[key.strip()] = value.strip()
    return UserData(name, password, master, image, repo, branch, extensions)


def redact(text: str, password: str | None) -> str:
    """Text safe for logs: the password replaced wherever it appears."""
    if not password:
        return text
    return text.replace(password, "********")


def redacted_user_data(text: str) -> str:
    """User data with line 1's password masked, for display (CLI, logs)."""
    lines = text.split("\n")
    words = lines[0].split(" ")
    if len(words) == 3:
        lines[0] = " ".join([words[0], "********", words[2]])
    return "\n".join(lines)
