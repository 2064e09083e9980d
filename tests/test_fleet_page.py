"""The Fleet page in buildbot's web UI, in a real browser: Debian's chromium driven by
Playwright (no browser download), in a 1280x800 window. Screenshots go to test-artifacts/."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest

from tests.harness import PLUGIN_PATH, SUCCESS, master_cfg, wait_for
from tests.helpers import ARTIFACTS, VIEWPORT, held_until, instances

pytestmark = pytest.mark.integration

#: Elements that scroll sideways (the page itself, or a box with overflow-x), as the
#: operator would see a horizontal scrollbar.
SIDEWAYS = """() => {
  const found = [];
  const root = document.scrollingElement;
  if (root.scrollWidth > root.clientWidth) found.push("document " + root.scrollWidth);
  for (const el of document.querySelectorAll("*")) {
    const x = getComputedStyle(el).overflowX;
    if ((x === "auto" || x === "scroll") && el.scrollWidth > el.clientWidth + 1)
      found.push(el.tagName + "." + el.className + " " + el.scrollWidth + ">" + el.clientWidth);
  }
  return found;
}"""


def visible_style(page: Any, selector: str) -> dict[str, str]:
    """The button's computed background and border colour."""
    return page.locator(selector).first.evaluate(
        "b => { const s = getComputedStyle(b); return {background: s.backgroundColor,"
        " border: s.borderTopColor, width: s.borderTopWidth}; }")


def is_visible_style(style: dict[str, str]) -> bool:
    clear = ("transparent", "rgba(0, 0, 0, 0)")
    return style["background"] not in clear or (
        style["border"] not in clear and style["width"] != "0px")


def test_fleet_page_shows_the_instance_a_build_booted(make_master, cloud, browser):
    master = make_master(master_cfg(build_wait_timeout=600, workers=1, command="sleep 20",
                                    plugins={"dockerami": {"prices": {"t3.micro": 0.0104},
                                                           "anonymous_control": True}}))
    brid = master.force()
    # The build exists while its worker boots; it runs (sleep 20) once the worker connects.
    build = wait_for(lambda: next(iter(master.builds_for(brid)), None), 90, "the build")
    workerid = next(w["workerid"] for w in master.get("workers") if w["name"] == "w0")
    base = f"http://127.0.0.1:{master.www_port}/"

    page = browser.new_page(viewport=VIEWPORT)
    try:
        page.goto(f"{base}#/dockerami")
        row = page.locator("tr[data-worker='w0']")
        row.locator(".dockerami-timeline", has_text="build started").wait_for(timeout=90_000)
        assert row.locator(".dockerami-state").inner_text() == "building"
        (reservation,) = cloud.client().describe_instances()["Reservations"]
        instance_id = reservation["Instances"][0]["InstanceId"]
        assert row.locator(".dockerami-instance").inner_text() == instance_id
        steps = row.locator(".dockerami-timeline").inner_text()
        # The process runtime's image is "already present" (no emulated pull), ready
        # before the worker connected.
        assert re.search(r"image ready \+\d+\.\d s \(already present\).*worker connected",
                         steps, re.S), steps
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}",
                            row.locator(".dockerami-launched").inner_text())
        assert page.get_by_text("Fleet", exact=True).first.is_visible()  # the menu entry
        # The chart of the last hours: the master's samples (one at its start at least)
        # and the present, where the building instance has an area of its own.
        chart = page.locator("svg.dockerami-history-chart")
        assert int(chart.get_attribute("data-samples") or 0) >= 1
        page.locator(".dockerami-history-key", has_text="building 1").wait_for()
        area = chart.locator("path[data-state='building']").bounding_box()
        assert area is not None and area["height"] > 10, area
        box = chart.bounding_box()
        assert box is not None and 0 < box["x"] + box["width"] <= VIEWPORT["width"], box
        page.locator(".dockerami-no-orphans").wait_for()
        assert page.evaluate(SIDEWAYS) == []
        table = page.locator("table.dockerami-workers").bounding_box()
        assert table is not None and table["x"] + table["width"] <= VIEWPORT["width"]
        style = visible_style(page, "tr[data-worker='w0'] .dockerami-terminate")
        assert is_visible_style(style), style
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "fleet-page.png"), full_page=True)

        build_link = row.locator("a.dockerami-build")
        build_href = f"#/builders/{build['builderid']}/builds/{build['number']}"
        assert build_link.get_attribute("href") == build_href
        build_link.click()
        page.wait_for_url(base + build_href)
        page.go_back()
        worker_link = row.locator("a.dockerami-worker-link")
        assert worker_link.get_attribute("href") == f"#/workers/{workerid}"
        worker_link.click()
        page.wait_for_url(f"{base}#/workers/{workerid}")
        page.get_by_text("w0").first.wait_for()  # buildbot's own worker page
    finally:
        page.close()
    assert master.wait_request(brid, 90)["results"] == SUCCESS

    # Once it has finished: the build's cost (its share of the instance at the price
    # the plugin settings give t3.micro), and the day's total on this master.
    page = browser.new_page(viewport=VIEWPORT)
    try:
        page.goto(f"{base}#/dockerami")
        cost = page.locator("tr[data-worker='w0'] .dockerami-last-build-cost")
        cost.wait_for(timeout=30_000)
        assert re.fullmatch(r"last build runtests #1 \$0\.00\d{4}", cost.inner_text()), \
            cost.inner_text()
        assert "at $0.0104/h (configured)" in (cost.get_attribute("title") or "")
        today = page.locator(".dockerami-cost-today").inner_text()
        assert re.fullmatch(r" ?Today \(UTC \d{4}-\d{2}-\d{2}\): \$0\.00\d{4}\.", today), today
        assert page.evaluate(SIDEWAYS) == []
        page.screenshot(path=str(ARTIFACTS / "fleet-page-cost.png"), full_page=True)
    finally:
        page.close()


