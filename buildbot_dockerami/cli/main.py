"""The ``buildbot-dockerami`` command: operator tools around the worker."""

from __future__ import annotations

import argparse
import logging
import shlex
import signal
import sys
import threading
from pathlib import Path

from buildbot_dockerami import __version__, assets

RUNTIMES = ("process", "container", "legacy")


class MissingExtra(Exception):
    """A command whose optional dependencies (a setup.cfg extra) are not installed."""


def _local_cloud(args: argparse.Namespace) -> int:
    try:
        from buildbot_dockerami.localcloud import Delays, LocalCloud
    except ModuleNotFoundError as e:
        raise MissingExtra(
            f"local-cloud needs the 'demo' extra (no module {e.name!r}): "
            "pip install 'buildbot-dockerami[demo]'"
        ) from None

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    pulls: dict[str, dict[str, float]] = {}
    for spec in args.pull_delay:
        image, seconds, size = _pull_delay(spec)
        pulls.setdefault(image, {})[size] = seconds
    delays = Delays(pending=args.pending_delay, boot=args.boot_delay, pull=pulls,
                    default_pull=args.default_pull_delay, start=args.start_delay,
                    api=args.api_delay)
    try:
        delays.validate()
    except ValueError as e:
        print(f"buildbot-dockerami: {e}", file=sys.stderr)
        return 2
    cloud = LocalCloud(state_dir=args.state_dir, port=args.port, region=args.region,
                       runtime=args.runtime, delays=delays)
    try:
        cloud.start()
    except OSError as e:
        print(f"buildbot-dockerami: cannot start the local cloud on port {args.port}: {e}",
              file=sys.stderr)
        return 1
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in cloud.env().items())
    if args.env_file:  # whole or not at all: scripts wait for it to be non-empty
        partial = Path(f"{args.env_file}.partial")
        partial.write_text(exports)
        partial.replace(args.env_file)
    print(f"local cloud: EC2 endpoint {cloud.endpoint_url}, base AMI {cloud.base_ami_id}")
    print("point a master at it with:\n" + exports, flush=True)
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    stopped.wait()
    cloud.stop()
    return 0


def _pull_delay(spec: str) -> tuple[str, float, str]:
    """``IMAGE=SECONDS`` or ``IMAGE@INSTANCE_TYPE=SECONDS``."""
    target, sep, seconds = spec.rpartition("=")
    image, _, size = target.partition("@")
    try:
        value = float(seconds)
    except ValueError:
        value = -1.0
    if not sep or not image or value < 0:
        raise SystemExit(f"buildbot-dockerami: --pull-delay {spec!r}: expected "
                         "IMAGE=SECONDS or IMAGE@INSTANCE_TYPE=SECONDS")
    return image, value, size or "*"


def _image_build(args: argparse.Namespace) -> int:
    from buildbot_dockerami.cli import images
    context = args.directory.resolve()
    tag = args.tag or images.default_tag(args.repo or f"dockerami/{context.name}")
    build_args = dict(_key_value(a) for a in args.build_arg)
    if args.base:
        build_args["BASE"] = args.base
    if args.wheels:
        version = build_args.get("BUILDBOT_WORKER_VERSION", "4.3.*")
        images.fetch_wheels(context, f"buildbot-worker=={version}", *images.WORKER_EXTRAS,
                            architecture=images.engine_architecture())
        build_args.setdefault("PIP_OPTIONS", "--no-index")
    images.build(context, tag, build_args)
    print(tag)
    return 0


def _image_push(args: argparse.Namespace) -> int:
    from buildbot_dockerami.cli import images

    images.push(args.tag)
    return 0


