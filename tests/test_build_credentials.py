"""AWS credentials scoped to a build (steps/aws.py, cloud/sts.py; issue 21, part 4).

Without a master: the session's name and tags, the file, the checks, the renewal
timer on a fake clock. With a real master, worker and the local cloud's STS and IAM
(moto on 127.0.0.1): a build of builder A is A's role and never B's, a long build's
credentials are renewed while it runs, and a refused AssumeRole fails the build. That
no credential is readable anywhere is tests/test_no_secrets.py's."""

from __future__ import annotations

import configparser
import os
import posixpath
import re
import stat
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
from buildbot.config.errors import capture_config_errors
from buildbot.process.properties import Property
from twisted.internet import task

from buildbot_dockerami.cloud import sts
from buildbot_dockerami.steps import aws
from tests.harness import SUCCESS, WARNINGS, master_cfg, wait_for
from tests.helpers import (
    AWS_STEPS,
    caller_arn,
    make_role,
    read_credentials,
    step_of,
    wait_step_started,
)

ARN = "arn:aws:iam::123456789012:role/ci-publish"


# -- without a master ---------------------------------------------------------------

@pytest.mark.parametrize(("builder", "number", "expected"), [
    ("runtests", 12, "runtests-12"),
    ("linux / gcc 13 (debug)", 7, "linux-gcc-13-debug-7"),
    ("ünïcode", 3, "n-code-3"),
    ("%%%", 1, "build-1"),
    ("x" * 100, 123456, "x" * 57 + "-123456"),
])
def test_the_session_is_named_after_the_build_in_stss_charset(builder, number, expected):
    name = sts.session_name(builder, number)
    assert name == expected
    assert 2 <= len(name) <= 64 and re.fullmatch(r"[\w+=,.@-]+", name, re.ASCII)


def test_session_tags_name_builder_and_build_in_stss_charset():
    tags = sts.session_tags("a/b (c)#" + "y" * 300, 9)
    assert tags[0]["Key"] == "buildbot:builder" and tags[1] == {"Key": "buildbot:build",
                                                                "Value": "9"}
    assert tags[0]["Value"].startswith("a/b -c-") and len(tags[0]["Value"]) == 256


def test_the_credentials_file_is_what_the_sdks_read():
    credentials = sts.RoleCredentials("ASIAKEY", "s3cr3t", "t0ken",
                                      datetime(2026, 12, 7, 8, 15, tzinfo=UTC))
    parser = configparser.ConfigParser()
    parser.read_string(sts.credentials_file(credentials, ARN))
    assert dict(parser["default"]) == {"aws_access_key_id": "ASIAKEY",
                                       "aws_secret_access_key": "s3cr3t",
                                       "aws_session_token": "t0ken"}
    assert "s3cr3t" not in repr(credentials) and "t0ken" not in repr(credentials)


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"role_arn": "ci-publish"}, "AwsCredentials: role_arn: 'ci-publish' is not an IAM role"),
    ({"role_arn": "arn:aws:iam::123:role/x"}, "is not an IAM role ARN"),
    ({"role_arn": "arn:aws:iam::123456789012:user/x"}, "is not an IAM role ARN"),
    ({"role_arn": 5}, "role_arn: must be a string"),
    ({"role_arn": ARN, "duration": 60}, "duration: must be whole seconds 900-43200"),
    ({"role_arn": ARN, "duration": 900.5}, "duration: must be whole seconds"),
    ({"role_arn": ARN, "renew_before": 900}, "renew_before: must be None or whole seconds"),
    ({"role_arn": ARN, "renew_before": 0}, "renew_before"),
    ({"role_arn": ARN, "region": "US East"}, "region: "),
    ({"role_arn": ARN, "session_tags": "yes"}, "session_tags: must be True or False"),
])
def test_bad_settings_are_named_at_checkconfig(kwargs, expected):
    with capture_config_errors() as errors:
        aws.AwsCredentials(**kwargs)
    assert any(expected in e for e in errors.errors), errors.errors


def test_good_settings_and_a_renderable_role_pass():
    for kwargs in ({"role_arn": ARN}, {"role_arn": Property("role")},
                   {"role_arn": "arn:aws-cn:iam::123456789012:role/team/ci.publish@x",
                    "duration": 3600, "renew_before": 600, "region": "eu-west-1",
                    "session_tags": False}):
        with capture_config_errors() as errors:
            aws.AwsCredentials(**kwargs)
        assert errors.errors == [], kwargs


