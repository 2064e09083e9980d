"""On a real Docker engine: the image CLI builds the worker image for the engine's own
architecture (its wheels fetched for it), the half of a multi-arch image one engine
makes (docs/base-ami-and-image.md#multi-architecture-worker-images)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_the_cli_builds_for_the_engines_architecture(engine, worker_image: str) -> None:
    engine.images.pull(worker_image)  # the fixture pushed it and removed it locally
    try:
        image = engine.images.get(worker_image)
        assert (image.attrs["Os"], image.attrs["Architecture"]) == (
            "linux", engine.version()["Arch"])
    finally:
        engine.images.remove(worker_image)
