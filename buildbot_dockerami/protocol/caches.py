"""Caches that survive isolation, and the disk's free-space floor: what the worker
settings ``caches`` and ``disk_floor`` mean, checked and carried to the instance's
bootstrap as user-data extensions. Pure functions.

``caches={'ccache': '/home/builder/.ccache'}`` travels as ``cache.ccache=/home/builder/.ccache``;
the bootstrap keeps one Docker volume per (builder, cache) on the instance and mounts the
builder's own into the build's container at that path (docs/isolation.md#caches).
``disk_floor`` travels as ``disk.floor=10%`` or ``disk.floor=<MiB>M``; without it the
bootstrap keeps its default, 10% (docs/isolation.md#disk-hygiene).
"""

from __future__ import annotations

import math
import posixpath
import re
from collections.abc import Mapping
from typing import Any

#: User-data extension keys: ``cache.<name>=<path>`` and ``disk.floor=<N>%|<N>M``.
CACHE_PREFIX = "cache."
DISK_FLOOR = "disk.floor"

#: At most this many caches per worker (each one is a mount in every build container).
MAX_CACHES = 16
MAX_PATH = 200
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
#: No whitespace, quotes, commas (docker --mount splits on them) or shell-active characters.
_PATH = re.compile(r"^/[A-Za-z0-9._@+/-]+$")
#: Where a mount would hide the image's own system, or the bootstrap's hand-over.
_SYSTEM = frozenset({"/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64",
                     "/opt", "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp",
                     "/usr", "/var"})
_UNDER = ("/proc/", "/sys/", "/dev/", "/run/dockerami/")
_PERCENT = re.compile(r"^\s*(\d+)\s*%\s*$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([GM])(?:i?B)?\s*$", re.I)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def cache_problems(value: Any) -> list[str]:
    """checkconfig's view of ``caches`` (None: no caches)."""
    if value is None:
        return []
    if not isinstance(value, Mapping):
        return [f"caches: must be a dict of cache name to path in the build container, "
                f"e.g. {{'ccache': '/home/builder/.ccache'}}, not {type(value).__name__}"]
    if not value:
        return ["caches: give at least one cache, or leave the setting out"]
    if len(value) > MAX_CACHES:
        return [f"caches: at most {MAX_CACHES} caches, not {len(value)}"]
    problems: list[str] = []
    paths: dict[str, str] = {}
    for name, path in value.items():
        if not isinstance(name, str) or not _NAME.match(name):
            problems.append(f"caches: name {_short(name)} must be 1-32 characters: a lowercase "
                            "letter, then lowercase letters, digits, '_' or '-'")
            continue
        problem = _path_problem(path)
        if problem:
            problems.append(f"caches: {name!r}: {problem}")
            continue
        for other, other_path in paths.items():
            if path == other_path or path.startswith(other_path + "/") \
                    or other_path.startswith(path + "/"):
                problems.append(f"caches: {name!r} and {other!r}: {path!r} and "
                                f"{other_path!r} overlap; give each cache its own directory")
        paths[name] = path
    return problems


def _path_problem(path: Any) -> str:
    if not isinstance(path, str):
        return f"the path must be a string, not {type(path).__name__}"
    if not path.startswith("/") or posixpath.normpath(path) != path or "//" in path:
        return f"{_short(path)} must be an absolute, normalised path (e.g. '/home/builder/.ccache')"
    if path == "/" or path in _SYSTEM or path.startswith(_UNDER):
        return f"{path!r} would hide the image's own files; use a directory of its own"
    if len(path) > MAX_PATH or not _PATH.match(path):
        return (f"{_short(path)} may only have letters, digits and . _ @ + / - "
                f"(at most {MAX_PATH} characters)")
    return ""


def disk_floor_problems(value: Any) -> list[str]:
    """checkconfig's view of ``disk_floor`` (None: the bootstrap's default)."""
    if value is None:
        return []
    try:
        floor_extension(value)
    except ValueError as e:
        return [f"disk_floor: {e}"]
    return []


def floor_extension(value: Any) -> str:
    """``disk_floor`` as the bootstrap reads it: ``N%`` (1-90) or whole MiB ``NM``.
    A number, or a string ending in G or M, is a size (a bare number: GiB)."""
    wanted = ("must be a percentage of the disk like '10%' (1-90), or a size like '20G', "
              f"'512M' or 20 (GiB), not {_short(value)}")
    if isinstance(value, bool):
        raise ValueError(wanted)
    if isinstance(value, int | float):
        gib = float(value)
    elif isinstance(value, str) and (percent := _PERCENT.match(value)):
        if not 1 <= int(percent.group(1)) <= 90:
            raise ValueError(wanted)
        return f"{int(percent.group(1))}%"
    elif isinstance(value, str) and (size := _SIZE.match(value)):
        gib = float(size.group(1)) / (1 if size.group(2).upper() == "G" else 1024)
    else:
        raise ValueError(wanted)
    if not math.isfinite(gib) or gib <= 0 or gib > 1024 * 1024:
        raise ValueError(wanted)
    return f"{math.ceil(gib * 1024)}M"


def extensions(caches: Mapping[str, str] | None, disk_floor: Any) -> dict[str, str]:
    """The user-data extensions for these settings (checked before: see the *_problems)."""
    lines = {f"{CACHE_PREFIX}{name}": path for name, path in (caches or {}).items()}
    if disk_floor is not None:
        lines[DISK_FLOOR] = floor_extension(disk_floor)
    return lines