def _session_in_a_build(clock: task.Clock):
    """A RoleSession in a stand-in of buildbot's Build (only what the timer reads)."""
    session = aws.RoleSession(ARN, "b-1", tags=[], duration=900, renew_before=300,
                              region=None, builddir="/w/b", path_module=posixpath)
    build = SimpleNamespace(master=SimpleNamespace(reactor=clock), finished=False,
                            stopped=False, terminate=False, steps=[], added=[])
    build.addStepsAfterCurrentStep = build.added.extend
    return session, build


def test_the_timer_queues_one_renewal_after_the_running_step():
    clock = task.Clock()
    session, build = _session_in_a_build(clock)
    assert session.path == "/w/b/.buildbot-aws/credentials"
    build.steps = ["next step", aws.RemoveAwsCredentials(session=session)]
    session.arm(build, 600)
    clock.advance(599)
    assert build.added == []
    clock.advance(1)
    (renewal,) = build.added
    assert renewal.get_step_factory().kwargs == {"session": session}
    session.arm(build, 0)
    clock.advance(1)
    assert len(build.added) == 1  # already queued: not twice


def test_the_timer_waits_in_the_last_step_and_stops_with_the_build():
    clock = task.Clock()
    session, build = _session_in_a_build(clock)
    build.steps = [aws.RemoveAwsCredentials(session=session)]  # only the clean-up is left
    session.arm(build, 10)
    clock.advance(10)
    assert build.added == [] and session.timer is not None  # looked at again later
    build.steps.insert(0, "a step the last one added")
    clock.advance(aws.RECHECK)
    assert len(build.added) == 1
    session.renewal_queued = False
    build.finished = True
    session.arm(build, 1)
    clock.advance(1)
    assert len(build.added) == 1 and session.timer is None
    session.arm(build, 1)
    session.ended = True
    session.cancel()
    assert clock.getDelayedCalls() == []


# -- with a real master, worker and the local cloud's STS ------------------------------

def _credentials_path(master, brid: int) -> Path:
    """Where the build's file is, as the AwsCredentials step's log says."""
    step = wait_for(lambda: (s := step_of(master, brid, "aws credentials")) and s["complete"]
                    and s, 60, "the credentials step")
    text = master.step_log(step["buildid"], "aws credentials")
    return Path(re.search(r"credentials are in (\S+) \(AWS_SHARED_CREDENTIALS_FILE\)",
                          text).group(1))


@pytest.mark.integration
def test_a_build_of_builder_a_is_as_role_and_never_bs(make_master, cloud):
    """One worker serves both builders, one build after the other: each build's identity
    is its own builder's role and session, and the other's file is gone by then."""
    role_a, role_b = make_role(cloud, "ci-a"), make_role(cloud, "ci-b")
    config = master_cfg(build_wait_timeout=60) + AWS_STEPS + f"""
SEEN = 'echo files: $(cd ../.. && ls */.buildbot-aws/credentials); ' + WHOAMI
c['builders'] += [
    aws_builder('publish-a', AwsCredentials(role_arn={role_a!r}), aws_shell('whoami', SEEN)),
    aws_builder('publish-b', AwsCredentials(role_arn=util.Property('role')),
                aws_shell('whoami', SEEN), properties={{'role': {role_b!r}}}),
    aws_builder('refused', AwsCredentials(role_arn={role_a!r}), aws_shell('whoami', SEEN)),
]
c['schedulers'].append(schedulers.ForceScheduler(
    name='aws', builderNames=['publish-a', 'publish-b', 'refused']))
"""
    master = make_master(config)
    identities = {}
    for builder in ("publish-a", "publish-b"):
        build = master.wait_request(master.force(builder, "aws"))
        assert build["results"] == SUCCESS, master.step_log(build["buildid"], "whoami")
        text = master.step_log(build["buildid"], "whoami")
        identities[builder] = re.search(r"caller: (\S+)", text).group(1)
        # Its own file only: the other builder's was removed when its build ended.
        assert f"files: {builder}/.buildbot-aws/credentials\n" in text, text
    assert identities == {
        "publish-a": "arn:aws:sts::123456789012:assumed-role/ci-a/publish-a-1",
        "publish-b": "arn:aws:sts::123456789012:assumed-role/ci-b/publish-b-1",
    }
    # A refused AssumeRole fails the build before its steps; STS's reason is shown.
    cloud.faults.inject("AssumeRole", "AccessDenied",
                        "User is not authorized to perform: sts:AssumeRole", count=1)
    build = master.wait_request(master.force("refused", "aws"))
    steps = {s["name"]: s for s in master.get(f"builds/{build['buildid']}/steps")}
    assert build["results"] != SUCCESS
    assert "AccessDenied: User is not authorized" in master.step_log(build["buildid"],
                                                                     "aws credentials")
    assert "whoami" not in steps  # never started
    assert steps["remove aws credentials"]["results"] == SUCCESS


