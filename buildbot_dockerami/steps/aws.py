"""``AwsCredentials``: a build gets an IAM role's credentials for itself only.

A build step, so the role is chosen per builder where an operator already says what a
builder does (its factory), and works on any worker. When it runs, the master assumes
the role with STS for this build (session ``<builder>-<number>``, tagged with both,
short-lived) and writes the credentials through the worker connection to
``<builddir>/.buildbot-aws/credentials`` (mode 0400); later steps find it through
``AWS_SHARED_CREDENTIALS_FILE``, which holds only that path. Nothing secret goes into
the environment, user data, properties or logs: the three values are registered as
build secrets, so a step that prints them shows ``<aws_secret_access_key>`` instead.

Renewal: buildbot's PB worker runs one command per builder at a time (a second one
stops the first), so the file cannot be rewritten while a step runs. A timer on the
master's reactor fires once ``renew_before`` seconds of the session are left and adds
a renewal step after the running step; a single step longer than what remains then
runs with expiring credentials (docs/security.md says so).

End: the step adds ``remove aws credentials`` (``alwaysRun``) as the build's last
step: it stops the timer and deletes the file. STS cannot revoke a session early:
it stays usable by whoever copied it until it expires.
"""

from __future__ import annotations

from typing import Any

from buildbot import config
from buildbot.interfaces import IRenderable
from buildbot.process.buildstep import BuildStep
from buildbot.process.results import CANCELLED, FAILURE, SKIPPED, SUCCESS, WARNINGS
from buildbot.steps.worker import CompositeStepMixin
from twisted.internet import defer
from twisted.python import log

from buildbot_dockerami.cloud import sts
from buildbot_dockerami.config.validators import SettingError, check_region, check_role_arn

#: Where the file goes, under the builder's directory on the worker.
DIRECTORY = ".buildbot-aws"
ENV_VAR = "AWS_SHARED_CREDENTIALS_FILE"
#: Seconds before a failed renewal is tried again (at the next step boundary after).
RETRY_AFTER = 30.0
#: Seconds before a renewal skipped in the build's last step is looked at again (that
#: step may still add steps after itself).
RECHECK = 60.0


