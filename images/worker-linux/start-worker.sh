#!/bin/sh
# Entry script of the worker image: configure the buildbot worker and run it in the
# foreground. The configuration comes from the first of:
#   1. DOCKERAMI_USER_DATA_FILE: the instance user data, mounted by the base AMI's bootstrap;
#   2. WORKERNAME, WORKERPASS, BUILDMASTER[, BUILDMASTER_PORT]: environment variables, as
#      buildbot's own worker images use (optional SETUP_REPO, SETUP_BRANCH);
#   3. the instance user data from the metadata service (IMDSv2 token, then v1), as the
#      seed's images did; DOCKERAMI_IMDS overrides http://169.254.169.254.
# With user-data line "isolation=container" (or DOCKERAMI_ONE_CONNECTION=1) the worker
# exits when its connection ends, so every build gets a fresh container. With
# "tls.sha256=<fingerprint>" (or MASTER_TLS_SHA256) it connects over TLS to a master
# whose certificate has exactly that SHA-256 fingerprint, and to no other.
# Under the bootstrap (DOCKERAMI_HOST_DIR) the worker reports the instance's retirement
# (its disk stays too full) as worker info, and (DOCKERAMI_CACHE_REQUESTS) asks for its
# builder's caches when a build starts, before any step runs.
# User-data lines: 1 "name password host:port", 2 image, 3 setup repo, 4 setup branch.
# When a setup repo is given it is cloned and its setup script run (seed behaviour).
set -eu

log() { echo "start-worker: $*" >&2; }

user_data_line() { printf '%s\n' "$USER_DATA" | sed -n "${1}p"; }

imds_get() {
    imds=${DOCKERAMI_IMDS:-http://169.254.169.254}
    token=$(curl -sf --max-time 5 -X PUT -H "X-aws-ec2-metadata-token-ttl-seconds: 300" \
        "$imds/latest/api/token") || token=""
    if [ -n "$token" ]; then
        curl -sf --max-time 10 -H "X-aws-ec2-metadata-token: $token" "$imds/latest/$1"
    else
        log "no IMDSv2 token; trying IMDSv1"
        curl -sf --max-time 10 "$imds/latest/$1"
    fi
}

fetch_user_data() { imds_get user-data; }

if [ -n "${DOCKERAMI_USER_DATA_FILE:-}" ] || [ -z "${WORKERNAME:-}" ]; then
    if [ -n "${DOCKERAMI_USER_DATA_FILE:-}" ]; then
        USER_DATA=$(cat "$DOCKERAMI_USER_DATA_FILE")
    else
        USER_DATA=$(fetch_user_data) || { log "cannot read user data from the metadata service"; exit 1; }
        FROM_IMDS=1
    fi
    # Line 1 is three words by protocol: split on spaces, never glob (a password may
    # be `.*`).
    set -f
    # shellcheck disable=SC2046
    set -- $(user_data_line 1)
    set +f
    if [ $# -ne 3 ]; then
        log "user data line 1 must be '<name> <password> <host>:<port>'"
        exit 1
    fi
    WORKERNAME=$1 WORKERPASS=$2 BUILDMASTER=${3%:*} BUILDMASTER_PORT=${3##*:}
    SETUP_REPO=$(user_data_line 3) SETUP_BRANCH=$(user_data_line 4)
    # isolation=container (line 5+): this container serves one connection, then exits.
    if printf '%s\n' "$USER_DATA" | sed -n '5,$p' | grep -qx 'isolation=container'; then
        DOCKERAMI_ONE_CONNECTION=1
    fi
    MASTER_TLS_SHA256=$(printf '%s\n' "$USER_DATA" | sed -n '5,$p' \
        | sed -n 's/^tls\.sha256=//p' | head -n 1)
fi
: "${WORKERPASS:?WORKERPASS is required}" "${BUILDMASTER:?BUILDMASTER is required}"
BUILDMASTER_PORT=${BUILDMASTER_PORT:-9989}
SETUP_REPO=${SETUP_REPO:-} SETUP_BRANCH=${SETUP_BRANCH:-}

if [ -n "$SETUP_REPO" ]; then
    # Never an option to git (`--upload-pack=...` runs a command), whatever it says.
    case $SETUP_REPO in -*) log "refusing a setup repo that starts with -"; exit 1 ;; esac
    case $SETUP_BRANCH in -*) log "refusing a setup branch that starts with -"; exit 1 ;; esac
    log "cloning $SETUP_REPO ${SETUP_BRANCH:+(branch $SETUP_BRANCH)}"
    rm -rf "$HOME/setup"
    # Shallow first; dumb-HTTP servers cannot do shallow, so then a full clone. Options
    # are joined to their values and `--` ends them, so no value is read as an option.
    git -c protocol.ext.allow=never clone --quiet --depth 1 \
        ${SETUP_BRANCH:+"--branch=$SETUP_BRANCH"} -- "$SETUP_REPO" "$HOME/setup" 2>/dev/null \
        || { rm -rf "$HOME/setup"
             git -c protocol.ext.allow=never clone --quiet \
                 ${SETUP_BRANCH:+"--branch=$SETUP_BRANCH"} -- "$SETUP_REPO" "$HOME/setup"; }
    for script in setup-worker.sh setup-slave.sh; do
        if [ -f "$HOME/setup/$script" ]; then
            log "running $script"
            (cd "$HOME/setup" && sh "./$script")
            break
        fi
    done
fi

BASEDIR=${WORKER_BASEDIR:-$HOME/worker}
mkdir -p "$BASEDIR"
# Tell the master which instance this worker runs on (worker info "instance_id"): it
# accepts a connection only from the instance it launched for this worker. The
# bootstrap passes the id; under the seed's crontab the metadata service tells.
INSTANCE_ID=${DOCKERAMI_INSTANCE_ID:-}
if [ -z "$INSTANCE_ID" ] && [ "${FROM_IMDS:-0}" = 1 ]; then
    INSTANCE_ID=$(imds_get meta-data/instance-id 2>/dev/null) || INSTANCE_ID=""
fi
mkdir -p "$BASEDIR/info"
case $INSTANCE_ID in
    i-*) printf '%s' "$INSTANCE_ID" > "$BASEDIR/info/instance_id" ;;
    *) rm -f "$BASEDIR/info/instance_id" ;;
