"""Fleet controls from the Fleet page: start a worker now, terminate its instance,
terminate an orphan, set a pool's cap and warm minimum.

A control needs a logged-in user (anonymous visitors are refused even where buildbot's
``authz`` would let them act, unless the plugin setting ``anonymous_control`` is True),
and that user must be allowed by ``authz`` to control the worker (the Workers page's
Stop). Others get 403 and nothing changes. The body is untrusted: it is size-limited,
parsed defensively, type-checked, and quoted back only in short pieces.
"""

from __future__ import annotations

import re
from typing import Any

from buildbot.www.authz.authz import Forbidden
from twisted.internet import defer
from twisted.python import log
from twisted.web.error import Error as WwwError

from buildbot_dockerami.fleet import pools
from buildbot_dockerami.fleet.service import Fleet
from buildbot_dockerami.www.jsonapi import (
    ApiError,
    AppResource,
    answer,
    body_size,
    parse_object,
    quote,
)
from buildbot_dockerami.www.status import orphans

#: Larger bodies are refused with 413, unread. Controls are a few short fields; the
#: limit still lets a 100k-deep JSON nesting through to be refused as bad JSON (400).
MAX_BODY_BYTES = 256 * 1024
#: The plugin setting that lets anonymous visitors use the controls (authz still applies).
ANONYMOUS_CONTROL = "anonymous_control"
#: Highest cap or warm minimum a pool accepts.
MAX_POOL_LIMIT = 10_000
_INSTANCE_ID = re.compile(r"^i-[0-9a-f]{8,17}$")


def _string(body: dict[str, Any], field: str) -> str:
    value = body.get(field)
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"{field} must be a non-empty string, not {quote(value)}")
    return value


def _worker(fleet: Fleet, body: dict[str, Any]) -> Any:
    name = _string(body, "worker")
    worker = next((w for w in list(fleet.workers) if w.name == name), None)
    if worker is None:
        raise ApiError(404, f"no DockerAMILatentWorker named {quote(name)}")
    return worker


def anonymous_allowed(plugin_config: Any) -> bool:
    """Only an explicit ``True`` opens the controls to visitors who are not logged in."""
    return isinstance(plugin_config, dict) and plugin_config.get(ANONYMOUS_CONTROL) is True


@defer.inlineCallbacks
def _logged_in(master: Any, request: Any, plugin_config: Any) -> Any:
    """A logged-in user (or the operator's opt-in), before the body is even parsed."""
    if anonymous_allowed(plugin_config):
        return
    try:  # as buildbot's own API does: a reverse proxy's user header logs in here
        yield master.www.auth.maybeAutoLogin(request)
    except WwwError as e:  # its message quotes the header: not echoed
        raise ApiError(403, "not authorized: no valid user from the reverse proxy") from e
    user = master.www.getUserInfos(request) or {}
    if user.get("anonymous") or not user.get("username"):
        raise ApiError(403, "not authorized: log in first (anonymous control is off; see "
                            f"the plugin setting {ANONYMOUS_CONTROL!r})")


@defer.inlineCallbacks
def may_control(master: Any, request: Any, plugin_config: Any) -> Any:
    """Whether this request's user may use the controls at all (logged in, or the
    opt-in, and allowed by authz to control workers): the page shows them only then.
    Each control still checks its own worker when it is used."""
    try:
        yield _logged_in(master, request, plugin_config)
        yield _allowed(master, request, None)
    except ApiError:
        return False
    return True


def _refuse_foreign(fleet: Fleet, instance_id: Any) -> None:
    """Another master's instance is that master's to act on: it tracks its workers and
    builds, and two masters must never act on one instance."""
    if not instance_id or fleet.shared is None:
        return
    row = next((r for r in fleet.shared.view() if r["instance_id"] == instance_id), None)
    if row is not None and not row["here"]:
        dead = "" if row["master_active"] else " (inactive: a live master reclaims it)"
        raise ApiError(409, f"{instance_id} belongs to master {row['master']}{dead}; only "
                            "its own master acts on it: use that master's Fleet page")


def _refuse_another_instance(worker: Any, shown: str | None) -> None:
    """The operator acts on the instance the page showed: if the worker's instance is
    another one by now (the old one idled out, a new one took a build), the click would
    end that build. Without ``instance_id`` (API callers of old), the current one."""
    current = worker.instance.instance_id if worker.instance is not None else None
    if current is None:
        gone = f" ({shown} is gone)" if shown else ""
        raise ApiError(409, f"{worker.name} has no instance{gone}")
    if shown and shown != current:
        raise ApiError(409, f"{worker.name} runs on {current} now, not on {shown}: "
                            "nothing was terminated; look again before acting")


