"""``MirroredGit``: buildbot's ``Git`` step, cloning through a per-repository mirror.

A fresh container (``isolation='container'``) starts with an empty workspace, so every
build clones the whole repository again. Kept in a cache (docs/isolation.md#caches), a
bare mirror of the repository survives the containers: before the step clones, it
brings the mirror up to date (a fetch of what changed) and clones with
``--reference`` to it, so the clone borrows the mirror's objects instead of fetching
them (the workspace's ``.git/objects/info/alternates`` names the mirror).

The mirror is an optimisation and never fails the build: if it cannot be created or
updated (no network, a corrupt mirror, a full disk), the step says so in its log,
removes a mirror it found corrupt (the next build clones it afresh) and clones without
it. Two slots of one builder share the cache and may clone at once: the update runs
under ``flock`` on ``<mirror>.lock`` (without ``flock`` on the worker, unlocked).

The update runs as one shell command on the worker, through the step's own remote
command machinery, with the ``Git`` step's environment and authentication options
(ssh key, credential store, ``config``). The mirror is made with ``git init --bare``
and fetched with a mirror's refspec, its URL given on each fetch and never stored in
it, so credentials in a URL do not end up on the cache volume; the URL goes to the
worker in an environment variable that is not logged, and the step's own messages
show it with its user information masked.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from typing import Any
from urllib.parse import urlsplit

from buildbot import config
from buildbot.interfaces import IRenderable
from buildbot.process import buildstep, remotecommand
from buildbot.steps.source.git import Git
from buildbot.util.git import RC_SUCCESS
from twisted.internet import defer

#: The default directory of the mirrors (where a cache would keep them).
MIRRORS = "/home/builder/git-mirrors"
#: Environment variable carrying the repository's URL to the worker (not logged).
URL_VAR = "DOCKERAMI_MIRROR_URL"
#: Exit codes of UPDATE beyond 0 (mirror ready), for the step's note.
OUTCOMES = {
    2: "could not lock or create the mirrors directory",
    3: "the update failed; the mirror is kept for the next build",
    4: "the mirror is corrupt; it was removed and the next build clones it afresh",
    5: "the first clone of the mirror failed",
}

# $1: mirror, $2: lock file; "$@" after them: git with the step's options. POSIX sh.
UPDATE = r"""
mirror=$1 lock=$2 url=$DOCKERAMI_MIRROR_URL progress=$DOCKERAMI_MIRROR_PROGRESS
shift 2
mkdir -p "${mirror%/*}" || exit 2
locked=no
if command -v flock >/dev/null 2>&1; then
  exec 9>>"$lock" || exit 2
  if ! flock -n 9; then
    echo "mirror: another build is updating $mirror; waiting for it"
    flock 9 || exit 2
  fi
  locked=yes
else
  echo "mirror: flock not found on the worker; updating without a lock"
fi
if [ "$locked" = yes ]; then
  # Holding the lock, nobody else writes here: what a stopped or killed update left
  # (a partial first clone, git's own lock files) is stale.
  rm -rf "$mirror".new.*
  [ -d "$mirror" ] && find "$mirror" -name '*.lock' -type f -exec rm -f {} + 2>/dev/null
fi
[ -e "$mirror" ] && [ ! -d "$mirror" ] && rm -f "$mirror"
if [ -d "$mirror" ]; then
  echo "mirror: updating $mirror"
  "$@" --git-dir="$mirror" fetch --prune $progress -- "$url" '+refs/*:refs/*' && exit 0
  if "$@" --git-dir="$mirror" rev-list --no-walk --all >/dev/null; then
    exit 3
  fi
  rm -rf "$mirror"
  exit 4
fi
echo "mirror: creating $mirror (first clone)"
new="$mirror.new.$$"
rm -rf "$new"
if "$@" init --quiet --bare "$new" \
    && "$@" --git-dir="$new" fetch $progress -- "$url" '+refs/*:refs/*'; then
  if [ -e "$mirror" ]; then rm -rf "$new"; else mv -T "$new" "$mirror" || exit 5; fi
  exit 0
