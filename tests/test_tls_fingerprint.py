"""The pinned master fingerprint: what operators paste is accepted, anything else refused."""

from __future__ import annotations

import pytest

from buildbot_dockerami.protocol import tls

HEX = "ab" * 32
COLONS = ":".join(["AB"] * 32)


@pytest.mark.parametrize("value", [HEX, HEX.upper(), COLONS, f"sha256:{HEX}",
                                   f"SHA256 Fingerprint={COLONS}",
                                   f"sha256 Fingerprint={COLONS}\n"])
def test_operator_spellings_normalize_to_lowercase_hex(value):
    assert tls.normalize_fingerprint(value) == HEX
    assert tls.fingerprint_problems(value) == []


@pytest.mark.parametrize("value", ["", "ab" * 31, "ab" * 33, "zz" * 32, "md5:" + "ab" * 16,
                                   HEX + ";rm -rf /", 5, ["ab"]])
def test_anything_else_is_refused_naming_the_setting(value):
    (problem,) = tls.fingerprint_problems(value)
    assert problem.startswith("master_tls_fingerprint: ")


def test_none_means_plain_tcp():
    assert tls.fingerprint_problems(None) == []