def _hold(name: str, path: Path) -> str:
    """master.cfg source: a step that waits for ``<path>-<build number>``."""
    return (f"aws_shell({name!r}, util.Interpolate('while [ ! -e {path}-%(prop:buildnumber)s ]; "
            "do sleep 0.05; done'))")


@pytest.mark.integration
def test_a_long_builds_credentials_are_renewed_while_it_runs(make_master, cloud, tmp_path):
    """renew_before=895 of 900: the renewal is due after 5 s. The build is held in one
    step until the master says so, then in the next one while the test waits for the
    file on the worker to hold a new session's key. A second build's renewal is refused
    by STS: a warning, and the build goes on with the credentials it has."""
    role = make_role(cloud, "ci-long")
    go1, go2 = tmp_path / "go1", tmp_path / "go2"
    config = master_cfg() + AWS_STEPS + f"""
c['builders'].append(aws_builder(
    'long', AwsCredentials(role_arn={role!r}, duration=900, renew_before=895),
    {_hold('hold1', go1)}, {_hold('hold2', go2)}))
c['schedulers'].append(schedulers.ForceScheduler(name='aws', builderNames=['long']))
"""
    master = make_master(config)
    brid = master.force("long", "aws")
    path = _credentials_path(master, brid)
    first = read_credentials(path)
    assert caller_arn(cloud, first) == "arn:aws:sts::123456789012:assumed-role/ci-long/long-1"
    wait_step_started(master, brid, "hold1")
    wait_for(lambda: "session long-1: renewal due" in master.log(), 60, "the renewal to be due")
    Path(f"{go1}-1").touch()
    renewed = wait_for(
        lambda: path.exists() and (found := read_credentials(path))
        ["aws_access_key_id"] != first["aws_access_key_id"] and found,
        60, "the file to hold renewed credentials")
    assert not master.get(f"buildrequests/{brid}")[0]["complete"]  # while the build runs
    assert caller_arn(cloud, renewed) == "arn:aws:sts::123456789012:assumed-role/ci-long/long-1"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o400
    Path(f"{go2}-1").touch()
    build = master.wait_request(brid)
    assert build["results"] == SUCCESS
    steps = [(s["name"], s["results"]) for s in master.get(f"builds/{build['buildid']}/steps")]
    assert steps[1:4] == [("aws credentials", SUCCESS), ("hold1", SUCCESS),
                          ("renew aws credentials", SUCCESS)], steps
    assert steps[-2:] == [("hold2", SUCCESS), ("remove aws credentials", SUCCESS)], steps
    assert not path.exists() and not path.parent.exists()

    brid = master.force("long", "aws")
    wait_step_started(master, brid, "hold1")
    held = read_credentials(path)
    cloud.faults.inject("AssumeRole", "AccessDenied", "Not now.", count=1)
    wait_for(lambda: "session long-2: renewal due" in master.log(), 60, "the renewal to be due")
    Path(f"{go1}-2").touch()
    hold2 = wait_step_started(master, brid, "hold2")
    assert read_credentials(path) == held  # the file kept what it had
    assert "AccessDenied: Not now." in master.step_log(hold2["buildid"],
                                                       "renew aws credentials")
    Path(f"{go2}-2").touch()
    build = master.wait_request(brid)
    assert build["results"] == WARNINGS
    steps = [(s["name"], s["results"]) for s in master.get(f"builds/{build['buildid']}/steps")]
    assert ("renew aws credentials", WARNINGS) in steps
    assert steps[-1] == ("remove aws credentials", SUCCESS)
    assert not path.exists()


@pytest.mark.integration
def test_checkconfig_names_the_step_and_the_setting(make_master):
    master = make_master(master_cfg() + AWS_STEPS + """
c['builders'].append(aws_builder('bad', AwsCredentials(role_arn='ci-publish', duration=60)))
""", start=False)
    checked = master.checkconfig()
    output = checked.stdout + checked.stderr
    assert checked.returncode != 0, output
    assert "AwsCredentials: role_arn: 'ci-publish' is not an IAM role ARN" in output, output
    assert "AwsCredentials: duration: must be whole seconds 900-43200" in output, output
