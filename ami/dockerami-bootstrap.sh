#!/bin/sh
# dockerami-bootstrap: run the worker image named in this instance's user data.
#
# Replaces the seed's `@reboot sleep 20 && docker run ...` crontab line. Run by
# dockerami-bootstrap.service (systemd restarts it, and so the container, if it exits):
#   1. wait until dockerd answers;
#   2. read the user data from the metadata service (IMDSv2 token; v1 if no token)
#      into a root-only directory, and close the metadata service to containers;
#   3. pull the image named on line 2, retrying with backoff, progress in the journal,
#      then say whether it was already present (baked into the AMI) or how long it took;
#   4. run it with host networking, one container per slot (user-data extension
#      slots=N), each replaced by a fresh one whenever it exits. A container sees only
#      its own slot's credential (a user-data file with its own line 1), never the
#      instance's user data nor other slots' secrets. It is told when the image was
#      ready and how (DOCKERAMI_IMAGE_READY: epoch seconds; DOCKERAMI_IMAGE_PULL:
#      "present" or the pull's seconds), for the master's provisioning timeline, and
#      which image it is (DOCKERAMI_IMAGE_DIGEST: the repository digest of the image
#      reference, sha256:..., empty if none), for the master's image refresh.
#      Each container gets the memory, pids and CPU limits of the user-data extensions
#      limits.memory/pids/cpus (container_limits); with several slots, a limit not
#      given defaults to a share that keeps the slots from starving each other.
#   5. attach each build's builder's caches (cache.<name>=<path>) to its container, and
#      keep the disk's free space above a floor (disk.floor=), pruning, else retiring
#      the instance (see "caches and disk hygiene" below).
# If the image cannot be pulled at all, it says why on the console and powers the
# instance off (EC2 then terminates it), so the master sees the failure at once; a
# registry that refuses the credentials (or their absence) ends it at the first pull,
# in one FATAL line, with no retries.
# Private registries (docs/base-ami-and-image.md, "Private registries and ECR"), always
# with the instance's own role, never a secret in the user data:
#   - an ECR image: its host goes into credHelpers of the pull's Docker config, so
#     docker-credential-ecr-login (amazon-ecr-credential-helper) gets a token;
#   - extension registry.credentials=ssm:<parameter> or secretsmanager:<secret>: the
#     value, {"username": ..., "password": ...}, is fetched with the aws CLI and given
#     to `docker login --password-stdin`, in a Docker config under the root-only state
#     directory that no container mounts, and removed once the image is pulled.
#
# Settings (environment, e.g. from /etc/default/dockerami-bootstrap):
DOCKER=${DOCKER:-docker}
IMDS=${DOCKERAMI_IMDS:-http://169.254.169.254}
STATE_DIR=${DOCKERAMI_STATE_DIR:-/run/dockerami}
CONTAINER=${DOCKERAMI_CONTAINER:-dockerami-worker}
DOCKER_WAIT=${DOCKERAMI_DOCKER_WAIT:-300}          # seconds to wait for dockerd
PULL_ATTEMPTS=${DOCKERAMI_PULL_ATTEMPTS:-12}       # then give up and power off
PULL_MAX_DELAY=${DOCKERAMI_PULL_MAX_DELAY:-30}     # backoff cap between pulls, seconds
RUN_OPTIONS=${DOCKERAMI_RUN_OPTIONS:-}             # extra `docker run` options
POWEROFF=${DOCKERAMI_POWEROFF:-systemctl poweroff}
AWS=${DOCKERAMI_AWS:-aws}                          # the aws CLI, for registry.credentials
# Containers' processes carry this supplementary group; the firewall rejects its
# traffic to the metadata service. "no" leaves the metadata service open to them
# (only for images that read the user data themselves, like the seed's).
BLOCK_METADATA=${DOCKERAMI_BLOCK_METADATA:-yes}
CONTAINER_GID=${DOCKERAMI_CONTAINER_GID:-64999}
IPTABLES=${DOCKERAMI_IPTABLES:-iptables}
FIREWALL_TAG=${DOCKERAMI_FIREWALL_TAG:-dockerami-bootstrap}   # comment on our rules
SPOT_POLL=${DOCKERAMI_SPOT_POLL:-5}               # seconds between interruption checks
# With several slots, each container's default memory limit is an equal share of what
# the host keeps for itself beyond this (MiB; at most a quarter of its memory).
HOST_MEMORY_MB=${DOCKERAMI_HOST_MEMORY_MB:-512}
DEFAULT_PIDS=${DOCKERAMI_DEFAULT_PIDS:-4096}       # and at most this many tasks each
DISK_PATH=${DOCKERAMI_DISK_PATH:-}                # kept above the floor (default: Docker's root)
DISK_FLOOR=${DOCKERAMI_DISK_FLOOR:-10%}           # unless the user data says (disk.floor=)
DISK_POLL=${DOCKERAMI_DISK_POLL:-60}              # seconds between two free-space checks
PRUNE_FILTER=${DOCKERAMI_PRUNE_FILTER:-}          # prune only what matches (e.g. label=x)
VOLUME_PREFIX=${DOCKERAMI_VOLUME_PREFIX:-dockerami}  # names of the cache volumes
CACHE_POLL=${DOCKERAMI_CACHE_POLL:-0.2}           # seconds between looks for cache requests
set -eu

log() { echo "dockerami-bootstrap: $*"; }

give_up() {
    log "FATAL: $*"
    [ -z "${pull_config:-}" ] || rm -rf "$pull_config"
    log "powering off (the instance terminates if launched with shutdown behaviour terminate)"
    sh -c "$POWEROFF"
    exit 1
}

waited=0
until $DOCKER info >/dev/null 2>&1; do
    [ "$waited" -ge "$DOCKER_WAIT" ] && give_up "dockerd did not answer within ${DOCKER_WAIT}s"
    sleep 1
    waited=$((waited + 1))
done

imds_get() {
    token=$(curl -sf --max-time 5 -X PUT -H "X-aws-ec2-metadata-token-ttl-seconds: 21600" \
        "$IMDS/latest/api/token") || token=""
    if [ -n "$token" ]; then
        curl -sf --max-time 10 -H "X-aws-ec2-metadata-token: $token" "$IMDS/latest/$1"
    else
        curl -sf --max-time 10 "$IMDS/latest/$1"
    fi
}

# The metadata service is closed to containers before any of them exists: a build
# must reach neither the user data (every slot's secret) nor the instance role's
# credentials. Host networking shares the host's stack, so the rule matches the
# containers' processes by the supplementary group every one of them is given.
imds_address=${IMDS#*://}
imds_address=${imds_address%%/*}
case $imds_address in
    *:*) imds_host=${imds_address%:*} imds_port=${imds_address##*:} ;;
    *) imds_host=$imds_address imds_port= ;;
esac
metadata_rule() {
    # shellcheck disable=SC2086 # the port match is absent or three words
    $IPTABLES -w "$1" OUTPUT -d "$imds_host" ${imds_port:+-p tcp --dport $imds_port} \
        -m owner --gid-owner "$CONTAINER_GID" --suppl-groups \
        -m comment --comment "$FIREWALL_TAG" -j REJECT
}
unblock_metadata() {
    [ "$BLOCK_METADATA" = no ] && return 0
    while metadata_rule -D 2>/dev/null; do :; done
}
container_options=""
if [ "$BLOCK_METADATA" != no ]; then
    case $CONTAINER_GID in "" | *[!0-9]*) give_up "bad DOCKERAMI_CONTAINER_GID=$CONTAINER_GID" ;; esac
    metadata_rule -C 2>/dev/null || metadata_rule -I \
        || give_up "cannot close the metadata service ($imds_address) to containers with $IPTABLES"
    log "metadata service $imds_address closed to containers (group $CONTAINER_GID)"
    # The group sticks: no process in the container may change its groups or gain
    # privileges (setuid binaries), so even a root process cannot leave it.
    container_options="--group-add $CONTAINER_GID --cap-drop SETGID --security-opt no-new-privileges"
else
    log "WARNING: DOCKERAMI_BLOCK_METADATA=no: containers can read the user data"
fi

(umask 077 && mkdir -p "$STATE_DIR")
chmod 700 "$STATE_DIR"
attempt=1
until imds_get user-data > "$STATE_DIR/user-data.new"; do
    [ "$attempt" -ge 10 ] && give_up "cannot read user data from $IMDS"
    log "metadata service not ready (attempt $attempt); retrying"
    sleep 2
    attempt=$((attempt + 1))
done
# Root's only: it holds every slot's secret. Containers get their own file (below).
chmod 600 "$STATE_DIR/user-data.new"
mv "$STATE_DIR/user-data.new" "$STATE_DIR/user-data"

image=$(sed -n 2p "$STATE_DIR/user-data")
case $image in
    "" | -* | *[!A-Za-z0-9._:/@-]*) give_up "user data line 2 is not an image reference: '$image'" ;;
esac

# Extensions (lines 5+, ignored by the seed's readers): isolation=container makes each
# worker serve one build and exit; slots=N runs N workers, slot.K=<name> <password>;
# secret.K=<hex> gives slot K one-time passwords (see container_password);
# registry.credentials names where the registry's credentials live.
extension() { sed -n '5,$p' "$STATE_DIR/user-data" | sed -n "s/^$1=//p" | head -n 1; }

# The registry the image comes from, as Docker reads the reference: the first path
# component if it looks like a host, else Docker Hub.
registry=docker.io
case $image in */*)
    case ${image%%/*} in *.* | *:* | localhost) registry=${image%%/*} ;; esac ;;
esac
credentials_from=$(extension 'registry\.credentials')
case $credentials_from in *[!A-Za-z0-9/_+=.@:-]*) give_up "bad registry.credentials in user data" ;; esac
# What the FATAL line of a refused pull advises.
auth_hint="no registry credentials: set the worker's registry_credentials (or, for ECR, its instance_profile)"
pull_config=""    # the pull's own Docker config (root's own if empty)

new_pull_config() {
    pull_config=$STATE_DIR/docker
    rm -rf "$pull_config"
    (umask 077 && mkdir -p "$pull_config")
    chmod 700 "$pull_config"
}

# The last line of file $1 that says why, on one line and short.
reason_in() {
    grep -v '^[[:space:]]*$' "$1" | tail -n 1 | sed 's/^Error response from daemon: //' | cut -c1-300
}

# A registry's answer that more attempts cannot change: it wants (other) credentials.
auth_refused() {
    grep -Eiq 'no basic auth credentials|unauthorized|authentication required|denied:|access denied|error getting credentials' "$1"
}

aws_call() {
    # The instance role from this instance's metadata service; the endpoint from
    # AWS_ENDPOINT_URL where it is set (older CLIs only take it as an option).
    # shellcheck disable=SC2086 # the endpoint option is absent or two words
    AWS_EC2_METADATA_SERVICE_ENDPOINT="$IMDS/" AWS_DEFAULT_REGION="$aws_region" AWS_PAGER="" \
        $AWS ${AWS_ENDPOINT_URL:+--endpoint-url "$AWS_ENDPOINT_URL"} "$@"
}

# Field $1 of the JSON object on stdin, which must be a non-empty one-line string.
json_field() {
    python3 -c 'import json, sys
value = json.load(sys.stdin)
field = value.get(sys.argv[1]) if isinstance(value, dict) else None
if not isinstance(field, str) or not field or "\n" in field:
    sys.exit(1)
sys.stdout.write(field)' "$1" 2>/dev/null
}

# registry.credentials: fetch the secret with the instance role and log in to the
# image's registry. The secret stays in this shell and in pipes: never on a command
# line, in the environment, a log or a file other than the pull's Docker config.
registry_login() {
    scheme=${credentials_from%%:*}
    secret_name=${credentials_from#*:}
    case $scheme in
        ssm) fetch="ssm get-parameter --with-decryption --query Parameter.Value --output text --name" ;;
        secretsmanager) fetch="secretsmanager get-secret-value --query SecretString --output text --secret-id" ;;
        *) give_up "registry.credentials '$credentials_from': unknown scheme '$scheme' (ssm or secretsmanager)" ;;
    esac
    command -v "$AWS" >/dev/null 2>&1 \
        || give_up "registry.credentials needs the aws CLI on the AMI ($AWS not found; install-base.sh installs awscli)"
    command -v python3 >/dev/null 2>&1 \
        || give_up "registry.credentials needs python3 on the AMI (it reads the secret's JSON)"
    case $secret_name in
        arn:*) aws_region=$(echo "$secret_name" | cut -d: -f4) ;;
        *) aws_region=${AWS_REGION:-${AWS_DEFAULT_REGION:-}}
           [ -n "$aws_region" ] || aws_region=$(imds_get meta-data/placement/region) || aws_region= ;;
    esac
    [ -n "$aws_region" ] || give_up "cannot tell the region to read $credentials_from in"
    attempt=1
    # shellcheck disable=SC2086 # $fetch is the command's words
    until secret=$(aws_call $fetch "$secret_name" 2>"$STATE_DIR/aws-error"); do
        # An answer (no such parameter, access denied, no role) is final; a network
        # error is retried a few times.
        if grep -Eq 'An error occurred|Unable to locate credentials|NoCredentials' \
                "$STATE_DIR/aws-error" || [ "$attempt" -ge 5 ]; then
            give_up "cannot read registry credentials from $credentials_from (with the instance role): $(reason_in "$STATE_DIR/aws-error")"
        fi
        log "reading $credentials_from failed (attempt $attempt); retrying in ${attempt}s"
        sleep "$attempt"
        attempt=$((attempt + 1))
    done
    rm -f "$STATE_DIR/aws-error"
    username=$(printf '%s' "$secret" | json_field username) \
        || give_up "$credentials_from is not JSON {\"username\": ..., \"password\": ...}"
    printf '%s' "$secret" | json_field password >/dev/null \
        || give_up "$credentials_from has no \"password\" (a non-empty string)"
    new_pull_config
    attempt=1
    until printf '%s' "$secret" | json_field password \
            | DOCKER_CONFIG=$pull_config $DOCKER login --username "$username" --password-stdin \
                "$registry" >/dev/null 2>"$STATE_DIR/login-error"; do
        if auth_refused "$STATE_DIR/login-error"; then
            give_up "registry $registry refused the credentials from $credentials_from: $(reason_in "$STATE_DIR/login-error")"
        fi
        [ "$attempt" -ge 5 ] && give_up "cannot log in to $registry: $(reason_in "$STATE_DIR/login-error")"
        log "login to $registry failed (attempt $attempt): $(reason_in "$STATE_DIR/login-error")"
        sleep "$attempt"
        attempt=$((attempt + 1))
    done
    secret="" username=""
    rm -f "$STATE_DIR/login-error"
    log "logged in to $registry with the credentials from $credentials_from"
    auth_hint="the credentials from $credentials_from do not give access to it"
}

if printf '%s\n' "$registry" \
        | grep -Eq '^[0-9]{12}\.dkr\.ecr(-fips)?\.[a-z0-9-]+\.amazonaws\.com(\.cn)?$'; then
    # ECR: the credential helper asks ECR for a token with the instance role.
    command -v docker-credential-ecr-login >/dev/null 2>&1 \
        || give_up "image $image is in ECR but docker-credential-ecr-login is not installed (amazon-ecr-credential-helper, see ami/install-base.sh)"
    new_pull_config
    printf '{"credHelpers": {"%s": "ecr-login"}}\n' "$registry" > "$pull_config/config.json"
    [ -z "$credentials_from" ] || log "registry.credentials not used: ECR pulls with the instance role"
    log "pulling from ECR ($registry) with the instance role's credentials"
    auth_hint="ECR pulls with the instance role: its instance_profile must allow ecr:GetAuthorizationToken, ecr:BatchGetImage and ecr:GetDownloadUrlForLayer"
elif [ -n "$credentials_from" ]; then
    registry_login
fi

pull() {
    if [ -n "$pull_config" ]; then
        DOCKER_CONFIG=$pull_config $DOCKER pull "$image" 2>"$STATE_DIR/pull-error"
    else
        $DOCKER pull "$image" 2>"$STATE_DIR/pull-error"
    fi
    status=$?
    cat "$STATE_DIR/pull-error" >&2
    return "$status"
}

# Epoch seconds, with a fraction where date has %N.
now() {
    t=$(date +%s.%N)
    case $t in *[!0-9.]* | *.) date +%s ;; *) echo "$t" ;; esac
}
seconds_since() { LC_ALL=C awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

# An image baked into the AMI (or left by a stop) is on the disk already: the pull then
# only checks that the tag still names it. The console says which, and how long it took.
if $DOCKER image inspect "$image" >/dev/null 2>&1; then present=yes; else present=no; fi
pull_started=$(now)
attempt=1
delay=1
log "pulling $image"
until pull; do
    if auth_refused "$STATE_DIR/pull-error"; then
        give_up "registry authentication failed for image $image: $(reason_in "$STATE_DIR/pull-error"); $auth_hint"
    fi
    [ "$attempt" -ge "$PULL_ATTEMPTS" ] && give_up "cannot pull image $image after $attempt attempts"
    log "pull of $image failed (attempt $attempt of $PULL_ATTEMPTS); retrying in ${delay}s"
    sleep "$delay"
    attempt=$((attempt + 1))
    delay=$((delay * 2))
    [ "$delay" -gt "$PULL_MAX_DELAY" ] && delay=$PULL_MAX_DELAY
done
image_ready=$(now)
# The credentials were for this pull only.
[ -z "$pull_config" ] || rm -rf "$pull_config"
pull_config=""
rm -f "$STATE_DIR/pull-error"
pull_seconds=$(seconds_since "$pull_started" "$image_ready")
if [ "$present" = yes ]; then
    log "image $image already present (registry checked in ${pull_seconds} s)"
    image_pull=present
else
    log "pulled $image in ${pull_seconds} s"
    image_pull=$pull_seconds
fi

# Which image this is, for the master's image refresh: the repository digest the engine
# recorded for the reference pulled (RepoDigests' entry for its repository; names
# compared as Docker shows them: no docker.io/ (nor Docker Hub's other names, as the
# master reads them) nor library/). None if it has none (never pushed nor pulled) or
# several that differ: the master then never refreshes it for it.
repository_of() {
    name=${1%%@*}
    case ${name##*/} in *:*) name=${name%:*} ;; esac
    first=${name%%/*}
    hub=yes
    case $name in */*) case $first in *.* | *:* | localhost) hub=no ;; esac ;; esac
    case $first in docker.io | index.docker.io | registry-1.docker.io) name=${name#*/} hub=yes ;; esac
    [ "$hub" = no ] || name=${name#library/}
    printf '%s\n' "$name"
}
image_repository=$(repository_of "$image")
image_digest=$($DOCKER image inspect --format '{{range .RepoDigests}}{{println .}}{{end}}' \
        "$image" 2>/dev/null | while IFS= read -r entry; do
    [ "$(repository_of "${entry%%@*}")" = "$image_repository" ] && printf '%s\n' "${entry#*@}"
done | sort -u)
case $image_digest in
    sha256:*[!0-9a-f]* | *"
"*) log "image $image: several or odd repository digests; not reported"; image_digest="" ;;
    sha256:????????????????????????????????????????????????????????????????) ;;
    *) image_digest="" ;;
