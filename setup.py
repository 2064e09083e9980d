"""Packaging that setup.cfg cannot say: the instance-side folders ami/ and images/ stay
at the top of the checkout (operators read them there) and are mapped into the package
as ``buildbot_dockerami._assets.ami`` / ``._assets.images`` when a wheel is built, so an
installed copy has the bootstrap and the reference image too (see assets.py)."""

from pathlib import Path

from setuptools import find_packages, setup

ASSETS = {
    "buildbot_dockerami._assets.ami": "ami",
    "buildbot_dockerami._assets.images": "images",
}


def files_under(top: str) -> list[str]:
    """Every file below ``top``, except wheels fetched for an image build (its wheels/
    folder itself is kept: the Dockerfile copies it)."""
    return sorted(
        str(path.relative_to(top)) for path in Path(top).rglob("*")
        if path.is_file() and path.suffix != ".whl" and "__pycache__" not in path.parts
    )


setup(
    packages=[*find_packages(include=["buildbot_dockerami", "buildbot_dockerami.*"]), *ASSETS],
    package_dir=ASSETS,
    package_data={
        "buildbot_dockerami.www": ["VERSION", "static/*"],
        **{package: files_under(top) for package, top in ASSETS.items()},
    },
)
