"""The ``buildbot-dockerami`` command: operator tools around the worker."""

from __future__ import annotations

import argparse
import logging
import shlex
import signal
import sys
import threading
from pathlib import Path

from buildbot_dockerami import __version__


def _local_cloud(args: argparse.Namespace) -> int:
    from buildbot_dockerami.localcloud import LocalCloud

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cloud = LocalCloud(state_dir=args.state_dir, port=args.port, region=args.region,
                       boot_delay=args.boot_delay)
    try:
        cloud.start()
    except OSError as e:
        print(f"buildbot-dockerami: cannot start the local cloud on port {args.port}: {e}",
              file=sys.stderr)
        return 1
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in cloud.env().items())
    if args.env_file:
        Path(args.env_file).write_text(exports)
    print(f"local cloud: EC2 endpoint {cloud.endpoint_url}, base AMI {cloud.base_ami_id}")
    print("point a master at it with:\n" + exports, flush=True)
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    stopped.wait()
    cloud.stop()
    return 0


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
                       help="simulated boot time before an instance's worker starts")
    cloud.add_argument("--state-dir", type=Path, default=None,
                       help="where instance worker directories go (default: a temp dir)")
    cloud.add_argument("--env-file", type=Path, default=None,
                       help="also write the AWS_* exports for the master to this file")
    cloud.set_defaults(func=_local_cloud)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
