"""What a configured worker would put in its next instance's user data, for operators.

Loads master.cfg the way ``buildbot checkconfig`` does; values only known per
build (renderables) and the per-instance password are shown as placeholders.
"""

from __future__ import annotations

from pathlib import Path

from buildbot.config.errors import ConfigErrors
from buildbot.config.master import FileLoader
from buildbot.interfaces import IRenderable

from buildbot_dockerami.protocol import userdata
from buildbot_dockerami.worker.latent import DockerAMILatentWorker
from buildbot_dockerami.worker.launching import default_master_address

REDACTED = "********"


class PreviewError(Exception):
    pass


def preview_user_data(config_path: Path, worker_name: str) -> str:
    path = config_path.resolve()
    if not path.is_file():
        raise PreviewError(f"{config_path}: no such file")
    try:
        config = FileLoader(str(path.parent), path.name).loadConfig()
    except ConfigErrors as e:
        raise PreviewError(f"{config_path} has errors: {'; '.join(e.errors)}") from e
    workers = {w.name: w for w in config.workers}
    worker = workers.get(worker_name)
    if worker is None:
        raise PreviewError(f"no worker {worker_name!r} in {config_path}; it has: "
                           f"{', '.join(sorted(workers)) or 'none'}")
    if not isinstance(worker, DockerAMILatentWorker):
        raise PreviewError(f"worker {worker_name!r} is a {type(worker).__name__}, "
                           "not a DockerAMILatentWorker")
    kwargs = worker._config_kwargs  # what master.cfg passed, as buildbot keeps it

    def shown(setting: str) -> str | None:
        value = kwargs.get(setting)
        if IRenderable.providedBy(value):
            return f"<{setting}: rendered per build>"
        return value

    master = kwargs.get("master_address") or default_master_address(config.protocols)
    lines = [
        f"{worker_name} {REDACTED} {master or '<no PB port configured>'}",
        shown("image") or "<no image>",
    ]
    if kwargs.get("setup_repo") is not None:
        lines += [shown("setup_repo") or "", shown("setup_branch") or ""]
    text = "\n".join(lines)
    if len(text.encode()) > userdata.MAX_USER_DATA_BYTES:
        raise PreviewError(f"user data of {worker_name!r} exceeds EC2's 16 KiB")
    return text