esac
[ -z "$image_digest" ] || log "image $image is $image_digest"

instance_id=$(imds_get meta-data/instance-id) || instance_id=unknown

isolation=$(extension isolation)
tls_sha256=$(extension tls.sha256)   # the master's pinned certificate, checked by the image
case $tls_sha256 in *[!0-9a-f]*) give_up "bad tls.sha256 in user data" ;; esac
slots=$(extension slots)
slots=${slots:-1}
case $slots in "" | *[!0-9]* | 0) give_up "bad slots=$slots in user data" ;; esac
master=$(sed -n 1p "$STATE_DIR/user-data" | cut -d' ' -f3)

# Resource limits of every container (limits.memory=<bytes>, limits.pids=<tasks>,
# limits.cpus=<CPUs>; "none" for no limit). With several slots a limit not given gets a
# default, so that no slot's build takes the instance from the others: the memory the
# host does not keep, shared equally, and DEFAULT_PIDS tasks (fewer if the kernel's
# pid_max would not leave the host a share). CPU time needs none: it is shared equally
# when contended and idle CPUs are not wasted. A single container gets no default.
limit_memory=$(extension limits.memory)
limit_pids=$(extension limits.pids)
limit_cpus=$(extension limits.cpus)
case $limit_memory in "" | none) ;; *[!0-9]*) give_up "bad limits.memory=$limit_memory in user data" ;; esac
case $limit_pids in "" | none) ;; *[!0-9]*) give_up "bad limits.pids=$limit_pids in user data" ;; esac
case $limit_cpus in
    "" | none) ;;
    *[!0-9.]* | .* | *. | *.*.*) give_up "bad limits.cpus=$limit_cpus in user data" ;;
