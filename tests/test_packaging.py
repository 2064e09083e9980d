"""The packages as a newcomer gets them: the sdist has what the tests need, and the wheel
built from it works installed alone in a fresh virtualenv (dependencies from the index,
the pip cache makes it quick)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.harness import REPO

pytestmark = pytest.mark.integration


def _run(*args: str | Path, cwd: Path | None = None, timeout: float = 600,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env=env, check=False)


def _checkout_copy(target: Path) -> Path:
    """The working tree's files as git sees them (tracked and new, not ignored): building
    in place would leave build/ and *.egg-info in the checkout."""
    listed = _run("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard",
                  cwd=REPO)
    assert listed.returncode == 0, listed.stderr
    for name in filter(None, listed.stdout.split("\0")):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("packaging")
    source = _checkout_copy(root / "checkout")
    built = _run(sys.executable, "-c",
                 "import sys; from setuptools import build_meta; "
                 "print(build_meta.build_sdist(sys.argv[1]))", root / "dist", cwd=source)
    assert built.returncode == 0, built.stderr[-3000:]
    return root / "dist" / built.stdout.strip().splitlines()[-1]


def test_sdist_has_the_tests_and_their_support_files(sdist: Path) -> None:
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    for needed in ("tests/harness.py", "tests/conftest.py", "tests/docker_support.py",
                   "tests/containers/conftest.py", "ami/dockerami-bootstrap.sh",
                   "ami/packer/base-ami.json", "images/worker-linux/Dockerfile",
                   "images/worker-linux/wheels/.gitignore", "master.cfg.example",
                   "MANIFEST.in", "dev/test", "buildbot_dockerami/www/VERSION",
                   "grafana/dockerami.json", "grafana/provisioning/dashboards.yaml",
                   "multimaster.cfg.example"):
        assert needed in names, needed
    # Every example config the tests and benches read (tests/services.py, bench/).
    examples = {p.name for p in REPO.glob("*.cfg.example")}
    assert examples <= names, examples - names
    assert not [n for n in names if n.endswith(".whl") or "__pycache__" in n]


@pytest.fixture(scope="module")
def installed(sdist: Path) -> Path:
    """A fresh virtualenv with the wheel built from the sdist and nothing else of ours."""
    root = sdist.parent.parent
    with tarfile.open(sdist) as tar:
        tar.extractall(root / "unpacked", filter="data")
    (unpacked,) = (root / "unpacked").iterdir()
    wheel = _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet",
                 "-w", root / "wheels", unpacked)
    assert wheel.returncode == 0, wheel.stderr[-3000:]
    (wheel_file,) = (root / "wheels").glob("buildbot_dockerami-*.whl")
    venv = root / "venv"
    made = _run(sys.executable, "-m", "venv", venv)
    assert made.returncode == 0, made.stderr
    pip = _run(venv / "bin" / "python", "-m", "pip", "install", "--quiet", wheel_file)
    assert pip.returncode == 0, pip.stderr[-3000:]
    return venv


def test_wheel_alone_has_its_image_folder_and_bootstrap(installed: Path) -> None:
    cli = installed / "bin" / "buildbot-dockerami"
    helped = _run(cli, "image", "build", "--help")
    assert helped.returncode == 0, helped.stderr
    text = " ".join(helped.stdout.split())
    default = text.split("default: the reference image, ", 1)[1].split(")", 1)[0]
    default = default.replace("- ", "-")  # argparse may wrap the path at a hyphen
    assert str(installed) in default, default  # inside the venv, not this checkout
    assert (Path(default) / "Dockerfile").is_file()
    assert (Path(default) / "wheels").is_dir()

    found = _run(installed / "bin" / "python", "-c",
                 "from buildbot_dockerami import assets; print(assets.ami_dir())",
                 cwd=installed)  # not this checkout's package
    ami = Path(found.stdout.strip())
    assert str(installed) in str(ami), found.stdout + found.stderr
    for name in ("dockerami-bootstrap.sh", "dockerami-bootstrap.service", "legacy-crontab",
                 "packer/base-ami.json"):
        assert (ami / name).is_file(), name


def test_wheel_alone_says_which_extra_a_command_needs(installed: Path) -> None:
    cli = installed / "bin" / "buildbot-dockerami"
    cloud = _run(cli, "local-cloud", "--port", "9", timeout=120)
    assert cloud.returncode == 1
    assert "pip install 'buildbot-dockerami[demo]'" in cloud.stderr, cloud.stderr
    assert "Traceback" not in cloud.stderr

    built = _run(cli, "image", "build", "--repo", "x/y", timeout=120)
    assert built.returncode == 1
    assert "pip install 'buildbot-dockerami[images]'" in built.stderr, built.stderr
    assert "Traceback" not in built.stderr


def test_wheel_alone_loads_as_a_buildbot_plugin(installed: Path) -> None:
    loaded = _run(installed / "bin" / "python", "-c",
                  "import buildbot_dockerami as b; from buildbot.plugins import worker; "
                  "print(b.__version__, worker.DockerAMILatentWorker.__name__)", cwd=installed)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    version = (REPO / "buildbot_dockerami" / "www" / "VERSION").read_text().strip()
    assert loaded.stdout.split() == [version, "DockerAMILatentWorker"]
