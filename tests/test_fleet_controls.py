"""Fleet controls (pre-warm, terminate, terminate orphan, pool settings) obey the
master's authz, refuse anonymous users unless the operator opts in, and answer hostile
bodies with a 4xx: a real master with users and roles, the local cloud, real workers."""

from __future__ import annotations

import json
import shutil

import pytest
import requests

from buildbot_dockerami.www.jsonapi import QUOTE_CHARS
from tests.harness import REPO, master_cfg, wait_for
from tests.helpers import instances, state_of

pytestmark = pytest.mark.integration

def config_with_authz(**kwargs) -> str:
    return master_cfg(plugins={"dockerami": {}}, users=True, **kwargs)


def session(master, user: str | None = None, password: str = "") -> requests.Session:
    s = requests.Session()
    if user is not None:
        s.get(f"http://127.0.0.1:{master.www_port}/auth/login", auth=(user, password),
              timeout=10).raise_for_status()
    return s


def post(s: requests.Session, master, **body) -> requests.Response:
    return master.control(s, **body)


def fleet(s: requests.Session, master) -> dict:
    return master.fleet(s)


def test_prewarm_and_terminate_need_the_worker_control_role(make_master, cloud):
    master = make_master(config_with_authz(build_wait_timeout=600))
    for who in (session(master), session(master, "viewer", "viewerpw")):
        for action in ("prewarm", "terminate"):
            response = post(who, master, action=action, worker="w0")
            assert response.status_code == 403, response.text
    assert instances(cloud) == [], "a refused control launched an instance"

    admin = session(master, "admin", "adminpw")
    assert post(admin, master, action="prewarm", worker="w0").status_code == 200
    wait_for(lambda: fleet(admin, master)["workers"][0]["state"] == "connected", 60,
             "the pre-warmed worker to connect without any build")
    assert post(admin, master, action="prewarm", worker="w0").status_code == 409
    (instance,) = instances(cloud)

    assert post(session(master), master, action="terminate", worker="w0").status_code == 403
    assert state_of(cloud, instance["InstanceId"]) == "running"
    # The page sends the instance it showed: another one by now is refused, untouched.
    stale = post(admin, master, action="terminate", worker="w0",
                 instance_id="i-0123456789abcdef0")
    assert stale.status_code == 409, stale.text
    assert f"runs on {instance['InstanceId']} now" in stale.json()["error"]
    assert state_of(cloud, instance["InstanceId"]) == "running"
    assert post(admin, master, action="terminate", worker="w0",
                instance_id=instance["InstanceId"]).status_code == 200
    assert state_of(cloud, instance["InstanceId"]) in ("shutting-down", "terminated")
    assert fleet(admin, master)["workers"][0]["state"] == "not running"
    gone = post(admin, master, action="terminate", worker="w0",
                instance_id=instance["InstanceId"])
    assert gone.status_code == 409 and "is gone" in gone.json()["error"], gone.text
    assert post(admin, master, action="terminate", worker="w0",
                instance_id=["i-1"]).status_code == 400
    assert post(admin, master, action="terminate", worker="nope").status_code == 404


def test_prewarmed_instance_without_builds_ends_after_the_idle_timeout(make_master, cloud):
    master = make_master(config_with_authz(build_wait_timeout=3))
    admin = session(master, "admin", "adminpw")
    assert post(admin, master, action="prewarm", worker="w0").status_code == 200
    (instance,) = wait_for(lambda: instances(cloud), 30, "the pre-warmed instance")
    wait_for(lambda: state_of(cloud, instance["InstanceId"]) == "terminated", 30,
             "the unused pre-warmed instance to be terminated")