esac
# When the image was ready on the instance (epoch seconds) and whether it was on the
# disk already ("present": baked into the AMI) or how many seconds its pull took, as
# the bootstrap tells: the master shows an "image ready" step in its timeline.
case ${DOCKERAMI_IMAGE_READY:-} in
    "" | *[!0-9.]*) rm -f "$BASEDIR/info/image_ready" ;;
    *) printf '%s' "$DOCKERAMI_IMAGE_READY" > "$BASEDIR/info/image_ready" ;;
esac
case ${DOCKERAMI_IMAGE_PULL:-} in
    present) printf present > "$BASEDIR/info/image_pull" ;;
    "" | *[!0-9.]*) rm -f "$BASEDIR/info/image_pull" ;;
    *) printf '%s' "$DOCKERAMI_IMAGE_PULL" > "$BASEDIR/info/image_pull" ;;
esac
# Which image this is (its repository digest, as the bootstrap read it): the master
# drains the instance once the image's tag points at another one (image refresh).
case ${DOCKERAMI_IMAGE_DIGEST:-} in
    sha256:*[!0-9a-f]*) rm -f "$BASEDIR/info/image_digest" ;;
    sha256:????????????????????????????????????????????????????????????????)
        printf '%s' "$DOCKERAMI_IMAGE_DIGEST" > "$BASEDIR/info/image_digest" ;;
    *) rm -f "$BASEDIR/info/image_digest" ;;
esac
# The resource limits this container got (container_limits, applied by the bootstrap),
# as its cgroup says (v2, else v1), for the master's Fleet page:
# "memory=<bytes> pids=<tasks> cpus=<CPUs>", "max" for no limit.
cgroup_read() { head -n 1 "$1" 2>/dev/null || true; }
container_limits() {
    if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
        memory=$(cgroup_read /sys/fs/cgroup/memory.max)
        pids=$(cgroup_read /sys/fs/cgroup/pids.max)
        cpu=$(cgroup_read /sys/fs/cgroup/cpu.max)     # "<quota> <period>", quota "max"
        quota=${cpu% *} period=${cpu#* }
    else
        memory=$(cgroup_read /sys/fs/cgroup/memory/memory.limit_in_bytes)
        pids=$(cgroup_read /sys/fs/cgroup/pids/pids.max)
        quota=$(cgroup_read /sys/fs/cgroup/cpu/cpu.cfs_quota_us)     # -1: none
        period=$(cgroup_read /sys/fs/cgroup/cpu/cpu.cfs_period_us)
    fi
    # cgroup v1 says "no limit" with a number near 2^63.
    case $memory in "" | *[!0-9]*) ;; *) [ "${#memory}" -lt 19 ] || memory=max ;; esac
    case $quota:$period in
        max:* | -1:* | :* | *:) cpus=max ;;
        *) cpus=$(awk -v q="$quota" -v p="$period" 'BEGIN { printf "%.2f", q / p }') ;;
    esac
    [ -n "$memory" ] && [ -n "$pids" ] || return 1
    printf 'memory=%s pids=%s cpus=%s' "$memory" "$pids" "$cpus"
}
if limits=$(container_limits); then
    printf '%s' "$limits" > "$BASEDIR/info/container_limits"
