"""Per-container resource limits (the worker setting ``container_limits``). Pure functions.

Several slots on one instance share its kernel, memory and process table; without a
limit one build that leaks memory or forks without bound takes them from the others.
The setting travels as user-data extensions (lines 5+, so the seed's readers and older
bootstraps ignore them): ``limits.memory=<bytes>``, ``limits.pids=<tasks>`` and
``limits.cpus=<CPUs>``, each ``none`` for no limit. The bootstrap applies them to every
container it runs (``docker run --memory --memory-swap --pids-limit --cpus``); a limit
the user data does not name gets the bootstrap's default (``DEFAULT_PIDS`` and an equal
share of the memory per slot with several slots; none for a single container). The
reference image reports the limits its container got (worker info ``container_limits``)
for the Fleet page. See docs/isolation.md#resource-limits-per-slot.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from buildbot_dockerami.protocol.userdata import UserDataError

#: The setting's keys, in display order.
KEYS = ("memory", "pids", "cpus")
#: The user-data extension of each key.
EXTENSION = "limits.{key}"
#: An extension's value for "no limit" (the setting's ``None``).
NO_LIMIT = "none"
#: The worker-info key (a file in the worker's info/ directory) the image reports in.
INFO = "container_limits"

#: Below these not even the worker itself runs (docker's own floor is 6 MiB).
MIN_MEMORY = 64 * 1024 * 1024
MIN_PIDS = 32
#: docker run --cpus takes hundredths.
MIN_CPUS = 0.01
#: The bootstrap's default pids limit per container with several slots.
DEFAULT_PIDS = 4096

_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
# docker run --memory's syntax (binary units): 6g, 6G, 6gb, 6GiB, 1.5g, 512m, 1073741824.
_SIZE = re.compile(r"^(\d+(?:\.\d+)?) ?(?:([kmgt])i?b?|(b))?$", re.I)


class LimitsError(UserDataError):
    """A bad ``container_limits``; the message names the key."""

    def __init__(self, message: str) -> None:
        super().__init__("container_limits", message)


def parse_memory(value: Any) -> int:
    """Bytes from an int or a docker size string ('6g', '512m', '1.5g')."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise LimitsError(f"memory: {value!r} must be bytes (an int) or a size string such "
                          "as '6g' or '512m'")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(value.strip())
        if not match:
            raise LimitsError(f"memory: {value!r} is not a size; give bytes (an int) or a "
                              "number with k, m, g or t (binary units, as docker run "
                              "--memory takes them), e.g. '6g'")
        unit = (match.group(2) or match.group(3) or "").lower()
        size = int(float(match.group(1)) * _UNITS[unit])
    return _at_least("memory", value, size, MIN_MEMORY,
                     f"{MIN_MEMORY // 1024**2} MiB, too little for the worker itself")


def parse_pids(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise LimitsError(f"pids: {value!r} must be a whole number of tasks, such as 4096")
    return _at_least("pids", value, value, MIN_PIDS, f"{MIN_PIDS}, too few for the worker itself")


def parse_cpus(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(
            value):
        raise LimitsError(f"cpus: {value!r} must be a number of CPUs, such as 2 or 1.5")
    return float(_at_least("cpus", value, value, MIN_CPUS, f"{MIN_CPUS} (docker's least)"))


def _at_least(key: str, value: Any, amount: Any, least: Any, least_text: str) -> Any:
    """``amount`` (``value`` as parsed), if positive and at least ``least``."""
    if amount <= 0:
        raise LimitsError(f"{key}: {value!r} must be positive")
    if amount < least:
        raise LimitsError(f"{key}: {value!r} is less than {least_text}")
    return amount


_PARSERS = {"memory": parse_memory, "pids": parse_pids, "cpus": parse_cpus}


def normalize(value: Any) -> dict[str, int | float | None]:
    """The setting as {key: bytes, tasks or CPUs, or None for no limit}, only the keys
    given (the others get the bootstrap's default); raises LimitsError."""
    if not isinstance(value, Mapping):
        raise LimitsError(f"{value!r} must be a dict such as "
                          "{'memory': '6g', 'pids': 4096, 'cpus': 2}")
    unknown = sorted(str(key) for key in value if key not in KEYS)
    if unknown:
        raise LimitsError(f"unknown key {', '.join(map(repr, unknown))} (known: "
                          f"{', '.join(KEYS)})")
    return {key: None if value[key] is None else _PARSERS[key](value[key])
            for key in KEYS if key in value}


def problems(value: Any) -> list[str]:
    """checkconfig's view of ``container_limits`` (None: the defaults)."""
    if value is None:
        return []
    try:
        normalize(value)
    except LimitsError as e:
        return [str(e)]
    return []


def _number(value: int | float) -> str:
    """A plain decimal the bootstrap's sh can check: no exponent."""
    if isinstance(value, int):
        return str(value)
    return f"{value:.2f}".rstrip("0").rstrip(".")


def extensions(value: Mapping[str, Any] | None) -> dict[str, str]:
    """The user-data extensions of a (valid) setting: nothing for the defaults."""
    if value is None:
        return {}
    return {EXTENSION.format(key=key): NO_LIMIT if limit is None else _number(limit)
            for key, limit in normalize(value).items()}


def from_extensions(extensions: Mapping[str, str]) -> dict[str, int | float | None]:
    """What user data asks for (the inverse of ``extensions``)."""
    found: dict[str, int | float | None] = {}
    for key in KEYS:
        text = extensions.get(EXTENSION.format(key=key))
        if text is not None:
            found[key] = None if text == NO_LIMIT else (
                float(text) if key == "cpus" else int(text))
    return found


def from_info(info: Mapping[str, Any]) -> dict[str, int | float | None] | None:
    """The limits a container reported (``memory=<bytes> pids=<n> cpus=<n>``, ``max`` for
    none), or None when its image reports nothing (the seed's, older ones)."""
    text = str(info.get(INFO) or "").strip()
    if not text:
        return None
    found: dict[str, int | float | None] = {}
    for word in text.split():
        key, _, raw = word.partition("=")
        if key not in KEYS:
            continue
        if raw == "max":
            found[key] = None
            continue
        try:
            number = float(raw) if key == "cpus" else int(raw)
        except ValueError:
            continue
        if number > 0 and math.isfinite(number):
            found[key] = number
    return found or None


def row(configured: Any, reported: Mapping[str, Any] | None) -> dict[str, Any]:
    """The Fleet API's ``container_limits``: what the worker is configured with (only the
    keys given; null is no limit, a missing key the bootstrap's default) and what its
    container reported (null if it did not)."""
    try:
        given = {} if configured is None else normalize(configured)
    except LimitsError:
        given = {}
    return {"configured": given, "applied": None if reported is None else dict(reported)}