esac
# An option DOCKERAMI_RUN_OPTIONS sets itself is not overridden by a default.
case " $RUN_OPTIONS" in *" --memory"* | *" -m"*) run_memory=yes ;; *) run_memory=no ;; esac
case " $RUN_OPTIONS" in *" --pids-limit"*) run_pids=yes ;; *) run_pids=no ;; esac
if [ "$slots" -gt 1 ]; then
    if [ -z "$limit_memory" ] && [ "$run_memory" = no ]; then
        limit_memory=$(awk -v slots="$slots" -v keep="$HOST_MEMORY_MB" '/^MemTotal:/ {
            total = $2 * 1024; keep = keep * 1048576
            if (keep > total / 4) keep = total / 4
            printf "%.0f", int((total - keep) / slots / 1048576) * 1048576 }' /proc/meminfo)
        case $limit_memory in "" | 0 | *[!0-9]*) limit_memory=none ;; esac
    fi
    if [ -z "$limit_pids" ] && [ "$run_pids" = no ]; then
        pid_max=$(cat /proc/sys/kernel/pid_max 2>/dev/null) || pid_max=32768
        limit_pids=$((pid_max / (slots + 1)))
        [ "$limit_pids" -le "$DEFAULT_PIDS" ] || limit_pids=$DEFAULT_PIDS
    fi
