"""Fleet controls (pre-warm, terminate, terminate orphan) obey the master's authz:
a real master with users and roles, the local cloud, real workers."""

from __future__ import annotations

import pytest
import requests

from tests.harness import master_cfg, wait_for
from tests.test_ec2_worker import instances, state_of

pytestmark = pytest.mark.integration

AUTHZ = """
c['www']['auth'] = util.UserPasswordAuth({'admin': 'adminpw', 'viewer': 'viewerpw'})
c['www']['authz'] = util.Authz(
    allowRules=[util.AnyControlEndpointMatcher(role='admins')],
    roleMatchers=[util.RolesFromUsername(roles=['admins'], usernames=['admin'])],
)
"""


def config_with_authz(**kwargs) -> str:
    return master_cfg(**kwargs).replace("'plugins': {}", "'plugins': {'dockerami': {}}") + AUTHZ


def session(master, user: str | None = None, password: str = "") -> requests.Session:
    s = requests.Session()
    if user is not None:
        s.get(f"http://127.0.0.1:{master.www_port}/auth/login", auth=(user, password),
              timeout=10).raise_for_status()
    return s


def post(s: requests.Session, master, **body) -> requests.Response:
    return s.post(f"http://127.0.0.1:{master.www_port}/plugins/dockerami/api/control",
                  json=body, timeout=30)


def fleet(s: requests.Session, master) -> dict:
    url = f"http://127.0.0.1:{master.www_port}/plugins/dockerami/api/fleet"
    return s.get(url, timeout=10).json()


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
    assert post(admin, master, action="terminate", worker="w0").status_code == 200
    assert state_of(cloud, instance["InstanceId"]) in ("shutting-down", "terminated")
    assert fleet(admin, master)["workers"][0]["state"] == "not running"
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
    url = f"http://127.0.0.1:{master.www_port}/plugins/dockerami/api/control"
    form = requests.post(url, data={"action": "prewarm", "worker": "w0"}, timeout=10)
    assert form.status_code == 415


def test_pool_settings_need_the_control_role(make_master, cloud):
    config = master_cfg(pool="'pool', count=2").replace(
        "'plugins': {}", "'plugins': {'dockerami': {}}") + AUTHZ
    master = make_master(config)
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
