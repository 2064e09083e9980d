"""Fleet controls from the Fleet page: start a worker now, terminate its instance,
terminate an orphan, set a pool's cap and warm minimum. Each is allowed to exactly
the users buildbot's ``authz`` lets control that worker (the Workers page's Stop);
others get 403 and nothing changes."""

from __future__ import annotations

import json
from typing import Any

from buildbot.www.authz.authz import Forbidden
from twisted.internet import defer
from twisted.web import server

from buildbot_dockerami import pools
from buildbot_dockerami.fleet import Fleet
from buildbot_dockerami.www.jsonapi import ApiError, AppResource, answer, reply
from buildbot_dockerami.www.status import orphans


def _worker(fleet: Fleet, name: Any) -> Any:
    worker = next((w for w in list(fleet.workers) if w.name == name), None)
    if worker is None:
        raise ApiError(404, f"no DockerAMILatentWorker named {name!r}")
    return worker


@defer.inlineCallbacks
def _allowed(master: Any, request: Any, worker: Any | None) -> Any:
    endpoint = ("workers", str(worker.workerid)) if worker is not None else ("workers",)
    try:
        yield master.www.assertUserAllowed(request, endpoint, "stop", {})
    except Forbidden as e:
        raise ApiError(403, f"not authorized: {e}") from e


@defer.inlineCallbacks
def control(master: Any, request: Any, body: dict[str, Any]) -> Any:
    fleet = Fleet.for_master(master)
    action = body.get("action")
    if action == "prewarm":
        worker = _worker(fleet, body.get("worker"))
        yield _allowed(master, request, worker)
        if not worker.prewarm():
            raise ApiError(409, f"{worker.name} is already running or paused")
        return {"ok": True, "message": f"{worker.name}: starting an instance"}
    if action == "terminate":
        worker = _worker(fleet, body.get("worker"))
        yield _allowed(master, request, worker)
        if worker.instance is None:
            raise ApiError(409, f"{worker.name} has no instance")
        yield worker.shutdown()
        return {"ok": True, "message": f"{worker.name}: instance terminated"}
    if action == "terminate_orphan":
        yield _allowed(master, request, None)
        instance_id = body.get("instance_id")
        orphan = next((o for o in (yield orphans(fleet)) if o["id"] == instance_id), None)
        if orphan is None:
            # Never another master's machine, nor one a worker still owns.
            raise ApiError(409, f"{instance_id!r} is not an orphan of this master")
        state = yield fleet.terminate(orphan["client"], instance_id)
        return {"ok": True, "message": f"{instance_id} is {state}"}
    if action == "set_pool":
        yield _allowed(master, request, None)
        pool = body.get("pool")
        if pool not in fleet.pool_limits:
            raise ApiError(404, f"no pool named {pool!r}")
        limits = _pool_limits(body)
        yield pools.save_limits(master, pool, limits)
        fleet.pool_limits[pool] = limits
        fleet.after_release()  # a raised cap lets waiting builds start now
        if fleet.keeper is not None:
            fleet.keeper.tick()
        return {"ok": True, "message": f"pool {pool}: cap {limits.cap}, "
                                       f"warm minimum {limits.min_warm}"}
    raise ApiError(400, f"unknown action {action!r}")


def _pool_limits(body: dict[str, Any]) -> pools.PoolLimits:
    cap, min_warm = body.get("cap"), body.get("min_warm", 0)
    if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 0):
        raise ApiError(400, "cap must be a whole number >= 0, or null for no cap")
    if not isinstance(min_warm, int) or isinstance(min_warm, bool) or min_warm < 0:
        raise ApiError(400, "min_warm must be a whole number >= 0")
    if cap is not None and min_warm > cap:
        raise ApiError(400, f"min_warm ({min_warm}) cannot exceed the cap ({cap})")
    return pools.PoolLimits(cap=cap, min_warm=min_warm)


class ControlResource(AppResource):
    def render_POST(self, request: Any) -> Any:
        # JSON only: a cross-site form cannot send it without a CORS preflight.
        if not (request.getHeader(b"content-type") or b"").startswith(b"application/json"):
            reply(request, 415, {"error": "send application/json"})
            return server.NOT_DONE_YET
        try:
            body = json.loads(request.content.read() or b"{}")
        except ValueError:
            reply(request, 400, {"error": "body is not JSON"})
            return server.NOT_DONE_YET
        d = control(self.app.master, request, body if isinstance(body, dict) else {})
        return answer(request, d, "fleet control")