fi
rm -rf "$new"
exit 5
"""

#: What the step's log shows of UPDATE.
SCRIPT_SHOWN = "<MirroredGit's update script (buildbot_dockerami/steps/mirror.py)>"


def masked(url: str) -> str:
    """``url`` with any user information (a user, a password, a token) replaced by
    ``***``, for anything the step prints."""
    url = re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/]*@", r"\1***@", url)
    return re.sub(r"\?.*$", "?***", url)  # a query may carry a token too


def mirror_name(url: str) -> str:
    """The mirror's directory name for ``url``: readable host and path, plus a hash of
    them and the scheme so that two URLs never share one. User information is left
    out, so a changed password or token keeps the mirror; so are a trailing ``.git``
    and ``/``."""
    parts = urlsplit(url)
    if parts.scheme and parts.netloc:
        # The authority after its user information, port as written (urlsplit's port
        # raises on a bad one, with part of the password in its message).
        host = parts.netloc.rpartition("@")[2]
        if ":" in host and not host.endswith("]") and not host.rsplit(":", 1)[1].isdigit():
            # Not a port: a password with an unescaped '/' split the authority.
            where = url.split("://", 1)[1].rpartition("@")[2].lower()
        else:
            where = host.lower() + parts.path
    else:  # a local path, or scp-like user@host:path
        where = url.rpartition("@")[2] if ":" in url else url
    where = where.rstrip("/")
    where = where[:-4] if where.endswith(".git") else where
    digest = hashlib.sha256(f"{parts.scheme}|{where}".encode()).hexdigest()[:10]
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", where).strip("._-")[-80:] or "repo"
    return f"{readable}-{digest}.git"


def unsafe_url(url: str) -> bool:
    """Whether git would take ``url`` as an option (``--upload-pack=...``) or run a
    command for it (``ext::``): never a repository to mirror."""
    start = url.lstrip().lower()
    return start.startswith("-") or start.startswith("ext::")


class MirroredGit(Git):
    """buildbot's ``Git`` step, cloning with ``--reference`` to a mirror of ``repourl``
    in ``mirrors`` on the worker (``<mirrors>/<name from repourl>.git``), brought up to
    date first. Every other argument is ``Git``'s, except ``reference`` (the mirror
    is the reference). Pair ``mirrors`` with a cache, e.g.
    ``caches={'git': '/home/builder/git-mirrors'}``, so the mirror outlives the
    container. The mirror is touched only when the step clones (a fresh workspace, or
    ``method='clobber'``); an incremental update of an existing workspace fetches as
    ``Git`` does."""

    name = "git"

    def __init__(self, repourl: Any = None, mirrors: str = MIRRORS, **kwargs: Any) -> None:
        super().__init__(repourl=repourl, **kwargs)
        self.mirrors = mirrors
        self._mirror_tried = False
        for problem in self._problems(kwargs):
            config.error(f"MirroredGit: {problem}")

    def _problems(self, kwargs: dict[str, Any]) -> list[str]:
        found = []
        if not (isinstance(self.repourl, str) and self.repourl.strip()) \
                and not IRenderable.providedBy(self.repourl):
            found.append(f"repourl: must be a repository URL (a string or a renderable), "
                         f"not {type(self.repourl).__name__}")
        if isinstance(self.repourl, str) and unsafe_url(self.repourl):
            found.append(f"repourl: {masked(self.repourl)!r:.80} would be read by git as an "
                         "option or a command (a leading '-', or 'ext::'), not a URL")
        if not isinstance(self.mirrors, str) or not posixpath.isabs(self.mirrors) \
                or "\n" in self.mirrors:
            found.append(f"mirrors: must be an absolute path on the worker "
                         f"(e.g. {MIRRORS!r}), not {self.mirrors!r:.60}")
        if kwargs.get("reference") is not None:
            found.append("reference: the mirror is the step's reference; use Git for "
                         "a reference of your own")
        return found

    @defer.inlineCallbacks
    def _clone(self, shallowClone: Any) -> Any:
        """Bring the mirror up to date, once per step (Git retries call _clone again),
        and clone with it as reference when that worked. A clone through the mirror
        that fails (another slot removed a corrupt mirror meanwhile, or it lacks
        objects its refs need) is done once more without it: the mirror never fails
        the build."""
        if not self._mirror_tried:
            self._mirror_tried = True
            self.reference = yield self._update_mirror()
        if self.reference is None:
            return (yield super()._clone(shallowClone))
        try:
            res = yield super()._clone(shallowClone)
        except buildstep.BuildStepFailed:  # a shallow clone gives up at once
            res = None
        if self.stopped or res == RC_SUCCESS or self.reference is None:
            return res
        yield self._note("mirror: the clone with --reference failed; cloning again "
                         "without the mirror\n")
        self.reference = None
        yield self._doClobber()
        return (yield super()._clone(shallowClone))

    def _note(self, text: str) -> Any:
        """A line of the step's own in its log, with the build's secrets masked as
        buildbot masks them in commands' output (URLs are masked() too)."""
        return self.stdio_log.addHeader(self.build.properties.cleanupTextFromSecrets(text))

    @defer.inlineCallbacks
    def _update_mirror(self) -> Any:
        """The mirror's path once up to date, else None (said in the log)."""
        try:
            return (yield self._try_update_mirror())
        except Exception as e:  # never the build's failure; the type only (no URL)
            yield self._note(f"mirror: not used ({type(e).__name__}); cloning without it\n")
            return None

    @defer.inlineCallbacks
    def _try_update_mirror(self) -> Any:
        url = str(self.repourl)
        if unsafe_url(url):
            yield self._note("mirror: the repository URL would be read by git as an option "
                             "or a command; cloning without a mirror\n")
            return None
        if self.build.path_module is not posixpath:
            yield self._note("mirror: needs a POSIX worker (sh); cloning without one\n")
            return None
        mirror = posixpath.join(self.mirrors, mirror_name(url))
        yield self._note(f"mirror of {masked(url)}: {mirror}\n")
        git = ["git"]
        env = dict(self.env) if self.env else {}
        for key, value in (self.config or {}).items():
            git += ["-c", f"{key}={value}"]
        if self._git_auth.is_auth_needed_for_git_command("fetch"):
            self._git_auth.adjust_git_command_params_for_auth(
                git, env, self._get_auth_data_workdir(), self)
        env[URL_VAR] = url
        progress = self.prog and self.supportsProgress
        env["DOCKERAMI_MIRROR_PROGRESS"] = "--progress" if progress else ""
        # git is TERMed before it is killed, as Git's own commands (no stale locks);
        # the command runs in the build's directory: the mirrors' may not exist yet.
        sigterm = None if self.workerVersionIsOlderThan("shell", "2.16") else 1
        cmd = remotecommand.RemoteShellCommand(
            ".", ["sh", "-c", ("obfuscated", UPDATE, SCRIPT_SHOWN), "mirror", mirror,
                  f"{mirror}.lock", *git],
            env=env, logEnviron=False, timeout=self.timeout, sigtermTime=sigterm)
        cmd.useLog(self.stdio_log, False)
        yield self.runCommand(cmd)
        rc = cmd.rc
        if rc == 0:
            yield self._note(f"mirror: up to date; cloning with --reference {mirror}\n")
            return mirror
        why = OUTCOMES.get(rc, f"the update ended with exit code {rc}")
        yield self._note(f"mirror: {why}; cloning without it\n")
        return None
