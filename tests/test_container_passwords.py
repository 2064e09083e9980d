"""One-time container passwords: the master's derivation and the bootstrap's agree."""

from __future__ import annotations

import re
import subprocess

import pytest

from buildbot_dockerami.protocol.passwords import (
    OneTimeCredentials,
    container_password,
    new_secret,
)
from tests.harness import REPO


def bootstrap_password(secret: str, number: int) -> str:
    """The bootstrap's own shell function, run by sh as on an instance."""
    script = (REPO / "ami" / "dockerami-bootstrap.sh").read_text()
    function = re.search(r"^container_password\(\) \{\n.*?^\}\n", script, re.M | re.S)
    assert function, "container_password() not found in the bootstrap"
    result = subprocess.run(["sh", "-c", function.group(0) + 'container_password "$1" "$2"',
                             "sh", secret, str(number)], capture_output=True, text=True,
                            check=True)
    return result.stdout.strip()


def test_the_bootstrap_derives_the_same_passwords_as_the_master():
    secret = new_secret()
    for number in (0, 1, 2, 10, 12345):
        assert bootstrap_password(secret, number) == container_password(secret, number)


def test_every_container_and_every_slot_gets_its_own_password():
    a, b = new_secret(), new_secret()
    passwords = {container_password(s, n) for s in (a, b) for n in range(50)}
    assert len(passwords) == 100
    assert all(re.fullmatch(r"[0-9a-f]{32}", p) for p in passwords)
    assert a not in passwords and b not in passwords  # a password is never the secret


def test_spending_a_password_moves_to_the_next_container():
    slot = OneTimeCredentials.fresh()
    first = slot.password
    assert slot.password == first  # stable until spent
    second = slot.spend()
    assert second != first and slot.password == second == container_password(slot.secret, 1)
    assert OneTimeCredentials.fresh().secret != slot.secret


@pytest.mark.parametrize("secret, number", [("", 0), ("ABCDEF", 0), ("12 34", 0), ("ab;rm", 0),
                                            ("abcd", -1)])
def test_bad_secrets_and_numbers_are_refused(secret, number):
    with pytest.raises(ValueError):
        container_password(secret, number)
