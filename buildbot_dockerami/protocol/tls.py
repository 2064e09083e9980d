"""TLS between worker and master, pinned to the master's certificate. Pure functions.

The master listens on a TLS port (buildbot's ``ssl:`` strport); the worker setting
``master_tls_fingerprint`` carries the SHA-256 fingerprint of the master's certificate
to the instance (user-data extension ``tls.sha256``). The image fetches the certificate,
refuses to connect if its fingerprint differs, and then trusts that certificate only,
so the worker's own TLS connection is verified against the pinned certificate, not
merely checked once before it.
"""

from __future__ import annotations

import re

#: User-data extension with the pinned fingerprint: 64 lowercase hex digits.
EXTENSION = "tls.sha256"

_FINGERPRINT = re.compile(r"^(?:sha256:)?([0-9a-f]{2}(?::?[0-9a-f]{2}){31})$", re.I)


def normalize_fingerprint(value: object) -> str:
    """``openssl x509 -fingerprint -sha256`` output (``AB:CD:...``, with or without
    ``SHA256 Fingerprint=`` or ``sha256:``) or plain hex, as 64 lowercase hex digits."""
    if not isinstance(value, str):
        raise ValueError(f"must be a string, not {type(value).__name__}")
    text = value.strip()
    if "=" in text:
        text = text.split("=", 1)[1]
    match = _FINGERPRINT.match(text)
    if not match:
        raise ValueError("must be the SHA-256 fingerprint of the master's certificate "
                         "(64 hex digits, colons allowed), e.g. from "
                         "`openssl x509 -in master.pem -noout -fingerprint -sha256`")
    return match.group(1).replace(":", "").lower()


def fingerprint_problems(value: object) -> list[str]:
    """checkconfig's view of ``master_tls_fingerprint`` (None: plain TCP)."""
    if value is None:
        return []
    try:
        normalize_fingerprint(value)
    except ValueError as e:
        return [f"master_tls_fingerprint: {e}"]
    return []