def test_orphans_can_be_terminated_only_by_controllers_and_only_if_orphaned(
        make_master, cloud):
    master = make_master(config_with_authz(build_wait_timeout=600,
                                           worker_extra="reconcile_interval=5,"))
    admin = session(master, "admin", "adminpw")
    master_id = fleet(admin, master)["master_id"]
    ec2 = cloud.client()

    def launch(tag_value: str) -> str:
        return ec2.run_instances(
            ImageId=cloud.base_ami_id, MinCount=1, MaxCount=1, InstanceType="t3.nano",
            TagSpecifications=[{"ResourceType": "instance", "Tags": [
                {"Key": "buildbot:master", "Value": tag_value}]}],
        )["Instances"][0]["InstanceId"]

    ours, theirs = launch(master_id), launch("another-master-0123456789")
    # Listed from the reconciler's next pass; it would end it one pass later by itself.
    listed = wait_for(lambda: fleet(admin, master)["orphans"], 10, "the orphan to be listed")
    assert [o["id"] for o in listed] == [ours]
    refused = post(session(master), master, action="terminate_orphan", instance_id=ours)
    assert refused.status_code == 403 and state_of(cloud, ours) == "running"
    other = post(admin, master, action="terminate_orphan", instance_id=theirs)
    assert other.status_code == 409 and state_of(cloud, theirs) == "running"
    assert post(admin, master, action="terminate_orphan", instance_id=ours).status_code == 200
    assert state_of(cloud, ours) in ("shutting-down", "terminated")


def test_controls_want_json(make_master, cloud):
    master = make_master(config_with_authz())
    # A logged-in user's browser (a cross-site form, say) must send JSON.
    form = session(master, "admin", "adminpw").post(
        master.plugin_url("api/control"), data={"action": "prewarm", "worker": "w0"},
        timeout=10)
    assert form.status_code == 415
    # An anonymous visitor is refused before anything of the request is looked at
    # (`curl -X POST -d x`: a form body, docs/security.md).
    for anonymous in (requests.post(master.plugin_url("api/control"), data="x", timeout=10),
                      requests.post(master.plugin_url("api/control"), data="x" * 300_000,
                                    timeout=10)):
        assert anonymous.status_code == 403, anonymous.text
        assert "log in first" in anonymous.json()["error"]
    assert instances(cloud) == []


def test_pool_settings_need_the_control_role(make_master, cloud):
    master = make_master(config_with_authz(pool="'pool', count=2"))
    viewer = session(master, "viewer", "viewerpw")
    for who in (session(master), viewer):
        assert post(who, master, action="set_pool", pool="pool", cap=1).status_code == 403
    assert fleet(viewer, master)["pools"]["pool"]["cap"] is None
    admin = session(master, "admin", "adminpw")
    assert post(admin, master, action="set_pool", pool="pool", cap=1).status_code == 200
    assert fleet(admin, master)["pools"]["pool"]["cap"] == 1


def test_fleet_page_reports_why_a_launch_failed(make_master, cloud):
    cloud.faults.inject("RunInstances", "InsufficientInstanceCapacity",
                        "No t3.micro capacity in us-east-1a.", count=1)
    master = make_master(config_with_authz(build_wait_timeout=600))
    admin = session(master, "admin", "adminpw")
    assert post(admin, master, action="prewarm", worker="w0").status_code == 200
    row = wait_for(lambda: (w := fleet(admin, master)["workers"][0])["last_failure"] and w, 30,
                   "the failure to be reported")
    assert "InsufficientInstanceCapacity: No t3.micro capacity" in row["last_failure"]
    assert row["state"] in ("quarantine", "not running")


# -- issue 9: controls refused unless allowed on purpose; hostile bodies get a 4xx ------


def test_shipped_example_refuses_anonymous_control(make_master, cloud):
    master = make_master("", start=False)
    shutil.copy(REPO / "master.cfg.example", master.basedir / "master.cfg")
    master.env["BUILDBOT_ADMIN_PASSWORD"] = "example-admin-pw"
    master.start()
    anonymous = session(master)
    for body in ({"action": "prewarm", "worker": "linux-1"},
                 {"action": "terminate", "worker": "linux-1"},
                 {"action": "terminate_orphan", "instance_id": "i-0123456789abcdef0"},
                 {"action": "set_pool", "pool": "isolated", "cap": 200}):
        response = post(anonymous, master, **body)
        assert response.status_code == 403, (body, response.text)
        assert "log in first" in response.json()["error"]
    # buildbot's own controls too: forcing a build needs the admins role.
    force = anonymous.post(f"{master.api}/forceschedulers/force", json={
        "jsonrpc": "2.0", "method": "force", "id": 1, "params": {"builderid": "1"}}, timeout=10)
    assert force.status_code >= 400 or "error" in force.json(), force.text
    assert instances(cloud) == [], "an anonymous control launched an instance"
    # A wrong password does not log in.
    wrong = requests.get(f"http://127.0.0.1:{master.www_port}/auth/login",
                         auth=("admin", "change-me"), timeout=10)
    assert wrong.status_code == 401

    admin = session(master, "admin", "example-admin-pw")
    assert post(admin, master, action="prewarm", worker="linux-1").status_code == 200
    (instance,) = wait_for(lambda: instances(cloud), 30, "the admin's pre-warmed instance")
    # EC2 lists it as soon as it launched; the master knows it once the answer is in.
    wait_for(lambda: any(w["name"] == "linux-1" and w["instance"]
                         for w in fleet(admin, master)["workers"]), 30,
             "the master to know its pre-warmed instance")
    assert post(admin, master, action="terminate", worker="linux-1").status_code == 200
    assert state_of(cloud, instance["InstanceId"]) in ("shutting-down", "terminated")
    assert master.stop()


