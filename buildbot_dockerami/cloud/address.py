"""Which host instances connect to when ``master_address`` is not set.

On EC2 it is the master's private IPv4 from the instance metadata service (IMDSv2);
elsewhere this host's FQDN. The answer is found once per master process, when the
configuration is first loaded (buildbot loads it in a thread, so the reactor never
waits on DNS or the metadata service), and kept. A default that is a loopback name or
address cannot be reached by any instance, so checkconfig warns about it.

The metadata service is only asked when the machine says it is an EC2 instance (its
DMI vendor or Xen UUID), so nothing probes 169.254.169.254 elsewhere.
``DOCKERAMI_MASTER_IMDS`` overrides this: a metadata URL to ask instead (tests use a
loopback one), or ``off``.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path

IMDS_URL = "http://169.254.169.254"
IMDS_ENV = "DOCKERAMI_MASTER_IMDS"
#: Seconds per metadata request: off EC2 the address does not answer at all.
IMDS_TIMEOUT = 1.0
#: Where Linux says which hypervisor or vendor it runs on (Nitro: DMI; Xen: UUID).
PLATFORM_FILES = (
    "/sys/devices/virtual/dmi/id/sys_vendor",
    "/sys/devices/virtual/dmi/id/board_vendor",
    "/sys/hypervisor/uuid",
)

_lock = threading.Lock()
_default_host: str | None = None


def looks_like_ec2(platform: Mapping[str, str]) -> bool:
    """Whether the contents of PLATFORM_FILES (path -> text) say "EC2 instance"."""
    for path, raw in platform.items():
        text = raw.strip()
        if path.endswith("uuid"):
            if text.lower().startswith("ec2"):
                return True
        elif text == "Amazon EC2":
            return True
    return False


def is_loopback(host: str, addresses: Iterable[str]) -> bool:
    """Whether ``host`` (a name or literal, with what it resolves to) is this machine only."""
    name = host.strip("[]").lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    for address in [name, *addresses]:
        try:
            if ipaddress.ip_address(address.split("%")[0]).is_loopback:
                return True
        except ValueError:
            continue
    return False


def _read_platform() -> dict[str, str]:
    found = {}
    for path in PLATFORM_FILES:
        try:
            found[path] = Path(path).read_text(errors="replace")
        except OSError:
            continue
    return found


def resolve(host: str) -> list[str]:
    """The addresses ``host`` resolves to here ([] if it does not)."""
    try:
        return sorted({info[4][0] for info in socket.getaddrinfo(host, None)})
    except (OSError, UnicodeError):
        return []


def imds_private_ipv4(base_url: str = IMDS_URL, timeout: float = IMDS_TIMEOUT) -> str | None:
    """This instance's private IPv4 from the metadata service (IMDSv2), or None."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    try:
        token_request = urllib.request.Request(
            f"{base_url}/latest/api/token", method="PUT",
            headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"},
        )
        with opener.open(token_request, timeout=timeout) as response:
            token = response.read().decode().strip()
        ip_request = urllib.request.Request(
            f"{base_url}/latest/meta-data/local-ipv4",
            headers={"X-aws-ec2-metadata-token": token},
        )
        with opener.open(ip_request, timeout=timeout) as response:
            text = response.read().decode().strip()
        return str(ipaddress.IPv4Address(text))
    except (OSError, ValueError):
        return None


def detect_host(environ: Mapping[str, str] = os.environ) -> str:
    """Blocking: the EC2 private IPv4 when on EC2 and the metadata service answers, else
    this host's FQDN."""
    override = environ.get(IMDS_ENV, "")
    if override != "off":
        url = override or (IMDS_URL if looks_like_ec2(_read_platform()) else "")
        if url:
            private = imds_private_ipv4(url.rstrip("/"))
            if private is not None:
                return private
    return socket.getfqdn()


def default_host() -> str:
    """``detect_host()``, found on the first call in this process and kept."""
    global _default_host
    with _lock:
        if _default_host is None:
            _default_host = detect_host()
        return _default_host


def loopback_warning() -> str | None:
    """Why the default master address is useless to instances, or None if it is not.

    Blocking on the first call (see default_host): call it while loading the config."""
    host = default_host()
    addresses = resolve(host)
    if not is_loopback(host, addresses):
        return None
    shown = f"{host} ({', '.join(addresses)})" if addresses and addresses != [host] else host
    return (f"not set, and the default, this host's name {shown}, is a loopback address: "
            "instances cannot connect to it. Set master_address='<host or IP your instances "
            "reach>:<PB port>'")
