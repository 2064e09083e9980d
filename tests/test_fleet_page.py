"""The Fleet page in buildbot's web UI, in a real browser: Debian's chromium driven by
Playwright (no browser download). Screenshots go to test-artifacts/."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest
import requests

from tests.harness import REPO, SUCCESS, master_cfg

pytestmark = pytest.mark.integration

CHROMIUM = os.environ.get("DOCKERAMI_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None or not shutil.which(CHROMIUM):
        why = "playwright or chromium is missing (dev/browser installs chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {why}")
        pytest.skip(f"NO BROWSER: {why}")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"],
        )
        yield browser
        browser.close()


def test_fleet_page_shows_the_instance_a_build_booted(make_master, cloud, browser):
    config = master_cfg(build_wait_timeout=600, workers=1).replace(
        "'plugins': {}", "'plugins': {'dockerami': {'prices': {'t3.micro': 0.0104}}}")
    master = make_master(config)
    assert master.wait_request(master.force(), 90)["results"] == SUCCESS
    (reservation,) = cloud.client().describe_instances()["Reservations"]
    instance_id = reservation["Instances"][0]["InstanceId"]

    page = browser.new_page(viewport={"width": 1600, "height": 900})
    try:
        page.goto(f"http://127.0.0.1:{master.www_port}/#/dockerami")
        row = page.locator("tr[data-worker='w0']")
        row.locator(".dockerami-state", has_text="connected").wait_for(timeout=30_000)
        assert row.locator(".dockerami-instance").inner_text() == instance_id
        assert "worker connected" in row.locator(".dockerami-timeline").inner_text()
        assert page.get_by_text("Fleet", exact=True).first.is_visible()  # the menu entry
        page.locator(".dockerami-no-orphans").wait_for()
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "fleet-page.png"), full_page=True)
    finally:
        page.close()


AUTHZ = """
c['www']['auth'] = util.UserPasswordAuth({'admin': 'adminpw'})
c['www']['authz'] = util.Authz(
    allowRules=[util.AnyControlEndpointMatcher(role='admins')],
    roleMatchers=[util.RolesFromUsername(roles=['admins'], usernames=['admin'])],
)
"""


def test_prewarm_and_terminate_clicks_and_refusal_for_anonymous(make_master, cloud, browser):
    config = master_cfg(build_wait_timeout=600).replace(
        "'plugins': {}", "'plugins': {'dockerami': {}}") + AUTHZ
    master = make_master(config)
    base = f"http://127.0.0.1:{master.www_port}"
    ARTIFACTS.mkdir(exist_ok=True)

    anonymous = browser.new_page(viewport={"width": 1600, "height": 900})
    try:
        anonymous.goto(f"{base}/#/dockerami")
        anonymous.locator("tr[data-worker='w0'] .dockerami-prewarm").click()
        anonymous.locator(".dockerami-outcome", has_text="not authorized").wait_for()
        anonymous.screenshot(path=str(ARTIFACTS / "fleet-refused.png"), full_page=True)
    finally:
        anonymous.close()
    assert cloud.client().describe_instances()["Reservations"] == []

    context = browser.new_context(http_credentials={"username": "admin", "password": "adminpw"})
    admin = context.new_page()
    admin.set_viewport_size({"width": 1600, "height": 900})
    try:
        admin.goto(f"{base}/auth/login")
        admin.goto(f"{base}/#/dockerami")
        row = admin.locator("tr[data-worker='w0']")
        row.locator(".dockerami-prewarm").click()
        row.locator(".dockerami-state", has_text="connected").wait_for(timeout=60_000)
        admin.screenshot(path=str(ARTIFACTS / "fleet-prewarmed.png"), full_page=True)
        instance_id = row.locator(".dockerami-instance").inner_text()
        row.locator(".dockerami-terminate").click()
        row.locator(".dockerami-state", has_text="not running").wait_for(timeout=30_000)
    finally:
        context.close()
    (reservation,) = cloud.client().describe_instances()["Reservations"]
    assert reservation["Instances"][0]["InstanceId"] == instance_id
    assert reservation["Instances"][0]["State"]["Name"] in ("shutting-down", "terminated")


def test_pool_cap_set_from_the_page(make_master, cloud, browser):
    config = master_cfg(pool="'pool', count=2").replace(  # anonymous, opted in
        "'plugins': {}", "'plugins': {'dockerami': {'anonymous_control': True}}")
    master = make_master(config)
    page = browser.new_page(viewport={"width": 1600, "height": 900})
    try:
        page.goto(f"http://127.0.0.1:{master.www_port}/#/dockerami")
        row = page.locator("tr[data-pool='pool']")
        row.locator(".dockerami-cap").fill("1")
        row.locator(".dockerami-apply-pool").click()
        page.locator(".dockerami-outcome", has_text="pool pool: cap 1").wait_for()
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "fleet-pools.png"), full_page=True)
    finally:
        page.close()
    fleet = requests.get(f"http://127.0.0.1:{master.www_port}/plugins/dockerami/api/fleet",
                         timeout=10).json()
    assert fleet["pools"]["pool"]["cap"] == 1