fi
if [ -n "$limit_cpus" ] && [ "$limit_cpus" != none ]; then
    # docker refuses more CPUs than the host has: a smaller instance type gets them all.
    cpus_here=$(nproc 2>/dev/null) || cpus_here=1
    if awk -v a="$limit_cpus" -v b="$cpus_here" 'BEGIN { exit !(a > b) }'; then
        log "limits.cpus=$limit_cpus is more than the $cpus_here CPUs here; using $cpus_here"
        limit_cpus=$cpus_here
    fi
fi
limit_options=""
case $limit_memory in
    "" | none) ;;
    # Swap equal to memory: no swap beyond the limit, so swapping cannot bypass it.
    *) limit_options="--memory $limit_memory --memory-swap $limit_memory" ;;
esac
case $limit_pids in "" | none) ;; *) limit_options="$limit_options --pids-limit $limit_pids" ;; esac
case $limit_cpus in "" | none) ;; *) limit_options="$limit_options --cpus $limit_cpus" ;; esac
log "container limits: memory ${limit_memory:-none}, pids ${limit_pids:-none}, cpus ${limit_cpus:-none}"

slot_container() { if [ "$1" -eq 0 ]; then echo "$CONTAINER"; else echo "$CONTAINER-$1"; fi; }

# "<name> <password>" of slot $1, as the master wrote it.
slot_credentials() {
    if [ "$1" -eq 0 ]; then
        sed -n 1p "$STATE_DIR/user-data" | cut -d' ' -f1,2
    else
        extension "slot.$1"
    fi
}

