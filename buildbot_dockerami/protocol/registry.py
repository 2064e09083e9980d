"""Pulling from a private registry without a secret in the user data. Pure functions.

Two ways, both with the instance's own role (its instance profile):

* ECR: the base AMI has Docker's ECR credential helper (``docker-credential-ecr-login``);
  the bootstrap names the image's ECR host in ``credHelpers`` of its Docker config,
  and the helper gets a token with the instance role. Nothing travels in user data.
* Any other registry: the worker setting ``registry_credentials`` names where the
  credentials live, an SSM Parameter Store parameter (``ssm:/ci/registry``, best a
  SecureString) or a Secrets Manager secret (``secretsmanager:<name or ARN>``), whose
  value is ``{"username": "...", "password": "..."}``. Only that *name* goes into the
  user data (extension ``registry.credentials``); the bootstrap fetches the value at
  boot with the instance role and logs in with ``docker login --password-stdin``.

The bootstrap (ami/dockerami-bootstrap.sh) applies the same rules as here, in sh.
"""

from __future__ import annotations

import re

#: User-data extension naming where the registry credentials live (never the secret).
EXTENSION = "registry.credentials"

#: Schemes of ``registry_credentials`` and what each names.
SCHEMES = {
    "ssm": "an SSM Parameter Store parameter, e.g. 'ssm:/ci/registry'",
    "secretsmanager": "a Secrets Manager secret, e.g. 'secretsmanager:ci/registry' or its ARN",
}

_SSM_NAME = re.compile(
    r"^(?:/?[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)*"
    r"|arn:aws[a-z-]*:ssm:[a-z0-9-]+:\d{12}:parameter/[A-Za-z0-9_./-]+)$")
_SECRET_NAME = re.compile(
    r"^(?:[A-Za-z0-9/_+=.@-]+"
    r"|arn:aws[a-z-]*:secretsmanager:[a-z0-9-]+:\d{12}:secret:[A-Za-z0-9/_+=.@-]+)$")
_NAMES = {"ssm": (_SSM_NAME, 2048), "secretsmanager": (_SECRET_NAME, 2048)}

#: ECR's private registry hosts, as the credential helper recognises them.
ECR_HOST = re.compile(
    r"^\d{12}\.dkr\.ecr(?:-fips)?\.[a-z0-9-]+\.amazonaws\.com(?:\.cn)?$")

#: The setting checkconfig names for an ECR image launched without a role.
ECR_SETTING = "instance_profile"


def registry_host(image: str) -> str:
    """The registry an image reference is pulled from, as Docker reads it: the first
    path component if it looks like a host (a '.' or ':' in it, or ``localhost``),
    else Docker Hub (``docker.io``)."""
    first, sep, _ = image.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return first
    return "docker.io"


def is_ecr(image: str) -> bool:
    """Whether ``image`` is in a private ECR registry (pulled with the ECR helper)."""
    return bool(ECR_HOST.match(registry_host(image)))


def check_registry_credentials(value: object) -> str | None:
    """The problem with a ``registry_credentials`` value, or None if it is usable."""
    if not isinstance(value, str):
        return (f"must be a string such as 'ssm:/ci/registry', not {type(value).__name__}")
    scheme, sep, name = value.partition(":")
    if not sep or scheme not in SCHEMES:
        shown = repr(scheme) if sep else repr(value[:60])
        return (f"{shown} is not a known scheme; use one of: "
                + "; ".join(f"'{s}:...' ({what})" for s, what in SCHEMES.items()))
    pattern, longest = _NAMES[scheme]
    if not name or len(name) > longest or not pattern.match(name):
        return f"{name[:80]!r} is not a valid {scheme} name ({SCHEMES[scheme]})"
    return None


def problems(registry_credentials: object) -> list[str]:
    """checkconfig's errors about ``registry_credentials`` (None: not used)."""
    if registry_credentials is None:
        return []
    problem = check_registry_credentials(registry_credentials)
    return [f"registry_credentials: {problem}"] if problem else []


def warnings(image: object, registry_credentials: object, instance_profile: object) -> list[str]:
    """What checkconfig warns about how ``image`` will be pulled: a literal ECR image,
    or credentials to fetch, with no instance profile to do it with (the role may also
    come with the AMI's launch setup, hence a warning, not an error)."""
    found = []
    ecr = isinstance(image, str) and is_ecr(image)
    if ecr and instance_profile is None:
        found.append(
            f"{ECR_SETTING}: image {image!r} is in ECR, which the instance pulls from with "
            "its role; set instance_profile to a profile whose role may pull it "
            "(ecr:GetAuthorizationToken, ecr:BatchGetImage, ecr:GetDownloadUrlForLayer)")
    if registry_credentials is not None and ecr:
        found.append(
            "registry_credentials: not used for an ECR image (the ECR credential helper "
            "pulls it with the instance role)")
    elif registry_credentials is not None and instance_profile is None:
        found.append(
            f"{ECR_SETTING}: registry_credentials are read at boot with the instance's "
            "role; set instance_profile to a profile whose role may read "
            f"{registry_credentials!r}")
    return found
