"""Capacity is a list, not a value: which (instance type, subnet, market) to try next.

Pure. A launch tries the options in the operator's order; one that EC2 refused for
capacity is moved to the back for a cool-down, for every worker of the master, so the
next launch does not waste a call on it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

#: ``market=`` -> the markets tried, in order.
MARKETS: dict[str, tuple[str, ...]] = {
    "on-demand": ("on-demand",),
    "spot": ("spot",),
    "spot-or-on-demand": ("spot", "on-demand"),
}
#: EC2 error codes that mean "not this option now", worth trying the next one.
CAPACITY_CODES = frozenset({
    "InsufficientInstanceCapacity", "InsufficientCapacity", "Unsupported",
    "InstanceLimitExceeded", "VcpuLimitExceeded", "InsufficientFreeAddressesInSubnet",
    "SpotMaxPriceTooLow", "MaxSpotInstanceCountExceeded", "InsufficientSpotCapacity",
})
#: Seconds a refused option stays at the back of the list.
COOL_DOWN_SECONDS = 300.0


@dataclass(frozen=True)
class Option:
    instance_type: str
    subnet_id: str | None
    market: str

    def __str__(self) -> str:
        subnet = f" in {self.subnet_id}" if self.subnet_id else ""
        return f"{self.instance_type}{subnet} ({self.market})"


def as_list(value: Any) -> list[Any]:
    """A setting that takes one value or a list of them."""
    if value is None:
        return [None]
    return list(value) if isinstance(value, list | tuple) else [value]


def options(instance_types: Any, subnet_ids: Any, market: str) -> list[Option]:
    """Every option in the operator's order: market first (spot before on-demand for
    'spot-or-on-demand'), then instance type, then subnet."""
    return [
        Option(itype, subnet, mkt)
        for mkt, itype, subnet in itertools.product(
            MARKETS[market], as_list(instance_types), as_list(subnet_ids))
    ]


def is_capacity_error(code: str) -> bool:
    return code in CAPACITY_CODES


class CoolDown:
    """Options EC2 recently refused for capacity, and until when they are avoided."""

    def __init__(self, seconds: float = COOL_DOWN_SECONDS) -> None:
        self.seconds = seconds
        self._until: dict[Option, float] = {}
        #: (instance type, market) -> until when every subnet's option of it cools.
        self._kinds: dict[tuple[str, str], float] = {}

    def failed(self, option: Option, now: float) -> None:
        self._until[option] = now + self.seconds

    def avoid(self, instance_type: str, market: str, now: float) -> None:
        """EC2 warned of capacity for this type and market (a spot rebalance
        recommendation): its options cool in every subnet, as a refused option does."""
        self._kinds[(instance_type, market)] = now + self.seconds

    def _cooling_until(self, option: Option) -> float | None:
        times = [t for t in (self._until.get(option),
                             self._kinds.get((option.instance_type, option.market)))
                 if t is not None]
        return max(times) if times else None

    def order(self, candidates: Sequence[Option], now: float) -> list[Option]:
        """Fresh options in order, then cooling ones (soonest back first): when every
        option is cooling, trying one beats not launching at all."""
        for table in (self._until, self._kinds):
            for key, until in list(table.items()):
                if until <= now:
                    del table[key]
        fresh = [o for o in candidates if self._cooling_until(o) is None]
        cooling = sorted((o for o in candidates if self._cooling_until(o) is not None),
                         key=self._cooling_until)
        return fresh + cooling