def _userdata_show(args: argparse.Namespace) -> int:
    from buildbot_dockerami.cli.preview import preview_user_data

    print(preview_user_data(args.config, args.worker))
    return 0


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SystemExit(f"buildbot-dockerami: --build-arg wants KEY=VALUE, got {text!r}")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="buildbot-dockerami",
        description="Tools for buildbot-dockerami: elastic EC2 build machines from Docker images.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    cloud = commands.add_parser(
        "local-cloud",
        help="run a local stand-in for EC2 + the base AMI (moto on 127.0.0.1 + worker processes)",
        description="Run a moto EC2 server on 127.0.0.1 and a hypervisor that boots each running "
                    "instance's user data as a local buildbot-worker, until interrupted.",
    )
    cloud.add_argument("--port", type=int, default=5000, help="EC2 endpoint port (default 5000)")
    cloud.add_argument("--region", default="us-east-1", help="region to serve (default us-east-1)")
    cloud.add_argument("--boot-delay", type=float, default=0.0, metavar="SECONDS",
                       help="simulated boot time from RunInstances until the base AMI "
                            "starts the image (default 0)")
    cloud.add_argument("--pending-delay", type=float, default=0.0, metavar="SECONDS",
                       help="instances are 'pending' this long after RunInstances or "
                            "StartInstances, then 'running' (default 0)")
    cloud.add_argument("--pull-delay", action="append", default=[],
                       metavar="IMAGE[@TYPE]=SECONDS",
                       help="simulated image pull added to the boot of a launch, per image "
                            "and optionally per instance type (repeatable)")
    cloud.add_argument("--default-pull-delay", type=float, default=0.0, metavar="SECONDS",
                       help="pull delay for images not named by --pull-delay (default 0)")
    cloud.add_argument("--start-delay", type=float, default=None, metavar="SECONDS",
                       help="StartInstances of a stopped instance until its image starts "
                            "(no pull: it is on disk; default: the boot delay)")
    cloud.add_argument("--api-delay", type=float, default=0.0, metavar="SECONDS",
                       help="how long every EC2 call takes to be answered (default 0)")
    cloud.add_argument("--state-dir", type=Path, default=None,
                       help="where instance worker directories go, kept after exit "
                            "(default: a temp dir, removed on exit)")
    cloud.add_argument("--env-file", type=Path, default=None,
                       help="also write the AWS_* exports for the master to this file")
    cloud.add_argument("--runtime", choices=RUNTIMES, default="process",
                       help="process: a worker process per instance (no Docker needed); "
                            "container: the ami/ bootstrap on the local Docker engine; "
                            "legacy: the seed's crontab line on the local Docker engine")
    cloud.set_defaults(func=_local_cloud)

    image = commands.add_parser("image", help="build and push worker images")
    image_commands = image.add_subparsers(dest="image_command", metavar="ACTION", required=True)
    build = image_commands.add_parser(
        "build", help="build an image folder, tagged REPO:YYYY-MM-DD (today)",
        description="Build DIR/Dockerfile with the local Docker engine, never pulling, and tag "
                    "it with today's date (the seed's convention). The image is for the "
                    "engine's own architecture (amd64 or arm64); a multi-arch image is one "
                    "build per architecture joined in a manifest list "
                    "(docs/base-ami-and-image.md).",
    )
    build.add_argument("directory", type=Path, metavar="DIR", nargs="?",
                       default=assets.default_image_dir(),
                       help="image folder (default: the reference image, %(default)s)")
    build.add_argument("--repo", help="repository name (default dockerami/<DIR name>); include "
                       "the registry, e.g. registry.example.com:5000/org/worker-linux")
    build.add_argument("--tag", help="full tag instead of REPO:YYYY-MM-DD")
    build.add_argument("--base", help="local base image (build argument BASE)")
    build.add_argument("--build-arg", action="append", default=[], metavar="KEY=VALUE",
                       help="extra build argument (repeatable)")
    build.add_argument("--wheels", action="store_true",
                       help="download buildbot-worker's wheels (for the engine's architecture) "
                            "with this host's pip first, and build without a package index")
    build.set_defaults(func=_image_build)
    push_cmd = image_commands.add_parser(
        "push", help="push a tag to its registry",
        description="Push TAG; registry credentials come from the usual Docker config "
                    "(~/.docker/config.json, docker login).",
    )
    push_cmd.add_argument("tag", metavar="TAG")
    push_cmd.set_defaults(func=_image_push)

    user_data = commands.add_parser("userdata", help="inspect the user data workers send")
    ud_commands = user_data.add_subparsers(dest="ud_command", metavar="ACTION", required=True)
    show = ud_commands.add_parser(
        "show", help="print the user data a worker would send (password redacted)",
        description="Load master.cfg like `buildbot checkconfig` and print the user data that "
                    "WORKER would give its next instance, with the password redacted.",
    )
    show.add_argument("--config", type=Path, default=Path("master.cfg"),
                      help="path to master.cfg (default ./master.cfg)")
    show.add_argument("worker", metavar="WORKER")
    show.set_defaults(func=_userdata_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    from buildbot_dockerami.cli.images import ImageError
    from buildbot_dockerami.cli.preview import PreviewError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ImageError, PreviewError, MissingExtra) as e:
        print(f"buildbot-dockerami: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
