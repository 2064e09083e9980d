"""Fleet-wide settings, set once with FleetSettings in c['services']: what applies on a
fake clock, what checkconfig says, and a real master that uses them."""

from __future__ import annotations

import pytest
from twisted.internet import task

from buildbot_dockerami.config.model import FleetWide, WorkerSettings
from buildbot_dockerami.fleet.service import Fleet
from tests.harness import Master, master_cfg, wait_for


class Registered:
    """A worker as the fleet sees it, for what FleetWide decides (settings only)."""

    def __init__(self, **settings: object) -> None:
        self.settings = WorkerSettings(**settings)


def test_without_fleet_settings_the_workers_keywords_apply_as_before() -> None:
    fleet = Fleet(task.Clock(), "host:/basedir")
    a, b = Registered(reconcile_interval=60, max_stopped=3), Registered(reconcile_interval=10)
    for worker in (a, b):
        fleet.workers.add(worker)
        fleet.worker_configured(worker.settings)
    assert fleet.reconciler.interval == 10  # the smallest
    assert fleet.stopped.max_count == 10  # the last configured (b: the default)
    assert fleet.setting(a.settings, "ec2_timeout") == 20.0
    assert fleet.setting(WorkerSettings(ec2_timeout=3), "ec2_timeout") == 3
    fleet.reconciler.stop()


def test_fleet_settings_win_over_every_worker_and_can_be_removed() -> None:
    fleet = Fleet(task.Clock(), "host:/basedir")
    worker = Registered(reconcile_interval=60, max_stopped=3, launch_on_request=False)
    fleet.workers.add(worker)
    fleet.worker_configured(worker.settings)
    fleet.configure(FleetWide(reconcile_interval=7, max_stopped=1, launch_on_request=True,
                              ami_refresh_interval=120))
    assert fleet.refresh.interval == 120
    fleet.worker_configured(worker.settings)  # a reconfig of the worker changes nothing
    assert (fleet.reconciler.interval, fleet.stopped.max_count) == (7, 1)
    assert fleet.setting(worker.settings, "launch_on_request") is True
    fleet.configure(None)  # FleetSettings removed from the configuration
    assert fleet.reconciler.interval == 60
    assert fleet.refresh.interval == 600
    assert fleet.setting(worker.settings, "launch_on_request") is False
    fleet.reconciler.stop()


FLEET_SETTINGS = """
from buildbot_dockerami import FleetSettings
c['services'] = [FleetSettings({settings})]
"""


@pytest.mark.integration
def test_checkconfig_names_fleet_settings_errors_and_moved_worker_keywords(
        masters_root, tmp_path) -> None:
    master = Master(masters_root, "fleet-settings-check", {
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
        "HOME": str(tmp_path)})
    master.write_config(master_cfg(worker_extra="reconcile_interval=60,") + FLEET_SETTINGS.format(
        settings="reconcile_interval=1, max_stopped=-1, launch_on_request='yes', bogus=2"))
    result = master.checkconfig()
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "FleetSettings: bogus: unknown setting" in output, output
    master.write_config(master_cfg(worker_extra="reconcile_interval=60,") + FLEET_SETTINGS.format(
        settings="reconcile_interval=1, max_stopped=-1, launch_on_request='yes', "
                 "prices={'t3.micro': -1}, ami_refresh_interval=0, "
                 "registry_token_services={'registry.example.com': 'https://gitlab.example'}"))
    output = (result := master.checkconfig()).stdout + result.stderr
    assert "FleetSettings: reconcile_interval: 1 must be a number of seconds >= 5" in output
    assert "FleetSettings: prices: t3.micro: -1 must be USD per hour, a number >= 0" in output
    assert "FleetSettings: max_stopped: -1 must be a whole number >= 0" in output
    assert "FleetSettings: launch_on_request: 'yes' must be True or False" in output
    assert "FleetSettings: ami_refresh_interval: 0 must be a number of seconds >= 5" in output
    assert ("FleetSettings: registry_token_services: 'https://gitlab.example' is not a host "
            "name in lowercase without scheme, port or path") in output
    master.write_config(master_cfg(worker_extra="reconcile_interval=60,"))
    result = master.checkconfig()
    assert result.returncode == 0, result.stdout + result.stderr
    assert ("DockerAMILatentWorker 'w0': reconcile_interval: is a fleet-wide setting now"
            in result.stdout + result.stderr), result.stdout + result.stderr


@pytest.mark.integration
def test_a_master_runs_its_fleet_with_fleet_settings(make_master) -> None:
    master = make_master(master_cfg(plugins={"dockerami": {}}, worker_extra=(
        "reconcile_interval=60,")) + FLEET_SETTINGS.format(settings="reconcile_interval=5"))
    def reconciled_every_5_seconds() -> bool:
        reconciler = master.fleet()["reconciler"]
        return reconciler["interval"] == 5 and reconciler["checked_at"] is not None

    wait_for(reconciled_every_5_seconds, 30, "the reconciler to run on FleetSettings' interval")
    master.reconfig(master_cfg(plugins={"dockerami": {}}, worker_extra="reconcile_interval=60,"))
    wait_for(lambda: master.fleet()["reconciler"]["interval"] == 60, 30,
             "the worker's own (deprecated) interval once FleetSettings is removed")
