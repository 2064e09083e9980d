"""Spot prices as EC2 gives them (DescribeSpotPriceHistory), cached per (instance type,
availability zone) of each EC2 client (a region and account: zone names are an
account's own).

Asked only on the fleet's own schedule, never by a reader: ``refresh`` (the fleet's
spending pass, spending.py) asks for the pairs its live spot instances run in whose
price is unknown or older than ``REFRESH_SECONDS``, all of a client's in one call; and
``price`` (a build that ended on a spot instance whose price is not known yet) asks for
one. Either way one call per client at a time, and a pair is asked again no sooner than
``RETRY_SECONDS`` after the last ask, whatever its outcome. Readers use ``known``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.python import log

#: A known spot price is asked again after this long (EC2 changes them gradually).
REFRESH_SECONDS = 30 * 60.0
#: The least time between two asks for one pair (a failure is retried after this).
RETRY_SECONDS = 5 * 60.0

Key = tuple[str, str]


@dataclass(frozen=True)
class Quote:
    usd_per_hour: float
    #: When EC2 gave it (the fleet's clock).
    at: float


class SpotPrices:
    """The spot prices this master knows, per EC2 client."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._quotes: dict[Hashable, dict[Key, Quote]] = {}
        self._asked: dict[Hashable, dict[Key, float]] = {}
        self._calls: dict[Hashable, defer.Deferred] = {}
        self._errors: dict[Hashable, str] = {}
        self.last_error: str | None = None

    def known(self, client: Hashable, instance_type: str, zone: str) -> Quote | None:
        """The last price EC2 gave for the pair; never asks EC2."""
        return self._quotes.get(client, {}).get((instance_type, zone))

    def _due(self, client: Hashable, key: Key, now: float) -> bool:
        asked = self._asked.get(client, {}).get(key)
        if asked is not None and now - asked < RETRY_SECONDS:
            return False
        quote = self.known(client, *key)
        return quote is None or now - quote.at >= REFRESH_SECONDS

    @defer.inlineCallbacks
    def refresh(self, wanted: Iterable[tuple[Any, str, str]]) -> Any:
        """Ask EC2 for the (client, type, zone) pairs that are due: one call per client."""
        by_client: dict[Any, set[Key]] = {}
        now = self._clock()
        for client, instance_type, zone in wanted:
            if instance_type and zone and self._due(client, (instance_type, zone), now):
                by_client.setdefault(client, set()).add((instance_type, zone))
        calls = [self._ask(client, keys) for client, keys in by_client.items()]
        yield defer.DeferredList(calls, consumeErrors=True)

    @defer.inlineCallbacks
    def price(self, client: Any, instance_type: str, zone: str) -> Any:
        """The pair's known price, or (if due) EC2's after one call; None if unknown.
        A call already on its way is waited for: it may be asking for this pair."""
        while client in self._calls:
            yield self._calls[client]
        if self._due(client, (instance_type, zone), self._clock()):
            yield self._ask(client, {(instance_type, zone)})
        return self.known(client, instance_type, zone)

    @defer.inlineCallbacks
    def _ask(self, client: Any, keys: set[Key]) -> Any:
        while client in self._calls:  # one call per client at a time
            yield self._calls[client]
            now = self._clock()
            keys = {key for key in keys if self._due(client, key, now)}
        if not keys:
            return
        asked = self._asked.setdefault(client, {})
        now = self._clock()
        for key in keys:
            asked[key] = now
        done: defer.Deferred = defer.Deferred()
        self._calls[client] = done
        try:
            found = yield client.spot_prices(sorted({t for t, _ in keys}),
                                             sorted({z for _, z in keys}))
        except Exception as e:
            message = f"DescribeSpotPriceHistory failed: {e}"
            if self._errors.get(client) != message:
                log.msg(f"dockerami: {message}; spot costs stay unknown until it answers")
            self._errors[client] = self.last_error = message
        else:
            quotes = self._quotes.setdefault(client, {})
            for key, value in found.items():
                quotes[key] = Quote(value, self._clock())
            self._errors.pop(client, None)
            self.last_error = None if not self._errors else self.last_error
        finally:
            del self._calls[client]
            done.callback(None)