# The password of the $2-th container of a slot whose secret is $1; the master derives
# the same (buildbot_dockerami/protocol/passwords.py). The secret goes through a
# pipe, never onto a command line.
container_password() {
    printf 'dockerami-container-password:%s:%s' "$1" "$2" | sha256sum | cut -c1-32
}

# The user data a container of slot $1 sees: its own line 1 (name, password of its
# container number $2, master), lines 2-4, isolation and TLS. Nothing of other slots.
write_slot_user_data() {
    credentials=$(slot_credentials "$1")
    worker=${credentials%% *}
    password=${credentials#* }
    secret=$(extension "secret.$1")
    [ -z "$secret" ] || password=$(container_password "$secret" "$2")
    {
        printf '%s %s %s\n' "$worker" "$password" "$master"
        printf '%s\n' "$image" "$(sed -n 3p "$STATE_DIR/user-data")" \
            "$(sed -n 4p "$STATE_DIR/user-data")"
        [ -z "$isolation" ] || printf 'isolation=%s\n' "$isolation"
        [ -z "$tls_sha256" ] || printf 'tls.sha256=%s\n' "$tls_sha256"
    } > "$STATE_DIR/slot.$1/user-data.new"
    # Mounted read-only into this slot's container only; its worker must read it.
    chmod 644 "$STATE_DIR/slot.$1/user-data.new"
    mv "$STATE_DIR/slot.$1/user-data.new" "$STATE_DIR/slot.$1/user-data"
}

# --- caches and disk hygiene --------------------------------------------------------
# Caches (user data cache.<name>=<path>): one Docker volume per (builder, cache), kept on
# the instance across builds and across a stop and start. A slot's container starts
# before its build is known, so each cache path in it is at first an empty, root-owned
# mount point. When its build starts, the image's worker (before any step runs; images
# labelled dockerami.host-dir=1) writes its builder's name to its requests directory; the
# bootstrap mounts that builder's volumes onto the slot's points, and the mounts
# propagate into the running container. With isolation=container a container gets one
# builder's caches, once; the points are emptied before the slot's next container.
cache_root="$STATE_DIR/caches"

lock() { until mkdir "$1" 2>/dev/null; do sleep 0.1; done; }
unlock() { rmdir "$1" 2>/dev/null || true; }

cache_volume() {  # builder cache-name
    echo "$VOLUME_PREFIX-cache-$2-$(printf '%s\n%s' "$1" "$2" | sha256sum | cut -c1-16)"
}

detach_point() { while mountpoint -q "$1"; do umount -l "$1" || return 1; done; }

# The directories slot $1's next container gets: requests (it writes), host (it reads:
# answers, and "retired"), and its cache mount points, emptied.
reset_slot() {
    cache_dir="$STATE_DIR/slot.$1"
    lock "$cache_dir/lock"
    for cache_entry in $caches; do
        if ! detach_point "$cache_root/slot.$1/${cache_entry%%=*}"; then
            unlock "$cache_dir/lock"
            return 1
        fi
        mkdir -p "$cache_root/slot.$1/${cache_entry%%=*}"
    done
    rm -rf "$cache_dir/requests" "$cache_dir/host" "$cache_dir/attached"
    mkdir -p "$cache_dir/requests" "$cache_dir/host"
    chmod 1777 "$cache_dir/requests"
    chmod 755 "$cache_dir/host"
    [ ! -f "$STATE_DIR/retired" ] || install -m 644 "$STATE_DIR/retired" "$cache_dir/host/retired"
    unlock "$cache_dir/lock"
}

# The `docker run` options of slot $1's containers: the hand-over directories, the points.
slot_options() {
    printf -- '--mount type=bind,source=%s,target=/run/dockerami/host,readonly ' \
        "$STATE_DIR/slot.$1/host"
    printf -- '--env DOCKERAMI_HOST_DIR=/run/dockerami/host '
    [ -n "$caches" ] || return 0
    printf -- '--mount type=bind,source=%s,target=/run/dockerami/requests ' \
        "$STATE_DIR/slot.$1/requests"
    printf -- '--env DOCKERAMI_CACHE_REQUESTS=/run/dockerami/requests '
    for cache_entry in $caches; do
        printf -- '--mount type=bind,source=%s,target=%s,bind-propagation=rslave ' \
            "$cache_root/slot.$1/${cache_entry%%=*}" "${cache_entry#*=}"
    done
}

# Mounts builder $2's volumes onto slot $1's points; new volumes belong to $3 (uid:gid of
# the container's worker).
attach_caches() {
    lock "$STATE_DIR/caches.lock"
    : > "$STATE_DIR/slot.$1/attached.new"
    for cache_entry in $caches; do
        cache_name=${cache_entry%%=*}
        cache_vol=$(cache_volume "$2" "$cache_name")
        $DOCKER volume inspect "$cache_vol" >/dev/null 2>&1 \
            || $DOCKER volume create --label "dockerami.cache=$cache_name" \
                --label "dockerami.builder=$2" "$cache_vol" >/dev/null \
            || { unlock "$STATE_DIR/caches.lock"; return 1; }
        echo "$cache_vol" >> "$STATE_DIR/slot.$1/attached.new"
        # A new volume is root's: it becomes the worker's. Its time says when it was used.
        if ! cache_data=$($DOCKER volume inspect -f '{{.Mountpoint}}' "$cache_vol") \
                || ! { [ "$(stat -c %u "$cache_data")" != 0 ] || chown "$3" "$cache_data"; } \
                || ! touch "$cache_data" || ! detach_point "$cache_root/slot.$1/$cache_name" \
                || ! mount --bind "$cache_data" "$cache_root/slot.$1/$cache_name"; then
            unlock "$STATE_DIR/caches.lock"
            return 1
        fi
    done
    mv "$STATE_DIR/slot.$1/attached.new" "$STATE_DIR/slot.$1/attached"
    unlock "$STATE_DIR/caches.lock"
    log "slot $1: caches of builder '$2' attached: $(tr '\n' ' ' < "$STATE_DIR/slot.$1/attached")"
}

# Slot $1's request, if any: an id (hex, the worker's) and a builder name. The answer,
# host/cache.<id>, is "ok" or why not.
answer_cache_request() {
    cache_dir="$STATE_DIR/slot.$1"
    cache_request="$cache_dir/requests/cache"
    lock "$cache_dir/lock"
    if [ -L "$cache_request" ] || [ ! -f "$cache_request" ]; then
        rm -f "$cache_request"
        unlock "$cache_dir/lock"
        return 0
    fi
    cache_owner=$(stat -c %u:%g "$cache_request")
    cache_id=$(head -c 1024 "$cache_request" | sed -n 1p)
    cache_builder=$(head -c 1024 "$cache_request" | sed -n 2p)
    rm -f "$cache_request"
    case $cache_id in "" | *[!0-9a-f]*) unlock "$cache_dir/lock"; return 0 ;; esac
    if [ "$isolation" = container ] && [ -f "$cache_dir/attached" ]; then
        cache_answer="refused: this container has its builder's caches already"
    elif [ -z "$cache_builder" ]; then
        cache_answer="refused: no builder named"
    elif attach_caches "$1" "$cache_builder" "$cache_owner"; then
        cache_answer=ok
    else
        cache_answer="failed: the caches of builder '$cache_builder' could not be attached"
        log "slot $1: $cache_answer"
    fi
    rm -f "$cache_dir"/host/cache.*  # the last build's answer (isolation=none)
    printf '%s\n' "$cache_answer" > "$cache_dir/host/cache.$cache_id.new"
    chmod 644 "$cache_dir/host/cache.$cache_id.new"
    mv "$cache_dir/host/cache.$cache_id.new" "$cache_dir/host/cache.$cache_id"
    unlock "$cache_dir/lock"
}