@defer.inlineCallbacks
def _allowed(master: Any, request: Any, worker: Any | None) -> Any:
    endpoint = ("workers", str(worker.workerid)) if worker is not None else ("workers",)
    try:
        yield master.www.assertUserAllowed(request, endpoint, "stop", {})
    except Forbidden as e:
        raise ApiError(403, f"not authorized: {e}") from e


@defer.inlineCallbacks
def control(master: Any, request: Any, body: dict[str, Any]) -> Any:
    fleet = Fleet.of(master)
    action = body.get("action")
    if action == "prewarm":
        worker = _worker(fleet, body)
        yield _allowed(master, request, worker)
        if not (yield pools.reserve(worker)):
            raise ApiError(409, f"{worker.name}: pool {worker.pool} is at its cap "
                                "(counting every master's instances)")
        if not worker.prewarm():
            raise ApiError(409, f"{worker.name} is already running or paused")
        return {"ok": True, "message": f"{worker.name}: starting an instance"}
    if action == "terminate":
        worker = _worker(fleet, body)
        shown = body.get("instance_id")
        if shown is not None and not (isinstance(shown, str) and _INSTANCE_ID.match(shown)):
            raise ApiError(400, f"{quote(shown)} is not an instance id (i-...)")
        yield _allowed(master, request, worker)
        _refuse_foreign(fleet, shown)
        _refuse_another_instance(worker, shown)
        yield worker.shutdown()
        return {"ok": True, "message": f"{worker.name}: instance terminated"}
    if action == "terminate_orphan":
        instance_id = _string(body, "instance_id")
        if not _INSTANCE_ID.match(instance_id):
            raise ApiError(400, f"{quote(instance_id)} is not an instance id (i-...)")
        yield _allowed(master, request, None)
        orphan = next((o for o in (yield orphans(fleet)) if o["id"] == instance_id), None)
        if orphan is None:
            # Never another master's machine, nor one a worker still owns.
            raise ApiError(409, f"{instance_id!r} is not an orphan of this master")
        state = yield fleet.terminate(orphan["client"], instance_id)
        return {"ok": True, "message": f"{instance_id} is {state}"}
    if action == "set_pool":
        pool = _string(body, "pool")
        limits = _pool_limits(body)
        yield _allowed(master, request, None)
        if pool not in fleet.pool_limits:
            raise ApiError(404, f"no pool named {quote(pool)}")
        if limits.min_warm == 0 and pool not in fleet.warm_schedules:
            # Nothing to override: a minimum configured later is not overridden by it.
            limits.min_warm = None
        yield pools.save_limits(master, pool, limits)
        fleet.pool_limits[pool] = limits
        fleet.after_release()  # a raised cap lets waiting builds start now
        if fleet.keeper is not None and (fleet.shared is None or fleet.shared.leads()):
            fleet.keeper.tick().addErrback(log.err, "dockerami: keeping pools warm")
        warm = (limits.min_warm if limits.min_warm is not None
                else "as configured" if pool in fleet.warm_schedules else 0)
        return {"ok": True, "message": f"pool {pool}: cap {limits.cap}, warm minimum {warm}"}
    raise ApiError(400, f"unknown action {quote(action)}")


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_POOL_LIMIT


def _pool_limits(body: dict[str, Any]) -> pools.PoolLimits:
    """``min_warm``: a number overrides the configured warm minimum; null (or left out)
    follows it (worker_pool's min_warm; none configured: 0)."""
    cap, min_warm = body.get("cap"), body.get("min_warm")
    if cap is not None and not _whole(cap):
        raise ApiError(400, f"cap must be a whole number 0-{MAX_POOL_LIMIT}, or null for no cap")
    if min_warm is not None and not _whole(min_warm):
        raise ApiError(400, f"min_warm must be a whole number 0-{MAX_POOL_LIMIT}, or null "
                            "to follow the configured warm minimum")
    if cap is not None and min_warm is not None and min_warm > cap:
        raise ApiError(400, f"min_warm ({min_warm}) cannot exceed the cap ({cap})")
    return pools.PoolLimits(cap=cap, min_warm=min_warm)


@defer.inlineCallbacks
def _handle(app: Any, request: Any) -> Any:
    # Who asks comes first: an anonymous visitor learns nothing of the body's checks.
    yield _logged_in(app.master, request, app.config)
    if body_size(request) > MAX_BODY_BYTES:
        raise ApiError(413, f"body larger than {MAX_BODY_BYTES} bytes")
    # JSON only: a cross-site form cannot send it without a CORS preflight.
    if not (request.getHeader(b"content-type") or b"").startswith(b"application/json"):
        raise ApiError(415, "send application/json")
    body = parse_object(request.content.read(MAX_BODY_BYTES + 1))
    result = yield control(app.master, request, body)
    return result


class ControlResource(AppResource):
    def render_POST(self, request: Any) -> Any:
        return answer(request, _handle(self.app, request), "fleet control")
