"""Building and pushing worker images with the local Docker engine (docker-py).

The seed's conventions: one folder per image with its Dockerfile, tags named by
date (``repo:YYYY-MM-DD``). The engine is never asked to pull: the base image is
a local one, given as the BASE build argument.
"""

from __future__ import annotations

import datetime
import platform
import re
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import docker

Printer = Callable[[str], None]


class ImageError(Exception):
    """A build or push failed; the message is the engine's own."""


def default_tag(repo: str, today: datetime.date | None = None) -> str:
    return f"{repo}:{(today or datetime.date.today()).isoformat()}"


def engine() -> docker.DockerClient:
    """The local engine. The Docker SDK is the optional 'images' extra: imported here."""
    try:
        import docker
        from docker.errors import DockerException
    except ModuleNotFoundError:
        raise ImageError(
            "the image commands need the Docker SDK: pip install 'buildbot-dockerami[images]'"
        ) from None
    try:
        client = docker.from_env()
        client.ping()
    except DockerException as e:
        raise ImageError(
            f"no Docker engine reachable (DOCKER_HOST or /var/run/docker.sock): {e}"
        ) from e
    return client


#: Docker's architecture names -> the machine in pip's manylinux platform tags.
WHEEL_MACHINES = {"amd64": "x86_64", "arm64": "aarch64", "386": "i686",
                  "ppc64le": "ppc64le", "s390x": "s390x"}


def engine_architecture(client: Any = None) -> str:
    """The engine's architecture in Docker's words (amd64, arm64): what ``build`` builds
    for, the engine's own platform (no emulation). On a Mac or a remote DOCKER_HOST it
    need not be this host's."""
    client = client or engine()
    return str(client.version().get("Arch") or "")


#: What the reference image installs next to the worker (its Dockerfile's WORKER_EXTRAS):
#: Twisted's TLS extra (pyOpenSSL, service_identity), for ``master_tls_fingerprint``.
WORKER_EXTRAS = ("twisted[tls]",)


def fetch_wheels(context: Path, *requirements: str, python_version: str = "3.11",
                 out: Printer = print, architecture: str | None = None) -> None:
    """Download the worker's wheels into ``context/wheels`` with this host's pip, so the
    image builds with ``PIP_OPTIONS=--no-index`` where the engine cannot reach PyPI;
    for the engine's ``architecture`` (Docker's name), this host's machine if None."""
    target = context / "wheels"
    target.mkdir(exist_ok=True)
    arch = WHEEL_MACHINES.get(architecture or "", architecture) or platform.machine()
    out(f"fetching wheels for {' '.join(requirements)} (CPython {python_version}, {arch}) "
        f"into {target}")
    try:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(target),
             "--only-binary=:all:", "--platform", f"manylinux2014_{arch}",
             "--python-version", python_version, "--implementation", "cp", *requirements],
            check=True,
        )
    except subprocess.CalledProcessError as e:  # pip said why above: no traceback here
        raise ImageError(f"pip download of {' '.join(requirements)} failed (exit "
                         f"{e.returncode}; pip's error is above)") from None


def _follow(stream: Iterable[dict[str, Any]], out: Printer) -> None:
    for chunk in stream:
        if "error" in chunk:
            raise ImageError(chunk["error"].strip())
        if "stream" in chunk and chunk["stream"].strip():
            out(chunk["stream"].rstrip("\n"))
        elif "status" in chunk:
            detail = chunk.get("progress") or ""
            prefix = f"{chunk['id']}: " if chunk.get("id") else ""
            out(f"{prefix}{chunk['status']} {detail}".rstrip())


def base_images(dockerfile: str, build_args: dict[str, str]) -> list[str]:
    """The images a Dockerfile's FROM lines name, with ARG defaults and build args applied
    (stages and ``scratch`` excluded)."""
    args: dict[str, str] = {}
    stages: set[str] = set()
    bases: list[str] = []
    for raw in dockerfile.splitlines():
        words = raw.split()
        if not words or words[0].startswith("#"):
            continue
        keyword = words[0].upper()
        if keyword == "ARG" and len(words) > 1:
            name, _, default = words[1].partition("=")
            args[name] = build_args.get(name, default.strip("\"'"))
        elif keyword == "FROM":
            operands = [w for w in words[1:] if not w.startswith("--")]
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), ""), operands[0])
            if len(operands) >= 3 and operands[1].upper() == "AS":
                stages.add(operands[2])
            if image != "scratch" and image not in stages:
                bases.append(image)
    return bases


def build(context: Path, tag: str, build_args: dict[str, str], out: Printer = print) -> str:
    dockerfile = context / "Dockerfile"
    if not dockerfile.is_file():
        raise ImageError(f"{context} has no Dockerfile")
    (context / "wheels").mkdir(exist_ok=True)
    client = engine()
    from docker.errors import ImageNotFound  # installed: engine() answered

    # The engine would try a public registry for a missing base: refuse before it does.
    for base in base_images(dockerfile.read_text(), build_args):
        try:
            client.images.get(base)
        except ImageNotFound:
            raise ImageError(
                f"base image {base!r} is not on this Docker engine; make one (dev/engine "
                "makes dockerami/base:bookworm) and pass --base, or pull it yourself"
            ) from None
    out(f"building {tag} from {context} for linux/{engine_architecture(client)} "
        "(the engine's own platform)")
    stream = client.api.build(
        path=str(context), tag=tag, buildargs=build_args, decode=True, rm=True,
        pull=False, network_mode="host",
    )
    _follow(stream, out)
    client.images.get(tag)
    out(f"built {tag}")
    return tag


def push(tag: str, out: Printer = print) -> None:
    repository, _, version = tag.rpartition(":")
    if not repository or "/" in version:
        raise ImageError(f"{tag!r} has no tag; push a tagged image like repo:2026-11-27")
    client = engine()
    out(f"pushing {tag}")
    _follow(client.api.push(repository, tag=version, stream=True, decode=True), out)
    out(f"pushed {tag}")