def test_without_auth_controls_need_the_explicit_opt_in(make_master, cloud):
    # buildbot's default authz lets anyone act; the plugin's controls still refuse.
    master = make_master(master_cfg(pool="'pool', count=2", plugins={"dockerami": {}}))
    anonymous = session(master)
    assert post(anonymous, master, action="prewarm", worker="pool-1").status_code == 403
    assert post(anonymous, master, action="set_pool", pool="pool", cap=5).status_code == 403
    assert fleet(anonymous, master)["pools"]["pool"]["cap"] is None
    assert instances(cloud) == []
    assert master.stop()

    for opt_in in ("yes", 1):  # only True opens them
        config = master_cfg(plugins={"dockerami": {"anonymous_control": opt_in}})
        master = make_master(config)
        assert post(session(master), master, action="prewarm", worker="w0").status_code == 403
        assert master.stop()

    master = make_master(master_cfg(pool="'pool', count=2",
                                    plugins={"dockerami": {"anonymous_control": True}}))
    anonymous = session(master)
    assert post(anonymous, master, action="set_pool", pool="pool", cap=1).status_code == 200
    assert fleet(anonymous, master)["pools"]["pool"]["cap"] == 1
    assert post(anonymous, master, action="prewarm", worker="pool-1").status_code == 200
    wait_for(lambda: instances(cloud), 30, "the anonymously pre-warmed instance")
    assert master.stop()


def test_opt_in_still_obeys_authz(make_master, cloud):
    # anonymous_control lifts the log-in requirement, not the operator's authz rules.
    master = make_master(master_cfg(plugins={"dockerami": {"anonymous_control": True}},
                                    users=True))
    assert post(session(master), master, action="prewarm", worker="w0").status_code == 403
    viewer = session(master, "viewer", "viewerpw")
    assert post(viewer, master, action="prewarm", worker="w0").status_code == 403
    assert instances(cloud) == []
    admin = session(master, "admin", "adminpw")
    assert post(admin, master, action="prewarm", worker="w0").status_code == 200
    assert master.stop()


MARK = "Zq9Zq9"  # in every hostile body: never echoed back beyond a short quote
DEEP_ARRAY = b"[" * 100_000 + b"]" * 100_000
DEEP_OBJECT = b'{"a":' * 30_000 + b"1" + b"}" * 30_000  # 180 KB, under the size limit

