"""Packaging that setup.cfg cannot say: the instance-side folders ami/ and images/ stay
at the top of the checkout (operators read them there) and are mapped into the package
as ``buildbot_dockerami._assets.ami`` / ``._assets.images`` when a wheel is built, so an
installed copy has the bootstrap and the reference image too (see assets.py)."""

from setuptools import find_packages, setup

ASSETS = {
    "buildbot_dockerami._assets.ami": "ami",
    "buildbot_dockerami._assets.images": "images",
}

setup(
    packages=[*find_packages(include=["buildbot_dockerami", "buildbot_dockerami.*"]), *ASSETS],
    package_dir=ASSETS,
    package_data={
        "buildbot_dockerami.www": ["VERSION", "static/*"],
        "buildbot_dockerami._assets.ami": ["*", "packer/*"],
        # wheels/ only with its .gitignore: the folder the Dockerfile copies, no wheels.
        "buildbot_dockerami._assets.images": ["*", "*/*", "*/wheels/.gitignore"],
    },
)