serve_cache_requests() {
    while :; do
        cache_slot=0
        while [ "$cache_slot" -lt "$slots" ]; do
            if [ -e "$STATE_DIR/slot.$cache_slot/requests/cache" ]; then
                answer_cache_request "$cache_slot" || log "slot $cache_slot: bad cache request"
            fi
            cache_slot=$((cache_slot + 1))
        done
        sleep "$CACHE_POLL"
    done
}

# Disk hygiene: the free space of $disk_path (default: Docker's data root) is kept at or
# above the floor (disk.floor=N% or NM, else $DISK_FLOOR), checked before each container
# starts and every $DISK_POLL seconds. Below it, what the instance can do without goes,
# least valuable first, until the floor holds: images other than line 2's; unused
# volumes that are not caches, and the build cache; then caches no container has, least
# recently used first. Still below it, the instance retires (see retire).

# The floor in KiB, of a disk of $2 KiB, for the spec $1 ("N%" or "NM").
disk_floor_kib() {
    case $1 in
        *[%]) disk_n=${1%[%]} ;;
        *M) disk_n=${1%M} ;;
        *) return 1 ;;
    esac
    case $disk_n in "" | *[!0-9]*) return 1 ;; esac
    case $1 in
        *[%]) echo $(($2 * disk_n / 100)) ;;
        *) echo $((disk_n * 1024)) ;;
    esac
}

disk_size() {  # KiB, for people
    LC_ALL=C awk -v k="$1" 'BEGIN {
        if (k < 1048576) printf "%.0f MiB", k / 1024; else printf "%.1f GiB", k / 1048576 }'
}

# 0 when the free space is at or above the floor (or cannot be measured).
disk_ok() {
    disk_df=$(df -Pk "$disk_path" 2>/dev/null | awk 'NR == 2 { print $2, $4 }')
    disk_total=${disk_df% *} disk_free=${disk_df#* }
    case "$disk_total$disk_free" in "" | *[!0-9]*) return 0 ;; esac
    disk_floor=$(disk_floor_kib "$disk_floor_spec" "$disk_total") || return 0
    [ "$disk_free" -ge "$disk_floor" ]
}

prune_images() {
    # shellcheck disable=SC2086 # the filter option is absent or two words
    $DOCKER image ls --no-trunc --format '{{.ID}} {{.Repository}}:{{.Tag}}' \
        ${PRUNE_FILTER:+--filter $PRUNE_FILTER} | while read -r prune_id prune_ref; do
        [ "$prune_id" != "$image_id" ] || continue
        [ "$prune_ref" != "<none>:<none>" ] || prune_ref=$prune_id
        ! $DOCKER image rm "$prune_ref" >/dev/null 2>&1 || log "disk: removed image $prune_ref"
    done
}

prune_unused() {
    # shellcheck disable=SC2086 # the filter option is absent or two words
    $DOCKER volume prune -f --filter 'label!=dockerami.cache' \
        ${PRUNE_FILTER:+--filter $PRUNE_FILTER} >/dev/null 2>&1 || true
    # The build cache cannot be filtered: on a shared engine (PRUNE_FILTER) it stays.
    [ -n "$PRUNE_FILTER" ] || $DOCKER builder prune -a -f >/dev/null 2>&1 || true
}

