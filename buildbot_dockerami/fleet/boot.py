"""Boot verdicts: whether a booting instance can still become a connected worker, and
the console line that says why it did not. Pure; the worker asks while it boots."""

from __future__ import annotations

from buildbot_dockerami.cloud.instances import InstanceStatus

#: States from which an instance can still become a connected worker.
BOOTING_STATES = frozenset({"pending", "running"})


def boot_verdict(
    status: InstanceStatus | None, seconds_since_launch: float, not_found_grace: float = 60.0
) -> tuple[bool, str]:
    """Whether a booting instance can still become a worker, and if not, why.

    EC2 is eventually consistent: a fresh instance may be missing from
    DescribeInstances for a little while, so "not found" only fails after a grace.
    """
    if status is None:
        if seconds_since_launch < not_found_grace:
            return True, ""
        return False, f"instance not found {seconds_since_launch:.0f}s after launch"
    if status.state in BOOTING_STATES:
        return True, ""
    reason = f" ({status.reason})" if status.reason else ""
    return False, f"instance {status.instance_id} is {status.state}{reason}"


def last_console_words(output: str) -> str:
    """The line of a console that best explains a failed boot: the last FATAL line of
    the bootstrap if there is one, else the last non-empty line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    fatal = [line for line in lines if "FATAL" in line]
    return (fatal or lines or [""])[-1][:500]
