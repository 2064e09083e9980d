"""Force N builds at once from a process of its own (``bench.burst`` starts it ahead
and says "go"): the local cloud's EC2 emulation runs in the bench's process, and a
client sharing that process's interpreter would measure moto's work as the master's.

    python -m bench.force API_URL BUILDERID N     # then a line on stdin; prints JSON
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import sys
import time

import requests


def force(api: str, builderid: int) -> int:
    for attempt in range(5):
        try:
            response = requests.post(
                f"{api}/forceschedulers/force",
                json={"jsonrpc": "2.0", "method": "force", "id": 1,
                      "params": {"builderid": str(builderid)}},
                timeout=120)
            response.raise_for_status()
            _, brids = response.json()["result"]
            return int(next(iter(brids.values())))
        except requests.RequestException:
            if attempt == 4:
                raise
            time.sleep(2)
    raise AssertionError("unreachable")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.force",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("api", metavar="API_URL", help="the master's REST API, .../api/v2")
    parser.add_argument("builderid", metavar="BUILDERID", type=int)
    parser.add_argument("count", metavar="N", type=int, help="builds to force at once, "
                        "after a line on stdin; prints their request ids as JSON")
    args = parser.parse_args()
    api, builderid, count = args.api, args.builderid, args.count
    sys.stdin.readline()
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        brids = list(pool.map(lambda _: force(api, builderid), range(count)))
    print(json.dumps({"brids": brids, "seconds": time.monotonic() - started}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