def test_prewarm_and_terminate_clicks_and_refusal_for_anonymous(make_master, cloud, browser):
    master = make_master(master_cfg(build_wait_timeout=600, plugins={"dockerami": {}},
                                    users=True))
    base = f"http://127.0.0.1:{master.www_port}"
    ARTIFACTS.mkdir(exist_ok=True)

    anonymous = browser.new_page(viewport=VIEWPORT)
    try:
        # No controls for a visitor the master would refuse (test_fleet_controls.py shows
        # the API refusing them), and a line that says how to get them.
        anonymous.goto(f"{base}/#/dockerami")
        anonymous.locator("tr[data-worker='w0'] .dockerami-state").wait_for()
        anonymous.locator(".dockerami-no-controls", has_text="log in").wait_for()
        assert anonymous.locator(".dockerami-controls .btn").count() == 0
        anonymous.screenshot(path=str(ARTIFACTS / "fleet-anonymous.png"), full_page=True)
    finally:
        anonymous.close()
    assert cloud.client().describe_instances()["Reservations"] == []

    context = browser.new_context(http_credentials={"username": "admin", "password": "adminpw"})
    admin = context.new_page()
    admin.set_viewport_size(VIEWPORT)
    try:
        admin.goto(f"{base}/auth/login")
        admin.goto(f"{base}/#/dockerami")
        row = admin.locator("tr[data-worker='w0']")
        assert is_visible_style(visible_style(admin, "tr[data-worker='w0'] .dockerami-prewarm"))
        row.locator(".dockerami-prewarm").click()
        row.locator(".dockerami-state", has_text="connected").wait_for(timeout=60_000)
        assert admin.locator(".dockerami-no-controls").count() == 0
        # At 1280 px the state is one unbroken word (an inline box on two lines has two
        # client rects).
        assert row.locator(".dockerami-state-word").evaluate(
            "e => e.getClientRects().length") == 1
        admin.screenshot(path=str(ARTIFACTS / "fleet-prewarmed.png"), full_page=True)
        instance_id = row.locator(".dockerami-instance").inner_text()

        questions: list[str] = []

        def answer(dialog: Any, accept: bool) -> None:
            questions.append(dialog.message)
            dialog.accept() if accept else dialog.dismiss()

        controls: list[str] = []
        admin.on("request", lambda r: controls.append(r.method) if is_control(r) else None)
        admin.once("dialog", lambda dialog: answer(dialog, accept=False))
        row.locator(".dockerami-terminate").click()
        # Polls go one at a time: once the second poll after the dismissal is sent, the
        # page has shown the answer to the first. Still running, and nothing was sent.
        for _ in range(2):
            with admin.expect_request(is_poll, timeout=30_000):
                pass
        assert controls == []
        assert questions == [f"Terminate instance {instance_id} of worker w0?"]
        assert "connected" in row.locator(".dockerami-state").inner_text()
        (reservation,) = cloud.client().describe_instances()["Reservations"]
        assert reservation["Instances"][0]["State"]["Name"] == "running"

        admin.once("dialog", lambda dialog: answer(dialog, accept=True))
        row.locator(".dockerami-terminate").click()
        row.locator(".dockerami-state", has_text="not running").wait_for(timeout=30_000)
        assert len(questions) == 2
    finally:
        context.close()
    (reservation,) = cloud.client().describe_instances()["Reservations"]
    assert reservation["Instances"][0]["InstanceId"] == instance_id
    assert reservation["Instances"][0]["State"]["Name"] in ("shutting-down", "terminated")


