"""Which image an instance runs, and where its tag is asked for what it points at now.
Pure functions.

The base AMI's bootstrap, once it has pulled the image named in the user data, reads
the repository digest the engine recorded for that reference (``docker image inspect``
``RepoDigests``) and passes it to each container (``DOCKERAMI_IMAGE_DIGEST``); the
reference image writes it as worker info ``image_digest``, which the master receives at
connect. An image that does not (the seed's), or one the engine never pulled nor pushed,
reports none: its instances are never refreshed for their image.

The master asks the registry what the tag points at now (cloud/image_digests.py, on the
Docker Registry HTTP API v2). References are read as Docker reads them: a first path
component with a ``.`` or ``:`` in it, or ``localhost``, is the registry; else Docker
Hub, whose API is at ``registry-1.docker.io`` and whose one-component names are under
``library/``; no tag means ``latest``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from buildbot_dockerami.protocol.registry import registry_host

#: The worker-info key (a file in the worker's info/ directory) the image writes.
DIGEST_INFO = "image_digest"
#: The environment variable the bootstrap gives each container.
DIGEST_ENV = "DOCKERAMI_IMAGE_DIGEST"

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
#: Docker Hub's names, and the host its registry API answers on.
HUB_NAMES = ("docker.io", "index.docker.io", "registry-1.docker.io")
HUB_API = "registry-1.docker.io"
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_REPOSITORY = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
                         r"(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")
#: Loopback registries are spoken to in plain HTTP (as Docker allows), others in HTTPS;
#: host names as urlsplit gives them (no port, no brackets).
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def valid(digest: object) -> bool:
    """Whether ``digest`` is a sha256 content digest (``sha256:`` and 64 hex digits)."""
    return isinstance(digest, str) and bool(_DIGEST.match(digest))


def from_info(info: Mapping[str, Any] | None) -> str | None:
    """The digest a worker's info reports for the image it runs, or None."""
    value = (info or {}).get(DIGEST_INFO)
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    value = value.strip() if isinstance(value, str) else value
    return value if valid(value) else None


def short(digest: str) -> str:
    """``sha256:`` and the first 12 hex digits, for a line an operator reads."""
    return digest[:19] + "…" if valid(digest) else digest


@dataclass(frozen=True)
class Reference:
    """An image reference as the registry API names it."""

    #: The registry's host[:port] as written (``docker.io`` for Docker Hub).
    registry: str
    #: The repository on that registry (``library/debian`` for ``debian``).
    repository: str
    tag: str
    #: Pinned by digest (``repo@sha256:...``): its content never changes.
    digest: str | None = None

    @property
    def api_host(self) -> str:
        return HUB_API if self.registry in HUB_NAMES else self.registry

    @property
    def scheme(self) -> str:
        host = self.api_host
        name = host[1:].split("]")[0] if host.startswith("[") else host.rsplit(":", 1)[0]
        return "http" if name in LOOPBACK_HOSTS else "https"

    def manifest_url(self) -> str:
        return f"{self.scheme}://{self.api_host}/v2/{self.repository}/manifests/{self.tag}"


def parse(image: str) -> Reference | None:
    """``image`` read as Docker reads it, or None when it is not a valid reference."""
    if not isinstance(image, str) or not image or image != image.strip():
        return None
    name, at, digest = image.partition("@")
    if at and not valid(digest):
        return None
    registry = registry_host(name)
    path = name[len(registry) + 1:] if name.startswith(registry + "/") else name
    tag = "latest"
    last = path.rsplit("/", 1)[-1]
    if ":" in last:
        path, tag = path.rsplit(":", 1)
    if registry in HUB_NAMES and "/" not in path:
        path = f"library/{path}"
    if not _REPOSITORY.match(path) or not _TAG.match(tag):
        return None
    return Reference(registry, path, tag, digest if at else None)


def pinned(image: str) -> bool:
    """A reference by digest: what it names never changes, so it never refreshes."""
    return "@" in image