HOSTILE = [
    # (body: bytes or a JSON-able object, expected status)
    (b"not json " + MARK.encode(), 400),
    (DEEP_ARRAY, 400),
    (DEEP_OBJECT, 400),
    (b'{"action": "prewarm", "worker": "\xff' + MARK.encode() + b'"}', 400),
    (b"\xff\xfe\x00" + MARK.encode(), 400),
    (b'{"action": "set_pool", "pool": "pool", "cap": ' + b"9" * 5000 + b"}", 400),
    (b'{"action": "set_pool", "pool": "pool", "cap": 1e400}', 400),
    (b'{"action": "set_pool", "pool": "pool", "cap": NaN}', 400),
    (b"", 400),
    ([MARK], 400), (None, 400), (3, 400), (MARK, 400),
    ({"action": 5}, 400),
    ({"action": MARK * 2000}, 400),
    ({"action": ["prewarm"]}, 400),
    ({"action": "prewarm"}, 400),
    ({"action": "prewarm", "worker": [MARK]}, 400),
    ({"action": "prewarm", "worker": {MARK: 1}}, 400),
    ({"action": "prewarm", "worker": MARK * 2000}, 404),
    ({"action": "terminate", "worker": 5}, 400),
    ({"action": "terminate_orphan", "instance_id": 5}, 400),
    ({"action": "terminate_orphan", "instance_id": "i-" + MARK}, 400),
    ({"action": "terminate_orphan", "instance_id": [MARK] * 1000}, 400),
    ({"action": "set_pool", "pool": [MARK]}, 400),
    ({"action": "set_pool", "pool": {MARK: 1}}, 400),
    ({"action": "set_pool", "pool": MARK * 2000, "cap": 1}, 404),
    ({"action": "set_pool", "pool": "pool", "cap": "3"}, 400),
    ({"action": "set_pool", "pool": "pool", "cap": 1.5}, 400),
    ({"action": "set_pool", "pool": "pool", "cap": True}, 400),
    ({"action": "set_pool", "pool": "pool", "cap": 10**6}, 400),
    ({"action": "set_pool", "pool": "pool", "cap": [1]}, 400),
    ({"action": "set_pool", "pool": "pool", "min_warm": -1}, 400),
    ({"action": "set_pool", "pool": "pool", "min_warm": {MARK: 1}}, 400),
    ({"action": "set_pool", "pool": "pool", "cap": 1, "min_warm": 2}, 400),
    ({"action": "x", "pad": MARK * 30_000}, 400),  # 180 KB: under the size limit
    ({"action": "x", "pad": MARK * 1_000_000}, 413),  # 6 MB
    (b'"' + MARK.encode() * 50_000 + b'"', 413),
]


def _send(s: requests.Session, master, body) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return s.post(master.plugin_url("api/control"), data=data,
                  headers={"Content-Type": "application/json"}, timeout=60)


def test_hostile_bodies_get_a_4xx_and_are_not_echoed(make_master, cloud):
    master = make_master(master_cfg(pool="'pool', count=2", plugins={"dockerami": {}},
                                    users=True))
    admin = session(master, "admin", "adminpw")
    for body, status in HOSTILE:
        response = _send(admin, master, body)
        shown = repr(body)[:80]
        assert response.status_code == status, (shown, response.status_code, response.text)
        assert len(response.content) < 300, (shown, response.text[:300])
        # At most a short quote of the input comes back.
        assert response.text.count(MARK) * len(MARK) <= QUOTE_CHARS, (shown, response.text)
        assert "error" in response.json()
    # Anonymous hostile bodies are refused before they are even parsed.
    assert _send(session(master), master, DEEP_ARRAY).status_code == 403
    form = admin.post(master.plugin_url("api/control"), data={"a": MARK},
                      timeout=10)
    assert form.status_code == 415
    # Nothing changed, nothing launched, and no answer was a 500 (none logged).
    assert fleet(admin, master)["pools"]["pool"] == {
        "cap": None, "min_warm": 0, "instances": 0, "idle": 0}
    assert instances(cloud) == []
    assert "dockerami: fleet control" not in master.log()
    assert master.stop()


def test_hostile_bodies_with_the_anonymous_opt_in(make_master, cloud):
    master = make_master(master_cfg(plugins={"dockerami": {"anonymous_control": True}}))
    anonymous = session(master)
    for body, status in ((DEEP_ARRAY, 400), (DEEP_OBJECT, 400),
                         ({"action": "set_pool", "pool": [MARK]}, 400),
                         ({"action": "set_pool", "pool": {"a": 1}}, 400),
                         ({"action": "x" * 100_000}, 400)):
        response = _send(anonymous, master, body)
        assert response.status_code == status, (repr(body)[:80], response.text[:300])
        assert len(response.content) < 300
    assert "dockerami: fleet control" not in master.log()
    assert master.stop()


def test_parse_and_quote_never_raise_anything_but_a_400():
    from buildbot_dockerami.www.jsonapi import ApiError, parse_object, quote

    nested: object = None
    for _ in range(5000):
        nested = [nested]
    assert quote(nested) == "<deeply nested list>"
    assert quote("x" * 1000).endswith("...") and len(quote("x" * 1000)) == QUOTE_CHARS
    for raw in (DEEP_ARRAY, DEEP_OBJECT, b"\xff", b"[]", b"1e999999", b"9" * 5000, b"{"):
        with pytest.raises(ApiError) as info:
            parse_object(raw)
        assert info.value.status == 400
    assert parse_object(b"") == {} and parse_object(b'{"a": 1}') == {"a": 1}
