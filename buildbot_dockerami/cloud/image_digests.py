"""What an image tag points at now, asked of its registry (Docker Registry HTTP API v2).

One check is ``HEAD /v2/<repository>/manifests/<tag>``, accepting OCI indexes, Docker
manifest lists and both single manifests, read from ``Docker-Content-Digest`` (a
registry that leaves it out is asked with GET and the body hashed, which is what the
digest is). Authentication as Docker does it, with nothing the operator did not already
configure for the instances:

* anonymous first; a ``401`` with a ``Bearer realm=...,service=...,scope=...`` challenge
  fetches a token and asks again (Docker Hub, GHCR, Quay, most registries with token
  auth): with the credentials below only when the realm is HTTPS on the registry's own
  host or its known token service (TOKEN_SERVICES), else anonymously;
* a ``Basic`` challenge is answered with the worker's ``registry_credentials`` (an SSM
  parameter or a Secrets Manager secret, ``{"username": ..., "password": ...}``), read
  by the master with its own credential chain (the worker's ``session`` if it has one,
  else boto3's: environment, ``~/.aws``, its instance profile; ``AWS_ENDPOINT_URL``
  honoured) in the worker's region;
* an ECR image (protocol/registry.is_ecr) with ``ecr:GetAuthorizationToken`` in the
  image's region, the same chain.

Any failure raises ``DigestError``, whose message never holds a secret: the caller takes
it as "unknown". Loopback registries are spoken to in plain HTTP, others in HTTPS.
Blocking; ``AsyncImageDigests`` runs it off the reactor thread. No buildbot imports.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import boto3
from botocore.exceptions import BotoCoreError, ClientError
from twisted.internet import threads

from buildbot_dockerami.cloud.ec2 import boto_config, resolve_region
from buildbot_dockerami.protocol import imagedigest, registry

#: Seconds one socket operation of a request to a registry (or its token service) may take.
DEFAULT_TIMEOUT = 10.0
#: Seconds one whole check (its requests, a token's included, and reading their bodies)
#: may take; a registry that trickles its answer is cut off there.
DEFAULT_DEADLINE = 30.0
_CHUNK = 64 * 1024
ACCEPT = ", ".join((
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
))
_PARAM = re.compile(r'(\w+)="([^"]*)"')
_ECR_REGION = re.compile(r"\.dkr\.ecr(?:-fips)?\.([a-z0-9-]+)\.amazonaws\.com")
#: How the master names itself to registries (their access logs show it).
USER_AGENT = "buildbot-dockerami-image-refresh"
#: Answers read from a registry are small; a larger one is not a manifest.
_MAX_BODY = 4 * 1024 * 1024
#: Token services on another host than their registry that get its credentials (the
#: registry's Bearer challenge names them): Docker Hub's and GitLab.com's. Any other
#: realm host than the registry's own gets an anonymous token request only.
TOKEN_SERVICES: Mapping[str, tuple[str, ...]] = {
    "registry-1.docker.io": ("auth.docker.io",),
    "ghcr.io": ("ghcr.io",),
    "registry.gitlab.com": ("gitlab.com",),
    "quay.io": ("quay.io",),
}


class DigestError(Exception):
    """The tag's digest could not be learned; the message names no secret."""


@dataclass(frozen=True)
class Auth:
    """Where a worker's registry credentials come from (never the secret itself)."""

    #: ``ssm:<parameter>`` or ``secretsmanager:<secret>`` (registry_credentials), or None.
    credentials: str | None = None
    region: str | None = None
    #: The worker's own boto3 session, if it has one.
    session: Any = field(default=None, compare=False, repr=False)

    def key(self) -> tuple[str | None, str | None, int | None]:
        """What an answer is shared by: the same credentials, read in the same region
        through the same session (another session may read other credentials)."""
        return (self.credentials, self.region,
                id(self.session) if self.session is not None else None)