else
    rm -f "$BASEDIR/info/container_limits"
fi
# Why the instance retires, when its bootstrap says so (worker info dockerami_retired,
# read by the master whenever the worker asks to shut down, and when it connects).
if [ -n "${DOCKERAMI_HOST_DIR:-}" ]; then
    ln -sfn "$DOCKERAMI_HOST_DIR/retired" "$BASEDIR/info/dockerami_retired"
else
    rm -f "$BASEDIR/info/dockerami_retired"
fi
case $BUILDMASTER_PORT in "" | *[!0-9]*) log "bad master port '$BUILDMASTER_PORT'"; exit 1 ;; esac

# TLS, pinned: fetch the master's certificate, refuse it unless its SHA-256 fingerprint
# is the pinned one, then make it the only trusted certificate of the worker's own TLS
# connection (so the check is not merely done once, before it).
pin_master_certificate() {
    want=$(printf '%s' "$MASTER_TLS_SHA256" | tr -d : | tr 'A-F' 'a-f')
    ca="$BASEDIR/master-ca"
    rm -rf "$ca"
    mkdir -p "$ca"
    attempt=1
    until openssl s_client -connect "$BUILDMASTER:$BUILDMASTER_PORT" </dev/null 2>/dev/null \
            | openssl x509 -outform PEM > "$ca/master.pem" 2>/dev/null; do
        if [ "$attempt" -ge 60 ]; then
            log "FATAL: no TLS certificate from the master at $BUILDMASTER:$BUILDMASTER_PORT"
            exit 1
        fi
        log "no TLS answer from $BUILDMASTER:$BUILDMASTER_PORT (attempt $attempt); retrying"
        sleep 5
        attempt=$((attempt + 1))
    done
    got=$(openssl x509 -in "$ca/master.pem" -noout -fingerprint -sha256 | sed 's/.*=//' \
        | tr -d : | tr 'A-F' 'a-f')
    if [ "$got" != "$want" ]; then
        log "FATAL: the master at $BUILDMASTER:$BUILDMASTER_PORT presented a TLS certificate" \
            "with SHA-256 fingerprint $got, not the pinned $want; not connecting"
        exit 1
    fi
    log "master certificate pinned (SHA-256 $got)"
}
TLS=0
if [ -n "${MASTER_TLS_SHA256:-}" ]; then
    pin_master_certificate
    TLS=1
fi
# The password goes to a file read by buildbot.tac, never onto a command line; the
# other values too, so that no value is ever read as Python.
umask 077
printf '%s' "$WORKERPASS" > "$BASEDIR/.password"
printf '%s\n' "$WORKERNAME" "$BUILDMASTER" "$BUILDMASTER_PORT" \
    "${DOCKERAMI_ONE_CONNECTION:-0}" "$TLS" > "$BASEDIR/.worker"
umask 022
cat > "$BASEDIR/buildbot.tac" <<'TAC'
import os
from buildbot_worker.bot import Worker
from twisted.application import service

basedir = os.path.abspath(os.path.dirname(__file__))
application = service.Application('buildbot-worker')
with open(os.path.join(basedir, ".password")) as f:
    passwd = f.read()
with open(os.path.join(basedir, ".worker")) as f:
    name, host, port, one_connection, tls = f.read().split("\n")[:5]
options = dict(keepalive=60, umask=0o022, maxdelay=10, allow_shutdown="signal",
               maxRetries=None)
if tls == "1":
    # Verified against the pinned certificate only (start-worker checked its fingerprint).
    ca = os.path.join(basedir, "master-ca")
    connection = f"ssl:host={host.replace(':', chr(92) + ':')}:port={port}:caCertsDir={ca}"
    worker = Worker(None, None, name, passwd, basedir, connection_string=connection, **options)
else:
    worker = Worker(host, int(port), name, passwd, basedir, **options)
worker.setServiceParent(application)

