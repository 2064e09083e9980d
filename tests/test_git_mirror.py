"""The MirroredGit step (steps/mirror.py; issue 20, part 3).

Without a master: the mirror's name, the masked URL, the checks, and the update script
waiting for another build's lock. With a real master and the local cloud's process
runtime (its workers run on this host, so a file:// origin serves them): the first
build creates the mirror and borrows from it, the next one updates it and checks out
a new commit, a corrupt mirror is removed without failing the build and re-created by
the next one, and a password in the URL appears in no log. The same on a real Docker
engine, in fresh containers with the mirror in a cache: tests/containers/test_git_mirror.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from buildbot.config.errors import capture_config_errors
from buildbot.process.properties import Interpolate

from buildbot_dockerami.steps import mirror
from tests.harness import FAILURE, SUCCESS, free_port, master_cfg
from tests.helpers import MIRRORED_BUILDER, git_commit, git_origin, mirrored_build

# -- without a master ---------------------------------------------------------------


@pytest.mark.parametrize(("url", "expected"), [
    ("https://user:s3cret@git.example.com/org/app.git", "https://***@git.example.com/org/app.git"),
    ("https://t0ken@git.example.com/app", "https://***@git.example.com/app"),
    ("ssh://git@git.example.com:2222/app.git", "ssh://***@git.example.com:2222/app.git"),
    ("https://git.example.com/app.git", "https://git.example.com/app.git"),
    ("git@git.example.com:org/app.git", "git@git.example.com:org/app.git"),  # no secret
    ("file:///srv/git/app.git", "file:///srv/git/app.git"),
    ("https://user:p@ss@git.example.com/app", "https://***@git.example.com/app"),
    ("https://git.example.com/app?access_token=s3cret", "https://git.example.com/app?***"),
])
def test_printed_urls_have_their_user_information_masked(url, expected):
    assert mirror.masked(url) == expected


def test_a_mirror_is_named_after_host_and_path_whatever_the_credentials():
    name = mirror.mirror_name("https://git.example.com/org/app.git")
    assert name.startswith("git.example.com_org_app-") and name.endswith(".git")
    assert mirror.mirror_name("https://user:s3cret@git.example.com/org/app.git") == name
    assert mirror.mirror_name("https://git.example.com/org/app/") == name
    assert "s3cret" not in mirror.mirror_name("https://user:s3cret@git.example.com/x")
    others = {mirror.mirror_name(url) for url in (
        "https://git.example.com/org/app.git", "https://git.example.com:8443/org/app.git",
        "https://git.example.com/org-app.git", "ssh://git@git.example.com/org/app.git",
        "git@git.example.com:org/app.git", "file:///srv/git/app.git", "/srv/git/app.git")}
    assert len(others) == 7
    # A malformed port does not raise (urlsplit's port would, quoting the password).
    assert "pa" not in mirror.mirror_name("https://user:pa/ss@host/r")
    assert mirror.mirror_name("https://h:99999/r").startswith("h_99999_r-")
    assert all(n.endswith(".git") and "/" not in n and len(n) <= 100 for n in others)


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"repourl": "https://git.example.com/app.git", "mirrors": "git-mirrors"},
     "MirroredGit: mirrors: must be an absolute path on the worker"),
    ({"repourl": "https://git.example.com/app.git", "mirrors": 5},
     "MirroredGit: mirrors: must be an absolute path"),
    ({"repourl": None}, "MirroredGit: repourl: must be a repository URL"),
    ({"repourl": 7}, "MirroredGit: repourl: must be a repository URL (a string or a "
                     "renderable), not int"),
    ({"repourl": "--upload-pack=touch /tmp/x"}, "would be read by git as an option or a "
                                                 "command"),
    ({"repourl": "ext::sh -c touch% /tmp/x"}, "would be read by git as an option"),
    ({"repourl": "https://git.example.com/app.git", "reference": "/srv/ref.git"},
     "MirroredGit: reference: the mirror is the step's reference"),
])
def test_bad_settings_are_named_at_checkconfig(kwargs, expected):
    with capture_config_errors() as errors:
        mirror.MirroredGit(**kwargs)
    assert any(expected in e for e in errors.errors), errors.errors


def test_good_settings_and_a_renderable_repourl_pass():
    for kwargs in ({"repourl": "https://git.example.com/app.git"},
                   {"repourl": Interpolate("%(prop:repo)s"), "mirrors": "/cache/git",
                    "mode": "full", "method": "clobber"}):
        with capture_config_errors() as errors:
            mirror.MirroredGit(**kwargs)
        assert errors.errors == [], kwargs


@pytest.mark.skipif(not shutil.which("flock"), reason="flock (util-linux) is not installed")
def test_the_update_waits_for_another_builds_lock(tmp_path):
    """The update script itself, as the worker runs it: while another build holds the
    mirror's lock it says so and waits; once that is released it creates the mirror."""
    origin, _ = git_origin(tmp_path)
    target = tmp_path / "mirrors" / "app.git"
    target.parent.mkdir()
    lock = f"{target}.lock"
    holder = subprocess.Popen(["flock", lock, "sh", "-c", "echo held; cat >/dev/null"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    update = None
    try:
        assert holder.stdout.readline() == "held\n"
        env = {**os.environ, mirror.URL_VAR: f"file://{origin}",
               "DOCKERAMI_MIRROR_PROGRESS": ""}
        update = subprocess.Popen(["sh", "-c", mirror.UPDATE, "mirror", str(target), lock, "git"],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True)
        assert update.stdout.readline() == (f"mirror: another build is updating {target}; "
                                            "waiting for it\n")
        assert not target.exists()  # not while the other holds the lock
        holder.stdin.close()
        assert holder.wait(timeout=30) == 0
        rest = update.stdout.read()
        assert update.wait(timeout=60) == 0, rest
        assert f"mirror: creating {target} (first clone)" in rest
        refs = subprocess.run(["git", "--git-dir", str(target), "show-ref"], check=True,
                              capture_output=True, text=True).stdout
        assert refs.endswith(" refs/heads/main\n"), refs
    finally:
        for process in (holder, update):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()


# -- with a real master and the process runtime's workers -----------------------------

def _build(master) -> tuple[dict, str, str]:
    return mirrored_build(master, 120)


@pytest.mark.integration
def test_builds_clone_through_the_mirror_and_a_corrupt_one_is_replaced(make_master, tmp_path):
    origin, work = git_origin(tmp_path)
    url = f"file://{origin}"
    mirrors = tmp_path / "mirrors"
    target = mirrors / mirror.mirror_name(url)
    master = make_master(master_cfg(build_wait_timeout=60)
                         + MIRRORED_BUILDER.format(repourl=repr(url), mirrors=str(mirrors)))

    # 1: the mirror is created, and the clone borrows its objects.
    build, git_log, show = _build(master)
    assert build["results"] == SUCCESS, git_log + show
    assert f"mirror: creating {target} (first clone)" in git_log, git_log
    assert f"--reference {target}" in git_log, git_log
    assert f"alternates={target}/objects\n" in show, show
    assert " one\n" in show, show

    # 2: a new commit: the mirror is updated, and the build checks it out.
    second = git_commit(work, "two")
    build, git_log, show = _build(master)
    assert build["results"] == SUCCESS, git_log + show
    assert f"mirror: updating {target}" in git_log, git_log
    assert f"mirror: creating {target}" not in git_log, git_log
    assert f"head={second} two\n" in show, show
    assert f"alternates={target}/objects\n" in show, show
    mirrored = subprocess.run(["git", "--git-dir", str(target), "rev-parse", "main"],
                              check=True, capture_output=True, text=True).stdout.strip()
    assert mirrored == second

    # 3: a corrupt mirror: removed, and the build clones without it.
    shutil.rmtree(target / "objects")
    build, git_log, show = _build(master)
    assert build["results"] == SUCCESS, git_log + show
    assert "the mirror is corrupt; it was removed and the next build clones it afresh; " \
           "cloning without it" in git_log, git_log
    assert "--reference" not in git_log.split("cloning without it", 1)[1], git_log
    assert "alternates=\n" in show and f"head={second} two\n" in show, show
    assert not target.exists()

    # 4: the next build creates it again.
    build, git_log, show = _build(master)
    assert build["results"] == SUCCESS, git_log + show
    assert f"mirror: creating {target} (first clone)" in git_log, git_log
    assert f"alternates={target}/objects\n" in show, show

    # 4b: refs intact but an object gone (the update passes, the clone through it
    # cannot check out): the build clones once more without the mirror and succeeds.
    blob = subprocess.run(["git", "--git-dir", str(target), "rev-parse", "main:file.txt"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (target / "objects" / blob[:2] / blob[2:]).unlink()  # a small fetch keeps it loose
    build, git_log, show = _build(master)
    assert build["results"] == SUCCESS, git_log + show
    assert "mirror: the clone with --reference failed; cloning again without the mirror" \
        in git_log, git_log
    assert "alternates=\n" in show and f"head={second} two\n" in show, show

    # 5: the origin unreachable: the update fails, the mirror is kept for later; the
    # build's own clone fails too (nothing to clone from), as it would without a mirror.
    origin.rename(tmp_path / "away.git")
    build, git_log, _ = _build(master)
    assert build["results"] == FAILURE
    assert "the update failed; the mirror is kept for the next build; cloning without it" \
        in git_log, git_log
    assert (target / "objects").is_dir()
    assert target.with_name(target.name + ".lock").exists()
    assert sorted(p.name for p in mirrors.iterdir()) == [target.name, target.name + ".lock"]


@pytest.mark.integration
def test_a_password_in_the_url_is_in_no_log(make_master, tmp_path):
    """The password is a buildbot secret in the URL (as buildbot's docs advise): the
    step's own lines show the URL masked, and no log has the password. Nothing listens
    on the port: the mirror's first clone fails, so does the build's."""
    secrets = tmp_path / "secrets"
    secrets.mkdir(mode=0o700)
    (secrets / "gitpw").write_text("s3cretpw")
    (secrets / "gitpw").chmod(0o600)
    port = free_port()
    repourl = f"util.Interpolate('http://ci:%(secret:gitpw)s@127.0.0.1:{port}/app.git')"
    master = make_master(
        master_cfg(build_wait_timeout=60)
        + MIRRORED_BUILDER.format(repourl=repourl, mirrors=str(tmp_path / "mirrors"))
        + f"from buildbot.plugins import secrets\n"
          f"c['secretsProviders'] = [secrets.SecretInAFile(dirname={str(secrets)!r})]\n")
    build, git_log, _ = _build(master)
    assert build["results"] == FAILURE
    assert f"mirror of http://***@127.0.0.1:{port}/app.git: " in git_log, git_log
    assert "the first clone of the mirror failed; cloning without it" in git_log, git_log
    for step in master.get(f"builds/{build['buildid']}/steps"):
        assert "s3cretpw" not in master.step_log(build["buildid"], step["name"])
    # The master's own log: buildbot 4.3 writes the commands of its Git step there with
    # the secret rendered (its clone's); the mirror's command carries no URL.
    leaks = [line for line in master.log().splitlines() if "s3cretpw" in line]
    assert leaks and all("'git', 'clone', 'http://ci:" in line for line in leaks), leaks
    assert not any((tmp_path / "mirrors").glob("*.git"))
