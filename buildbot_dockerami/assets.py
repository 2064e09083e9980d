"""Where the instance-side files are: ``ami/`` (the base-AMI bootstrap, its systemd unit,
the seed's crontab line, the Packer template) and ``images/`` (the reference worker
image).

In a checkout they sit at the top of the repository, where operators read them; a
wheel carries them inside the package (``_assets/``, mapped by setup.py). Both layouts
are looked for, the installed one first, so the CLI's default image folder and the local
cloud's bootstrap work from a wheel as from a clone.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def _find(name: str, marker: str) -> Path:
    candidates = (_PACKAGE / "_assets" / name, _PACKAGE.parent / name)
    for candidate in candidates:
        if (candidate / marker).exists():
            return candidate
    return candidates[0]  # absent everywhere: the error names where it should be


def ami_dir() -> Path:
    """The folder with ``dockerami-bootstrap.sh``, ``legacy-crontab`` and ``packer/``."""
    return _find("ami", "dockerami-bootstrap.sh")


def images_dir() -> Path:
    """The folder of reference worker images (``worker-linux/``)."""
    return _find("images", "worker-linux/Dockerfile")


def default_image_dir() -> Path:
    """What ``buildbot-dockerami image build`` builds when no folder is given."""
    return images_dir() / "worker-linux"