if one_connection == "1":
    # Per-build isolation: when the master drops this connection (after the build),
    # exit instead of reconnecting, so the next build gets a fresh container.
    from twisted.internet import reactor

    connected = worker.bf.gotPerspective

    def serve_one_connection(perspective):
        perspective.broker.notifyOnDisconnect(lambda: reactor.callLater(0, reactor.stop))
        return connected(perspective)

    worker.bf.gotPerspective = serve_one_connection

# Out of memory (container_limits): the kernel's OOM killer ends a command that takes
# its container past the memory limit with SIGKILL, which buildbot reports only as
# "killed by signal 9" (or exit code 137, 128 + 9, from a shell whose child it was).
# The container's cgroup counts OOM kills: a command that ended so while the count rose
# gets a line in its step's log that says why. Its processes are also the OOM killer's
# first choice, before the worker (whose death would end the build).
from buildbot_worker.runprocess import RunProcess

OOM_COUNTERS = ("/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control")
MEMORY_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def oom_kills():
    for path in OOM_COUNTERS:
        try:
            with open(path) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            pass
    return None


def memory_limit():
    for path in MEMORY_LIMITS:
        try:
            with open(path) as f:
                value = f.read().strip()
        except OSError:
            continue
        if value.isdigit() and len(value) < 19:
            return f"{int(value) / 1048576:g} MiB"
        return "none"
    return "unknown"


start_command, spawn_process, command_finished = (
    RunProcess.start, RunProcess._spawnProcess, RunProcess.finished)


def start_counting(self):
    self.oom_kills_before = oom_kills()
    return start_command(self)


def spawn_oom_first(self, *args, **kwargs):
    process = spawn_process(self, *args, **kwargs)
    try:
        with open(f"/proc/{process.pid}/oom_score_adj", "w") as f:
            f.write("500")  # inherited by what it starts
    except (OSError, AttributeError, TypeError):
        pass
    return process


def finished_explained(self, sig, rc):
    before, after = getattr(self, "oom_kills_before", None), oom_kills()
    killed_by_us = getattr(getattr(self, "pp", None), "killed", False)
    if ((sig == 9 or (sig is None and rc == 137)) and self.sendRC and not killed_by_us
            and None not in (before, after) and after > before):
        self.send_update([("header", (
            "\nout of memory: the kernel's OOM killer killed this command (OOM-killed): "
            f"its container reached its memory limit ({memory_limit()}, container_limits)\n"))])
    return command_finished(self, sig, rc)


RunProcess.start = start_counting
RunProcess._spawnProcess = spawn_oom_first
RunProcess.finished = finished_explained


requests = os.environ.get("DOCKERAMI_CACHE_REQUESTS")
answers = os.environ.get("DOCKERAMI_HOST_DIR")
if requests and answers:
    # Caches that survive isolation: when a build starts (the master's startBuild, before
    # any step), ask the bootstrap to attach this builder's cache volumes, and start the
    # build once they are there.
    import secrets

    from buildbot_worker.pb import WorkerForBuilderPbLike
    from twisted.internet import reactor, task

    def attach_caches(builder):
        ident = secrets.token_hex(8)
        request = os.path.join(requests, "cache")
        with open(request + ".new", "w") as f:
            f.write(f"{ident}\n{builder}\n")
        os.replace(request + ".new", request)
        answer = os.path.join(answers, f"cache.{ident}")
        deadline = reactor.seconds() + 120

        def look():
            if os.path.exists(answer):
                with open(answer) as f:
                    text = f.read().strip()
                if text != "ok":
                    raise RuntimeError(f"caches of builder {builder!r}: {text}")
                return None
            if reactor.seconds() > deadline:
                raise RuntimeError(f"caches of builder {builder!r}: no answer from the bootstrap")
            return task.deferLater(reactor, 0.05, look)

        return task.deferLater(reactor, 0, look)

    start_build = WorkerForBuilderPbLike.remote_startBuild

    def remote_startBuild(self):
        return attach_caches(self.name).addCallback(lambda _: start_build(self))

    WorkerForBuilderPbLike.remote_startBuild = remote_startBuild
TAC
unset WORKERPASS USER_DATA
log "worker $WORKERNAME connecting to $BUILDMASTER:$BUILDMASTER_PORT"
cd "$BASEDIR"
# Foreground, logging to stdout: `docker logs` and the host's journal show the worker.
exec /opt/buildbot-worker/bin/twistd --nodaemon --pidfile= --logfile=- --python=buildbot.tac