def test_pool_cap_set_from_the_page(make_master, cloud, browser):
    master = make_master(master_cfg(  # anonymous, opted in
        pool="'pool', count=2", plugins={"dockerami": {"anonymous_control": True}}))
    page = browser.new_page(viewport=VIEWPORT)
    try:
        page.goto(f"http://127.0.0.1:{master.www_port}/#/dockerami")
        row = page.locator("tr[data-pool='pool']")
        assert page.evaluate(SIDEWAYS) == []
        row.locator(".dockerami-cap").fill("1")
        row.locator(".dockerami-apply-pool").click()
        page.locator(".dockerami-outcome", has_text="pool pool: cap 1").wait_for()
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "fleet-pools.png"), full_page=True)
    finally:
        page.close()
    assert master.fleet()["pools"]["pool"]["cap"] == 1


def test_pool_schedule_shown_and_overridden_from_the_page(make_master, cloud, browser):
    """A pool whose warm minimum follows periods: the page shows the one in force and
    the next; a number typed in overrides it, an empty field follows it again."""
    day = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")[(time.gmtime().tm_wday + 3) % 7]
    period = f"{day} 10:00-11:00 Europe/Berlin"
    master = make_master(master_cfg(
        pool=f"'pool', count=2, min_warm={{{period!r}: 1, 'default': 0}}",
        plugins={"dockerami": {"anonymous_control": True}}))
    page = browser.new_page(viewport=VIEWPORT)
    try:
        page.goto(f"http://127.0.0.1:{master.www_port}/#/dockerami")
        row = page.locator("tr[data-pool='pool']")
        row.locator(".dockerami-schedule-now", has_text="now: default \u2192 0 until").wait_for()
        assert row.locator(".dockerami-schedule-next").inner_text().startswith(
            f"next: {period} \u2192 1 from ")
        assert row.locator(".dockerami-schedule-lead").inner_text() == (
            "warms 5 min ahead (default)")
        assert page.evaluate(SIDEWAYS) == []
        row.locator(".dockerami-min-warm").fill("0")
        row.locator(".dockerami-apply-pool").click()
        page.locator(".dockerami-outcome", has_text="warm minimum 0").wait_for()
        row.locator(".dockerami-schedule-override", has_text="overridden here: 0").wait_for()
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "fleet-pool-schedule.png"), full_page=True)
        row.locator(".dockerami-min-warm").fill("")
        row.locator(".dockerami-apply-pool").click()
        page.locator(".dockerami-outcome", has_text="warm minimum as configured").wait_for()
        row.locator(".dockerami-schedule-override").wait_for(state="detached")
    finally:
        page.close()
    assert master.fleet()["pools"]["pool"]["schedule"]["override"] is None
    assert instances(cloud) == []


def is_poll(request: Any) -> bool:
    """The page's poll of the Fleet API."""
    return request.url.endswith(f"{PLUGIN_PATH}/api/fleet")


def is_control(request: Any) -> bool:
    return request.url.endswith(f"{PLUGIN_PATH}/api/control")


#: The page polls the Fleet API this long after each answer (scripts.js).
POLL_MS = 2000

#: In the page, before its scripts: every fetch of the fleet API is held 2.5 s (a slow
#: master) and counted, with how many were in flight at once and how many were aborted.
SLOW_FLEET = """
window.__fleet = {started: 0, inflight: 0, most: 0, aborted: 0};
const realFetch = window.fetch;
window.fetch = function (url, init) {
  if (!String(url).includes("FLEET_API")) return realFetch(url, init);
  const s = window.__fleet;
  s.started++; s.inflight++; s.most = Math.max(s.most, s.inflight);
  if (init && init.signal) init.signal.addEventListener("abort", () => { s.aborted++; });
  return new Promise(r => setTimeout(r, 2500))
    .then(() => realFetch(url, init))
    .finally(() => { s.inflight--; });
};
""".replace("FLEET_API", f"{PLUGIN_PATH.lstrip('/')}/api/fleet")  # the page's URL is relative


