"""Try PB logins to a buildbot master as an attacker would: no worker, just credentials.

Reads JSON [[user, password], ...] on stdin; prints one JSON list of results, each
"refused" (the master refused the credentials) or what happened otherwise (a login
the master accepted fails later here, since this client is no worker; either way it
is not "refused"). Usage: python pb_login.py HOST PORT < attempts.json
"""

from __future__ import annotations

import json
import sys

from twisted.cred import credentials, error
from twisted.internet import defer, reactor
from twisted.spread import pb


@defer.inlineCallbacks
def attempt(host: str, port: int, user: str, password: str) -> defer.Deferred:
    factory = pb.PBClientFactory()
    connector = reactor.connectTCP(host, port, factory, timeout=10)
    login = factory.login(credentials.UsernamePassword(user.encode(), password.encode()),
                          client=pb.Referenceable())
    outcome = yield login.addCallbacks(
        lambda _: "accepted",
        lambda f: "refused" if f.check(error.UnauthorizedLogin) else f"error: {f.value!r}",
    )
    connector.disconnect()
    return outcome


@defer.inlineCallbacks
def main(host: str, port: int, attempts: list[list[str]]) -> defer.Deferred:
    results = []
    try:
        for user, password in attempts:
            results.append((yield attempt(host, port, user, password)))
    finally:
        print(json.dumps(results))
        reactor.stop()


if __name__ == "__main__":
    reactor.callWhenRunning(main, sys.argv[1], int(sys.argv[2]), json.load(sys.stdin))
    reactor.run()