def _whole_seconds(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class RoleSession:
    """One build's role session, shared by the step that starts it and the steps that
    renew and end it (each is its own buildbot step instance)."""

    def __init__(self, role_arn: str, name: str, *, tags: list[dict[str, str]],
                 duration: int, renew_before: int, region: str | None, builddir: str,
                 path_module: Any) -> None:
        self.role_arn = role_arn
        self.name = name
        self.tags = tags
        self.duration = duration
        self.renew_before = renew_before
        self.region = region
        self.directory = path_module.join(builddir, DIRECTORY)
        self.path = path_module.join(self.directory, "credentials")
        self.timer: Any = None
        self.renewal_queued = False
        self.ended = False
        self.renewals = 0

    def cancel(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def arm(self, build: Any, delay: float) -> None:
        self.cancel()
        self.timer = build.master.reactor.callLater(max(0.0, delay), self._due, build)

    def _due(self, build: Any) -> None:
        self.timer = None
        if self.ended or self.renewal_queued or build.finished or build.stopped \
                or build.terminate:
            return
        others = [s for s in build.steps
                  if not (isinstance(s, RemoveAwsCredentials) and s.session is self)]
        if not others:  # the running step is the last: nothing would use a renewal
            self.arm(build, RECHECK)
            return
        self.renewal_queued = True
        build.addStepsAfterCurrentStep([RenewAwsCredentials(session=self)])
        log.msg(f"AwsCredentials: session {self.name}: renewal due; "
                "renewing after the running step")

    @defer.inlineCallbacks
    def hand_over(self, step: Any) -> Any:
        """Assume the role and (re)write the file through ``step``; None when done,
        else what went wrong (no credential in it)."""
        reactor = step.master.reactor
        asked = reactor.seconds()
        try:
            credentials = yield sts.AsyncSts(
                reactor.getThreadPool(), reactor, self.region,
            ).assume_role(self.role_arn, self.name, self.duration, self.tags)
        except sts.StsError as e:
            return str(e)
        if step.stopped:
            return "the step was stopped"
        for name, value in credentials.secrets().items():
            step.build.properties.useSecret(value, name)
        # The old file is 0400: remove it (and any stale one a lost build left).
        yield step.runRmdir(self.directory, abandonOnFailure=False)
        written = yield step.downloadFileContentToWorker(
            self.path, sts.credentials_file(credentials, self.role_arn),
            abandonOnFailure=False, mode=0o400)
        if written is None:
            return f"could not write {self.path} on the worker"
        if not self.ended:
            self.arm(step.build, asked + self.duration - self.renew_before - reactor.seconds())
        return None


class AwsCredentials(BuildStep, CompositeStepMixin):
    """Assume ``role_arn`` for this build and hand its credentials to the later steps.

    ``role_arn`` may be renderable (e.g. ``util.Property('aws_role')``, so that one
    factory serves builders with different roles); ``duration`` is the session's
    length in seconds (STS: 900 to the role's MaxSessionDuration, at most 43200);
    ``renew_before``: seconds before the session ends from which it is renewed at the
    next step boundary (default: half of ``duration``); ``region``: STS's region
    (default boto3's, else STS's global endpoint); ``session_tags=False`` leaves out the
    ``buildbot:builder`` and ``buildbot:build`` session tags (their use needs
    ``sts:TagSession`` in the role's trust policy).
    """

    name = "aws credentials"
    renderables = ["role_arn"]
    logEnviron = False

    def __init__(self, role_arn: Any, duration: int = sts.MIN_DURATION,
                 renew_before: int | None = None, region: str | None = None,
                 session_tags: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("haltOnFailure", True)
        super().__init__(**kwargs)
        self.role_arn = role_arn
        self.duration = duration
        self.renew_before = renew_before
        self.region = region
        self.session_tags = session_tags
        for problem in self._problems():
            config.error(f"AwsCredentials: {problem}")

    def _problems(self) -> list[str]:
        found = []
        if not IRenderable.providedBy(self.role_arn):
            try:
                check_role_arn(self.role_arn)
            except SettingError as e:
                found.append(str(e))
        if not _whole_seconds(self.duration) \
                or not sts.MIN_DURATION <= self.duration <= sts.MAX_DURATION:
            found.append(f"duration: must be whole seconds {sts.MIN_DURATION}-"
                         f"{sts.MAX_DURATION} (STS's bounds), not {self.duration!r:.40}")
        elif self.renew_before is not None and (
                not _whole_seconds(self.renew_before)
                or not 1 <= self.renew_before < self.duration):
            found.append(f"renew_before: must be None or whole seconds from 1 to less than "
                         f"duration ({self.duration}), not {self.renew_before!r:.40}")
        if self.region is not None:
            try:
                check_region(self.region)
            except SettingError as e:
                found.append(str(e))
        if not isinstance(self.session_tags, bool):
            found.append("session_tags: must be True or False")
        return found

    @defer.inlineCallbacks
    def run(self) -> Any:
        yield self.addLogForRemoteCommands("stdio")
        try:
            check_role_arn(self.role_arn, "rendered role_arn")
        except SettingError:  # the rendered value is not quoted: it may hold a secret
            return (yield self._fail("rendered role_arn: not an IAM role ARN "
                                     "(arn:aws:iam::<12-digit account>:role/<name>)"))
        builddir = self.getProperty("builddir")
        if not builddir:
            return (yield self._fail("the worker did not report its base directory"))
        builder = str(self.getProperty("buildername") or self.build.builder.name)
        number = self.getProperty("buildnumber")
        session = RoleSession(
            self.role_arn, sts.session_name(builder, number),
            tags=sts.session_tags(builder, number) if self.session_tags else [],
            duration=self.duration, renew_before=self.renew_before or self.duration // 2,
            region=self.region, builddir=builddir, path_module=self.build.path_module)
        # First, so that the file goes whatever happens from here on.
        self.build.addStepsAfterLastStep([RemoveAwsCredentials(session=session)])
        problem = yield session.hand_over(self)
        if problem is not None:
            return CANCELLED if self.stopped else (yield self._fail(problem))
        self.build.env[ENV_VAR] = session.path
        yield self.rc_log.addStdout(
            f"Role {self.role_arn} assumed as session {session.name} for "
            f"{self.duration} s; its credentials are in {session.path} ({ENV_VAR}), "
            f"renewed at the first step boundary once {session.renew_before} s are left.\n")
        self.descriptionDone = [f"role {self.role_arn.rsplit('/', 1)[-1]}",
                                f"session {session.name}"]
        return SUCCESS

    @defer.inlineCallbacks
    def _fail(self, problem: str) -> Any:
        yield self.rc_log.addStderr(f"AwsCredentials: {problem}\n")
        self.descriptionDone = ["no AWS credentials"]
        return FAILURE


class _SessionStep(BuildStep, CompositeStepMixin):
    """A step AwsCredentials adds to its build, acting on that build's role session."""

    logEnviron = False

    def __init__(self, session: RoleSession, **kwargs: Any) -> None:
        kwargs.setdefault("warnOnWarnings", True)  # the build shows it
        super().__init__(**kwargs)
        self.session = session


class RenewAwsCredentials(_SessionStep):
    """Added by the session's timer after the running step: a fresh session, the file
    rewritten. A failure is a warning (the old credentials may still have a while)."""

    name = "renew aws credentials"

    @defer.inlineCallbacks
    def run(self) -> Any:
        session = self.session
        session.renewal_queued = False
        if session.ended:
            return SKIPPED
        yield self.addLogForRemoteCommands("stdio")
        problem = yield session.hand_over(self)
        if problem is not None:
            yield self.rc_log.addStderr(f"AwsCredentials: {problem}; trying again at the "
                                        f"first step boundary {RETRY_AFTER:g} s or more from "
                                        "now\n")
            if not session.ended:
                session.arm(self.build, RETRY_AFTER)
            self.descriptionDone = ["AWS credentials not renewed"]
            return CANCELLED if self.stopped else WARNINGS
        session.renewals += 1
        self.descriptionDone = [f"session {session.name} renewed"]
        return SUCCESS


class RemoveAwsCredentials(_SessionStep):
    """The build's last step, run even when the build failed or was stopped."""

    name = "remove aws credentials"
    alwaysRun = True

    @defer.inlineCallbacks
    def run(self) -> Any:
        session = self.session
        session.ended = True
        session.cancel()
        if self.build.env.get(ENV_VAR) == session.path:
            del self.build.env[ENV_VAR]
        yield self.addLogForRemoteCommands("stdio")
        failed = yield self.runRmdir(session.directory, abandonOnFailure=False)
        if failed:
            self.descriptionDone = ["AWS credentials not removed"]
            return WARNINGS
        yield self.rc_log.addStdout(
            f"{session.path} removed. The session stays valid until it expires (STS cannot "
            "end it early), for whoever copied it.\n")
        self.descriptionDone = ["AWS credentials removed"]
        return SUCCESS
