"""Used by dev/demo: force a build through the REST API, wait, and show what happened."""

from __future__ import annotations

import base64
import json
import os
import sys
import time
import urllib.request
from typing import Any

import boto3

RESULTS = ["SUCCESS", "WARNINGS", "FAILURE", "SKIPPED", "EXCEPTION", "RETRY", "CANCELLED"]


#: Keeps the web session cookie: master.cfg.example lets only a logged-in admin force.
_opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())


def _login(base_url: str, user: str, password: str) -> None:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    request = urllib.request.Request(f"{base_url}/auth/login",
                                     headers={"Authorization": f"Basic {token}"})
    with _opener.open(request, timeout=10):
        pass


def _get(api: str, path: str) -> Any:
    with _opener.open(f"{api}/{path}", timeout=10) as response:
        body = json.load(response)
    return body[next(k for k in body if k != "meta")]


def _post(url: str, payload: dict) -> Any:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    with _opener.open(request, timeout=10) as response:
        return json.load(response)


def main(base_url: str, builder: str, endpoint_url: str) -> int:
    api = f"{base_url}/api/v2"
    password = os.environ.get("BUILDBOT_ADMIN_PASSWORD")
    if password:
        _login(base_url, "admin", password)
    builderid = next(b["builderid"] for b in _get(api, "builders") if b["name"] == builder)
    answer = _post(f"{api}/forceschedulers/force", {
        "jsonrpc": "2.0", "method": "force", "id": 1, "params": {"builderid": str(builderid)},
    })
    brid = next(iter(answer["result"][1].values()))
    started = time.monotonic()
    while not _get(api, f"buildrequests/{brid}")[0]["complete"]:
        if time.monotonic() - started > 300:
            print("the build did not finish within 5 minutes", file=sys.stderr)
            return 1
        time.sleep(0.5)
    build = _get(api, f"builds?buildrequestid={brid}")[-1]
    worker = _get(api, f"workers/{build['workerid']}")[0]["name"]
    print(f"build {build['number']} on worker {worker}: {RESULTS[build['results']]} "
          f"after {time.monotonic() - started:.1f}s")
    for step in _get(api, f"builds/{build['buildid']}/steps"):
        for log in _get(api, f"steps/{step['stepid']}/logs"):
            if log["name"] == "stdio" and step["name"] == "hello":
                url = f"{api}/logs/{log['logid']}/raw"
                with _opener.open(url, timeout=10) as response:
                    lines = response.read().decode().splitlines()
                output = [line for line in lines if line.startswith("building as")]
                print(f"  step {step['name']} printed: {output[0] if output else lines[-1:]}")
    ec2 = boto3.client("ec2", endpoint_url=endpoint_url)
    for reservation in ec2.describe_instances()["Reservations"]:
        for instance in reservation["Instances"]:
            tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
            print(f"  instance {instance['InstanceId']} ({instance['InstanceType']}) "
                  f"{instance['State']['Name']}, worker={tags.get('buildbot:worker')}, "
                  f"master={tags.get('buildbot:master')}")
    return 0 if build["results"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
