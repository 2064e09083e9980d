"""On-demand prices: a default table for common instance types, which the operator
overrides (``FleetSettings(prices={...})``, docs/web-ui-and-metrics.md#costs).

The figures are approximate list prices: Linux, on-demand, in us-east-1 (N. Virginia),
USD per instance-hour, as of ``AS_OF``, from AWS's public on-demand price list
(https://aws.amazon.com/ec2/pricing/on-demand/). They were written down from that list,
not fetched: the AWS Pricing API was not reachable where this table was made, and the
plugin never calls it. Within a family AWS prices sizes in proportion to the size (an
``xlarge`` is twice a ``large``), which the table uses. Other regions, other operating
systems, Savings Plans, Reserved Instances and negotiated discounts cost otherwise:
give your own prices for the types you use. Spot prices are not here: they come from
EC2 itself (spot_prices.py). Pure.
"""

from __future__ import annotations

from collections.abc import Mapping

#: When the figures below were last compared with AWS's list.
AS_OF = "2026-06"
#: What the Fleet API says of a price from this table.
SOURCE = f"approximate us-east-1 Linux on-demand list price, as of {AS_OF}"
#: The price key of a stopped instance's storage (USD per hour per stopped instance):
#: none by default, as it depends on its volumes.
STOPPED = "stopped"

#: Size -> how many ``large`` it is.
_SIZES = {"nano": 1 / 16, "micro": 1 / 8, "small": 1 / 4, "medium": 1 / 2, "large": 1,
          "xlarge": 2, "2xlarge": 4, "4xlarge": 8, "8xlarge": 16}
_BURSTABLE = ("nano", "micro", "small", "medium", "large", "xlarge", "2xlarge")
_STANDARD = ("large", "xlarge", "2xlarge", "4xlarge", "8xlarge")

#: Family -> (USD per hour of its ``large``, the sizes listed).
_FAMILIES: dict[str, tuple[float, tuple[str, ...]]] = {
    # Burstable
    "t3": (0.0832, _BURSTABLE), "t3a": (0.0752, _BURSTABLE), "t4g": (0.0672, _BURSTABLE),
    # General purpose
    "m5": (0.096, _STANDARD), "m5a": (0.086, _STANDARD), "m6i": (0.096, _STANDARD),
    "m6a": (0.0864, _STANDARD), "m6g": (0.077, _STANDARD), "m7i": (0.1008, _STANDARD),
    "m7g": (0.0816, _STANDARD),
    # Compute optimized
    "c5": (0.085, _STANDARD[:4]), "c5a": (0.077, _STANDARD), "c6i": (0.085, _STANDARD),
    "c6a": (0.0765, _STANDARD), "c6g": (0.068, _STANDARD), "c7i": (0.08925, _STANDARD),
    "c7g": (0.0725, _STANDARD),
    # Memory optimized
    "r5": (0.126, _STANDARD), "r6i": (0.126, _STANDARD), "r6g": (0.1008, _STANDARD),
}

#: Instance type -> approximate us-east-1 Linux on-demand USD per hour (see above).
DEFAULT_ON_DEMAND: Mapping[str, float] = {
    f"{family}.{size}": round(large * _SIZES[size], 6)
    for family, (large, sizes) in _FAMILIES.items() for size in sizes
}


def on_demand(instance_type: str,
              configured: Mapping[str, float]) -> tuple[float, str] | None:
    """The on-demand USD per hour of ``instance_type`` and where it comes from: the
    operator's ``configured`` prices first, then the default table; None if neither
    has it."""
    if instance_type in configured:
        return float(configured[instance_type]), "configured"
    if instance_type in DEFAULT_ON_DEMAND:
        return DEFAULT_ON_DEMAND[instance_type], SOURCE
    return None