# Removes the least recently used cache volume no container has; 1 when there is none.
prune_cache() {
    lock "$STATE_DIR/caches.lock"
    prune_held=$(cat "$STATE_DIR"/slot.*/attached "$STATE_DIR"/slot.*/attached.new \
        2>/dev/null || true)
    prune_vol=$($DOCKER volume ls -q --filter label=dockerami.cache | while read -r vol; do
        case $vol in "$VOLUME_PREFIX"-cache-*) ;; *) continue ;; esac
        ! printf '%s\n' "$prune_held" | grep -qx "$vol" || continue
        data=$($DOCKER volume inspect -f '{{.Mountpoint}}' "$vol") || continue
        echo "$(stat -c %Y "$data" 2>/dev/null || echo 0) $vol"
    done | sort -n | head -n 1 | cut -d' ' -f2)
    if [ -z "$prune_vol" ] || ! $DOCKER volume rm "$prune_vol" >/dev/null 2>&1; then
        unlock "$STATE_DIR/caches.lock"
        return 1
    fi
    log "disk: removed cache volume $prune_vol (used least recently)"
    unlock "$STATE_DIR/caches.lock"
}

# 0 when the floor holds, after pruning if need be; else the instance retires: 1.
keep_disk() {
    [ ! -f "$STATE_DIR/retired" ] || return 1
    lock "$STATE_DIR/disk.lock"
    disk_step=0
    until disk_ok; do
        disk_step=$((disk_step + 1))
        case $disk_step in
            1) log "disk: $(disk_size "$disk_free") free on $disk_path, below the floor" \
                   "($disk_floor_spec: $(disk_size "$disk_floor")); pruning"
               prune_images ;;
            2) prune_unused ;;
            *) prune_cache && continue
               retire "disk_full: $(disk_size "$disk_free") free on $disk_path after pruning," \
                   "below the floor ($disk_floor_spec: $(disk_size "$disk_floor"))"
               unlock "$STATE_DIR/disk.lock"
               return 1 ;;
        esac
    done
    [ "$disk_step" -eq 0 ] || log "disk: $(disk_size "$disk_free") free after pruning"
    unlock "$STATE_DIR/disk.lock"
}

watch_disk() {
    while sleep "$DISK_POLL"; do
        keep_disk || return 0
    done
}

# The instance cannot serve any longer ($*: "<reason>: <detail>"). It tells the master
# why through its workers: host/retired, which the image shows as the worker info
# dockerami_retired, read when a worker asks to shut down (SIGHUP, as for a spot notice)
# and when one connects. From now on a slot's new container only says so (the master
# refuses it builds); the master terminates the instance once its running builds end.
retire() {
    [ ! -f "$STATE_DIR/retired" ] || return 0
    printf '%s\n' "$*" > "$STATE_DIR/retired.new"
    mv "$STATE_DIR/retired.new" "$STATE_DIR/retired"
    log "RETIRING: $*; the master ends this instance after its running builds"
    retire_slot=0
    while [ "$retire_slot" -lt "$slots" ]; do
        if [ -d "$STATE_DIR/slot.$retire_slot/host" ]; then
            install -m 644 "$STATE_DIR/retired" "$STATE_DIR/slot.$retire_slot/host/retired"
        fi
        $DOCKER kill --signal HUP "$(slot_container "$retire_slot")" >/dev/null 2>&1 || true
        retire_slot=$((retire_slot + 1))
    done
}
# --- end of caches and disk hygiene ---------------------------------------------------

# A container that exits (a finished isolated build, or a crash) is replaced at once
# by a fresh one from the same image. A slot's container number only moves on once
# a container has connected (so the master has spent its password): a container that
# died before connecting is replaced by one with the same password.
run_slot() {
    name=$(slot_container "$1")
    dir="$STATE_DIR/slot.$1"
    (umask 077 && mkdir -p "$dir")
    # Counted per secret: user data with new secrets (a restarted instance) starts at 0.
    counter="$dir/number.$(extension "secret.$1" | sha256sum | cut -c1-16)"
    number=$(cat "$counter" 2>/dev/null || echo 0)
    options=$(slot_options "$1")
    while :; do
        # The last container (also one a restarted bootstrap finds) is spent or not.
        if $DOCKER container inspect "$name" >/dev/null 2>&1; then
            if $DOCKER logs "$name" 2>&1 | grep -q 'Connected to buildmaster'; then
                number=$((number + 1))
                echo "$number" > "$counter"
            elif [ "$isolation" = container ]; then
                sleep 2  # one that fails before connecting must not spin
            fi
            $DOCKER rm -f -v "$name" >/dev/null 2>&1 || true
        fi
        # Retired, a new container tells the master so: only an image that can say it.
        if ! keep_disk && [ "$host_dir" != 1 ]; then
            log "$name: not started again: this instance retires"
            return 0
        fi
        until reset_slot "$1"; do
            log "$name: cannot empty its cache mount points; retrying"
            sleep 5
        done
        write_slot_user_data "$1" "$number"
        log "starting $image as $name"
        # shellcheck disable=SC2086 # option lists
        $DOCKER run --name "$name" --network host $container_options $RUN_OPTIONS \
            $limit_options $options --mount "type=bind,source=$dir/user-data,target=/run/dockerami/user-data,readonly" \
            --env DOCKERAMI_USER_DATA_FILE=/run/dockerami/user-data \
            --env DOCKERAMI_INSTANCE_ID="$instance_id" --env DOCKERAMI_SLOT="$1" \
            --env DOCKERAMI_IMAGE_READY="$image_ready" --env DOCKERAMI_IMAGE_PULL="$image_pull" \
            --env DOCKERAMI_IMAGE_DIGEST="$image_digest" \
            "$image" || log "$name exited with status $?"
        # The kernel's OOM killer ended a process of it (a build past limits.memory).
        if [ "$($DOCKER container inspect -f '{{.State.OOMKilled}}' "$name" 2>/dev/null)" = true ]
        then
            log "$name: out of memory: the kernel's OOM killer killed a process in it" \
                "(memory limit ${limit_memory:-none})"
        fi
        # A crashing image must not spin; an isolated worker's exit is the normal case.
        [ "$isolation" = container ] || sleep 2
    done
}

