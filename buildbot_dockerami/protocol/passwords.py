"""One-time passwords for container-isolated slots. Pure functions, no I/O.

With ``isolation='container'`` a build runs as the same user as its worker, so it
can always read the password its container connected with. That password must be
worth nothing after the build: every container of a slot gets its own, and the
master accepts each one once.

At launch the master draws a secret per slot and puts it in the user data, which
only the instance's bootstrap (root) reads; containers never see it. The n-th
container of a slot (n = 0, 1, ...) connects with ``container_password(secret, n)``.
The master expects n and moves to n + 1 as soon as container n has connected. The
bootstrap moves to n + 1 when container n has exited after connecting (its log says
so), so a container that died before connecting is replaced by one with the same
password. A build knows one spent password and no secret; predicting the next
password means inverting SHA-256.

The derivation is SHA-256 over a fixed prefix, the secret and the counter, truncated
to 128 bits (truncation rules out length extension), because the bootstrap must
compute it with coreutils alone (``sha256sum``, the secret on a pipe, never on a
command line) on any base AMI.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

#: User-data extension holding slot K's secret (lines 5+; the seed's readers ignore it).
SECRET_KEY = "secret.{slot}"
_PREFIX = "dockerami-container-password"


def new_secret() -> str:
    """A slot's secret: 128 random bits, hex (what the bootstrap accepts)."""
    return secrets.token_hex(16)


def container_password(secret: str, number: int) -> str:
    """The password of a slot's ``number``-th container (32 hex digits)."""
    if not secret or any(c not in "0123456789abcdef" for c in secret):
        raise ValueError("a slot secret is lowercase hex")
    if number < 0:
        raise ValueError("container numbers start at 0")
    return hashlib.sha256(f"{_PREFIX}:{secret}:{number}".encode()).hexdigest()[:32]


@dataclass
class OneTimeCredentials:
    """The master's side of one slot on one instance: which container it expects."""

    secret: str
    number: int = 0

    @classmethod
    def fresh(cls) -> OneTimeCredentials:
        return cls(new_secret())

    @property
    def password(self) -> str:
        """What the expected container connects with."""
        return container_password(self.secret, self.number)

    def spend(self) -> str:
        """The expected container connected: its password is spent; the next one's."""
        self.number += 1
        return self.password