def challenge(header: str) -> tuple[str, dict[str, str]]:
    """A ``WWW-Authenticate`` header read: its scheme (lower case) and parameters."""
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), dict(_PARAM.findall(rest))


def _hostname(url: str) -> str:
    return (urllib.parse.urlsplit(url).hostname or "").lower()


def token_services(services: Mapping[str, Any] | None) -> dict[str, tuple[str, ...]]:
    """FleetSettings' ``registry_token_services`` (checked: config/checks.py) as
    realm_gets_credentials takes it: registry host -> token service hosts."""
    return {registry_host: ((hosts,) if isinstance(hosts, str) else tuple(hosts))
            for registry_host, hosts in (services or {}).items()}


def realm_gets_credentials(api_host: str, realm: str,
                           also: Mapping[str, tuple[str, ...]] | None = None) -> bool:
    """Whether the token service at ``realm``, named by the Bearer challenge of the
    registry at ``api_host``, may be sent the registry credentials: only the registry's
    own host or its known token service (TOKEN_SERVICES, and ``also``: the operator's
    FleetSettings ``registry_token_services``, registry host -> token service hosts,
    e.g. a self-hosted GitLab's). A realm in plain HTTP is
    refused (DigestError) unless registry and realm are both loopback: a challenge is
    no reason to send a password anywhere, nor in the clear."""
    scheme = urllib.parse.urlsplit(realm).scheme
    if scheme not in ("http", "https"):
        raise DigestError(f"{api_host}: token realm is not an HTTP URL")
    registry_name, realm_name = _hostname(f"//{api_host}"), _hostname(realm)
    if scheme != "https" and not (registry_name in imagedigest.LOOPBACK_HOSTS
                                    and realm_name in imagedigest.LOOPBACK_HOSTS):
        raise DigestError(f"{api_host}: token realm {realm_name} is not HTTPS")
    known = (*TOKEN_SERVICES.get(registry_name, ()), *(also or {}).get(registry_name, ()))
    return realm_name == registry_name or realm_name in known


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    return parts.scheme, _hostname(url), port or {"http": 80, "https": 443}.get(parts.scheme)


class SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to the same scheme, host and port, keeping the method
    (urllib's own follows anywhere, https to http, a HEAD as a GET, with the
    Authorization header): anything else is a failed check, never a leaked credential."""

    def redirect_request(  # noqa: PLR0917 (urllib calls it so)
            self, req: urllib.request.Request, fp: Any, code: int, msg: str,
            headers: Any, newurl: str) -> urllib.request.Request | None:
        if _origin(newurl) != _origin(req.full_url):
            fp.close()
            raise DigestError(f"{urllib.parse.urlsplit(req.full_url).netloc}: HTTP {code} "
                              f"to another origin ({_hostname(newurl) or newurl!r}), not followed")
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            new.method = req.get_method()
        return new


def _session(auth: Auth) -> Any:
    return auth.session or boto3.session.Session()


def stored_credentials(auth: Auth) -> tuple[str, str]:
    """The username and password ``auth.credentials`` names (SSM or Secrets Manager)."""
    scheme, _, name = (auth.credentials or "").partition(":")
    session = _session(auth)
    region = resolve_region(auth.region, session)
    try:
        if scheme == "ssm":
            client = session.client("ssm", region_name=region, config=boto_config(DEFAULT_TIMEOUT))
            text = client.get_parameter(Name=name, WithDecryption=True)["Parameter"]["Value"]
        elif scheme == "secretsmanager":
            client = session.client("secretsmanager", region_name=region,
                                    config=boto_config(DEFAULT_TIMEOUT))
            text = client.get_secret_value(SecretId=name)["SecretString"]
        else:
            raise DigestError(f"registry_credentials {scheme!r}: not a known scheme")
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "error")
        raise DigestError(f"reading {auth.credentials}: {code}") from None
    except (BotoCoreError, KeyError) as e:
        raise DigestError(f"reading {auth.credentials}: {e.__class__.__name__}") from None
    try:
        value = json.loads(text)
        return str(value["username"]), str(value["password"])
    except (ValueError, KeyError, TypeError):
        raise DigestError(f"{auth.credentials} holds no JSON username and password") from None


def ecr_credentials(host: str, auth: Auth) -> tuple[str, str]:
    """A token for an ECR registry (``AWS`` and a password valid for 12 hours)."""
    found = _ECR_REGION.search(host)
    region = found.group(1) if found else auth.region
    try:
        client = _session(auth).client("ecr", region_name=region,
                                       config=boto_config(DEFAULT_TIMEOUT))
        token = client.get_authorization_token()["authorizationData"][0]["authorizationToken"]
        user, _, password = base64.b64decode(token).decode().partition(":")
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "error")
        raise DigestError(f"ecr:GetAuthorizationToken: {code}") from None
    except (BotoCoreError, KeyError, IndexError, ValueError) as e:
        raise DigestError(f"ecr:GetAuthorizationToken: {e.__class__.__name__}") from None
    return user, password


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class ImageDigests:
    """Blocking registry calls. Call only from a worker thread.

    ``credentials(reference, auth)`` gives the username and password for a registry
    that asks for them (by default: ECR's token, or ``auth.credentials`` read)."""

    def __init__(self, timeout: float = DEFAULT_TIMEOUT,
                 credentials: Callable[[imagedigest.Reference, Auth],
                                       tuple[str, str] | None] | None = None,
                 deadline: float = DEFAULT_DEADLINE) -> None:
        self.timeout = timeout
        self.deadline = deadline
        self.credentials = credentials or self._stored
        #: The operator's token services beyond TOKEN_SERVICES (realm_gets_credentials).
        self.token_services: Mapping[str, tuple[str, ...]] = {}
        no_proxy = urllib.request.ProxyHandler({})
        self._direct = urllib.request.build_opener(no_proxy, SameOriginRedirects)
        self._opener = urllib.request.build_opener(SameOriginRedirects)

    @staticmethod
    def _stored(reference: imagedigest.Reference, auth: Auth) -> tuple[str, str] | None:
        if registry.is_ecr(f"{reference.registry}/x"):
            return ecr_credentials(reference.registry, auth)
        if auth.credentials:
            return stored_credentials(auth)
        return None

    def digest(self, image: str, auth: Auth | None = None) -> str:
        """The digest ``image``'s tag points at now (``sha256:...``)."""
        auth = auth or Auth()
        reference = imagedigest.parse(image)
        if reference is None:
            raise DigestError(f"{image!r} is not an image reference")
        if reference.digest is not None:
            return reference.digest  # pinned
        url = reference.manifest_url()
        until = time.monotonic() + self.deadline
        status, headers, _ = self._request(until, "HEAD", url, {"Accept": ACCEPT})
        if status == 401:
            authorization = self._authorize(reference, auth,
                                            headers.get("WWW-Authenticate", ""), until)
            status, headers, _ = self._request(until, "HEAD", url,
                                               {"Accept": ACCEPT, "Authorization": authorization})
            if status == 200 and not headers.get("Docker-Content-Digest"):
                return self._hashed(until, url, {"Accept": ACCEPT,
                                                 "Authorization": authorization})
        elif status == 200 and not headers.get("Docker-Content-Digest"):
            return self._hashed(until, url, {"Accept": ACCEPT})
        if status != 200:
            raise DigestError(f"{url}: HTTP {status}")
        found = headers.get("Docker-Content-Digest", "").strip()
        if not imagedigest.valid(found):
            raise DigestError(f"{url}: no sha256 Docker-Content-Digest")
        return found

    def _hashed(self, until: float, url: str, headers: Mapping[str, str]) -> str:
        status, _, body = self._request(until, "GET", url, headers)
        if status != 200:
            raise DigestError(f"{url}: HTTP {status}")
        return "sha256:" + hashlib.sha256(body).hexdigest()

    def _authorize(self, reference: imagedigest.Reference, auth: Auth, header: str,
                   until: float) -> str:
        """The Authorization header a 401's challenge asks for."""
        scheme, params = challenge(header)
        if scheme == "bearer" and params.get("realm"):
            return "Bearer " + self._token(reference, auth, params, until)
        if scheme == "basic":
            found = self.credentials(reference, auth)
            if found is None:
                raise DigestError(f"{reference.api_host} wants credentials (HTTP basic) and "
                                  "the worker has no registry_credentials")
            return _basic(*found)
        raise DigestError(f"{reference.api_host}: unknown authentication challenge "
                          f"{scheme or '(none)'!r}")

    def _token(self, reference: imagedigest.Reference, auth: Auth,
               params: Mapping[str, str], until: float) -> str:
        realm = params["realm"]
        trusted = realm_gets_credentials(reference.api_host, realm, self.token_services)
        query = {key: params[key] for key in ("service", "scope") if params.get(key)}
        query.setdefault("scope", f"repository:{reference.repository}:pull")
        url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(query)
        headers: dict[str, str] = {}
        found = self.credentials(reference, auth) if trusted else None
        if found is not None:
            headers["Authorization"] = _basic(*found)
        status, _, body = self._request(until, "GET", url, headers)
        if status != 200:
            raise DigestError(f"{reference.api_host}: token service answered HTTP {status}")
        try:
            answer = json.loads(body)
            token = answer.get("token") or answer.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise DigestError(f"{reference.api_host}: token service gave no token")
        return token

    def _request(self, until: float, method: str, url: str,
                 headers: Mapping[str, str]) -> tuple[int, Mapping[str, str], bytes]:
        """One request, within the check's deadline ``until`` (time.monotonic): checked
        before it and between the chunks of its body; each socket operation also ends
        within ``timeout``."""
        parts = urllib.parse.urlsplit(url)
        netloc = parts.netloc
        request = urllib.request.Request(url, method=method,
                                         headers={"User-Agent": USER_AGENT, **headers})
        direct = (parts.hostname or "") in imagedigest.LOOPBACK_HOSTS
        opener = self._direct if direct else self._opener
        try:
            with opener.open(request, timeout=min(self.timeout, self._left(until, netloc))) \
                    as answer:
                chunks: list[bytes] = []
                size = 0
                while chunk := answer.read1(_CHUNK):
                    size += len(chunk)
                    if size > _MAX_BODY:  # not a manifest; never hash part of one
                        raise DigestError(f"{netloc}: answer larger than {_MAX_BODY} bytes")
                    chunks.append(chunk)
                    self._left(until, netloc)
                return answer.status, answer.headers, b"".join(chunks)
        except urllib.error.HTTPError as e:
            with e:
                return e.code, e.headers, b""
        except (OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e.__class__.__name__
            raise DigestError(f"{netloc}: {reason}") from None

    def _left(self, until: float, netloc: str) -> float:
        left = until - time.monotonic()
        if left <= 0:
            raise DigestError(f"{netloc}: no answer within the check's {self.deadline:g}s")
        return left


class AsyncImageDigests:
    """``ImageDigests`` with ``digest`` returning a Deferred, run in the thread pool
    ``pool()`` gives (the fleet's; the reactor's by default)."""

    def __init__(self, reactor: Any, digests: ImageDigests | None = None,
                 pool: Callable[[], Any] | None = None) -> None:
        self._reactor = reactor
        self._pool = pool or reactor.getThreadPool
        self.digests = digests or ImageDigests()

    def digest(self, image: str, auth: Auth | None = None) -> Any:
        return threads.deferToThreadPool(self._reactor, self._pool(), self.digests.digest,
                                         image, auth)