def test_polls_one_at_a_time_and_stop_when_leaving(make_master, cloud, browser):
    master = make_master(master_cfg(plugins={"dockerami": {}}))
    page = browser.new_page(viewport=VIEWPORT)
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.add_init_script(SLOW_FLEET)
    try:
        page.goto(f"http://127.0.0.1:{master.www_port}/#/dockerami")
        page.locator("tr[data-worker='w0']").wait_for(timeout=30_000)
        # With a 2.5 s answer a poll every 2 s by the clock would overlap by now.
        page.wait_for_function("window.__fleet.started >= 3", timeout=30_000)
        assert page.evaluate("window.__fleet.most") == 1
        # Leave while a poll is in flight: it is aborted and nothing polls afterwards.
        page.wait_for_function("window.__fleet.inflight === 1", timeout=10_000)
        page.evaluate("window.location.hash = '#/builders'")
        page.get_by_text("Orphaned instances").wait_for(state="detached")
        page.wait_for_function("window.__fleet.aborted >= 1 && window.__fleet.inflight === 0",
                               timeout=10_000)
        stats = page.evaluate("window.__fleet")
        assert stats["aborted"] == 1 and stats["inflight"] == 0, stats
        started = stats["started"]
        # A poller still running would have set its timer for the next poll when the
        # aborted one ended; a timer of the page's own, set now and a little longer,
        # fires after it.
        page.evaluate(f"new Promise(resolve => setTimeout(resolve, {POLL_MS + 100}))")
        assert page.evaluate("window.__fleet.started") == started
        assert page.locator("text=Last refresh failed").count() == 0
    finally:
        page.close()
    assert problems == []


def test_configured_limits_are_shown_until_a_container_reports_them(make_master, cloud, browser):
    """The process runtime's workers report no limits: the page shows the configured
    ones, a key not given as the bootstrap's default."""
    master = make_master(master_cfg(plugins={"dockerami": {}},
                                    worker_extra="container_limits={'memory': '6g', "
                                                 "'pids': None},"))
    page = browser.new_page(viewport=VIEWPORT)
    try:
        page.goto(f"http://127.0.0.1:{master.www_port}/#/dockerami")
        shown = page.locator("tr[data-worker='w0'] .dockerami-limits")
        shown.wait_for(timeout=30_000)
        assert shown.inner_text() == (
            "limits: memory 6 GiB \u00b7 pids unlimited \u00b7 cpus default (configured)")
        assert page.evaluate(SIDEWAYS) == []
    finally:
        page.close()


def test_a_drain_and_a_self_retirement_are_shown_apart(make_master, cloud, browser, tmp_path):
    """A planned drain (here EC2's rebalance recommendation) is no fault: shown as
    'draining: <reason>', not red; an instance whose disk stayed full retires itself:
    'retiring: <reason>' in red. Both still run their builds to the end."""
    go = tmp_path / "go"
    master = make_master(master_cfg(
        workers=2, build_wait_timeout=600, plugins={"dockerami": {}},
        command=held_until(go)))
    brids = [master.force(), master.force()]

    def building() -> list[dict] | None:
        rows = [r for r in master.fleet()["workers"] if "build_started" in r["timeline"]]
        return rows if len(rows) == 2 else None

    rows = wait_for(building, 120, "both workers' builds to start on their instances")
    drained, retired = (row["instance"]["id"] for row in sorted(rows, key=lambda r: r["name"]))
    cloud.hypervisor.recommend_rebalance(drained)
    cloud.runtime.retire(retired, "disk_full: 0.2 GiB free on /var/lib/docker after pruning, "
                                  "below the floor (5%: 1.0 GiB)")

    page = browser.new_page(viewport=VIEWPORT)
    try:
        page.goto(f"http://127.0.0.1:{master.www_port}/#/dockerami")
        draining = page.locator("tr[data-worker='w0'] .dockerami-retired")
        retiring = page.locator("tr[data-worker='w1'] .dockerami-retired")
        draining.wait_for(timeout=60_000)
        retiring.wait_for(timeout=60_000)
        assert draining.inner_text().startswith(
            "draining: spot_rebalance: EC2 recommends rebalancing"), draining.inner_text()
        assert retiring.inner_text().startswith("retiring: disk_full: 0.2 GiB free"), \
            retiring.inner_text()
        classes = draining.get_attribute("class") or ""
        assert "text-danger" not in classes and "dockerami-draining" in classes, classes
        assert "text-danger" in (retiring.get_attribute("class") or "")
        colour = "e => getComputedStyle(e).color"
        assert draining.evaluate(colour) != retiring.evaluate(colour)
        assert page.evaluate(SIDEWAYS) == []
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "fleet-page-draining.png"), full_page=True)
    finally:
        page.close()
    go.touch()
    assert [master.wait_request(brid, 120)["results"] for brid in brids] == [SUCCESS] * 2