# A spot instance gets a two-minute notice (meta-data/spot/instance-action) before EC2
# reclaims it. Ask every worker to shut down (SIGHUP: buildbot-worker's graceful
# shutdown request), which the master takes as the interruption: it retries the builds
# elsewhere at once instead of losing them with the instance.
watch_spot() {
    rebalance_told=no
    while :; do
        # EC2's rebalance recommendation comes before any interruption notice: the
        # instance drains (no new build; the running ones finish), if the image can tell
        # the master (dockerami.host-dir=1); without it, it serves on.
        if [ "$rebalance_told" = no ] &&
            advice=$(imds_get meta-data/events/recommendations/rebalance 2>/dev/null) &&
            [ -n "$advice" ]; then
            rebalance_told=yes
            if [ "$host_dir" = 1 ]; then
                retire "spot_rebalance: EC2 recommends rebalancing this spot instance ($advice)"
            else
                log "spot rebalance recommendation: $advice; the image cannot tell the" \
                    "master (no label dockerami.host-dir=1): it serves on"
            fi
        fi
        if notice=$(imds_get meta-data/spot/instance-action 2>/dev/null) && [ -n "$notice" ]; then
            log "spot interruption notice: $notice; asking the workers to shut down"
            slot=0
            while [ "$slot" -lt "$slots" ]; do
                $DOCKER kill --signal HUP "$(slot_container "$slot")" >/dev/null 2>&1 || true
                slot=$((slot + 1))
            done
            return 0
        fi
        sleep "$SPOT_POLL"
    done
}

stop_slots() {
    log "stopping"
    for job in $(jobs -p); do kill "$job" 2>/dev/null || true; done
    slot=0
    while [ "$slot" -lt "$slots" ]; do
        $DOCKER rm -f -v "$(slot_container "$slot")" >/dev/null 2>&1 || true
        for entry in $caches; do detach_point "$cache_root/slot.$slot/${entry%%=*}" || true; done
        slot=$((slot + 1))
    done
    [ -z "$caches" ] || detach_point "$cache_root" || true
    unblock_metadata
    exit 0
}
trap stop_slots TERM INT

slot=0
while [ "$slot" -lt "$slots" ]; do
    credentials=$(slot_credentials "$slot")
    case $credentials in *" "*) ;; *) give_up "user data has slots=$slots but no slot.$slot" ;; esac
    case $(extension "secret.$slot") in *[!0-9a-f]*) give_up "bad secret.$slot in user data" ;; esac
    slot=$((slot + 1))
done

# Caches: cache.<name>=<path> lines, checked again here (the paths go into --mount).
caches=""
set -f
# shellcheck disable=SC2013 # one word per line: names and paths have no whitespace
for entry in $(sed -n '5,$p' "$STATE_DIR/user-data" | sed -n 's/^cache\.//p'); do
    case ${entry%%=*} in "" | *[!a-z0-9_-]*) give_up "bad cache name in user data: $entry" ;; esac
    case ${entry#*=} in "" | /*[!A-Za-z0-9._@+/-]* | [!/]*)
        give_up "bad cache path in user data: $entry" ;;
    esac
    caches="$caches $entry"
done
set +f
case $STATE_DIR in *[!A-Za-z0-9._@+/-]*) [ -z "$caches" ] || give_up "caches need a plain $STATE_DIR" ;; esac
rm -rf "$STATE_DIR"/slot.*/lock "$STATE_DIR/caches.lock" "$STATE_DIR/disk.lock"
# An image labelled dockerami.host-dir=1 reads /run/dockerami/host (the retirement) and
# asks for its builder's caches itself (see images/worker-linux/start-worker.sh).
host_dir=$($DOCKER image inspect -f '{{ index .Config.Labels "dockerami.host-dir" }}' "$image" \
    2>/dev/null) || host_dir=""
if [ -n "$caches" ]; then
    # Only an image whose worker asks for its builder's caches gets them: with another,
    # a build could ask for any builder's.
    if [ "$host_dir" != 1 ]; then
        log "WARNING: caches are off: the image has no label dockerami.host-dir=1 (its worker" \
            "does not ask for its builder's caches)"
        caches=""
    elif ! mkdir -p "$cache_root" || ! { mountpoint -q "$cache_root" \
            || mount --bind "$cache_root" "$cache_root"; } || ! mount --make-rshared "$cache_root"; then
        log "WARNING: caches are off: cannot make $cache_root a shared mount"
        caches=""
    else
        log "caches:$caches (a volume per builder, attached when its build starts)"
    fi
fi
disk_floor_spec=$(extension disk.floor)
disk_floor_spec=${disk_floor_spec:-$DISK_FLOOR}
disk_path=${DISK_PATH:-$($DOCKER info -f '{{.DockerRootDir}}' 2>/dev/null || echo /var/lib/docker)}
disk_floor_kib "$disk_floor_spec" 100 >/dev/null || give_up "bad disk floor '$disk_floor_spec'"
image_id=$($DOCKER image inspect -f '{{.Id}}' "$image")
log "disk: keeping $disk_floor_spec of $disk_path free (pruning, else retiring)"

slot=0
while [ "$slot" -lt "$slots" ]; do
    run_slot "$slot" &
    slot=$((slot + 1))
done
watch_spot &
watch_disk &
[ -z "$caches" ] || serve_cache_requests &
wait
