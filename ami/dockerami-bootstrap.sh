#!/bin/sh
# dockerami-bootstrap: run the worker image named in this instance's user data.
#
# Replaces the seed's `@reboot sleep 20 && docker run ...` crontab line. Run by
# dockerami-bootstrap.service (systemd restarts it, and so the container, if it exits):
#   1. wait until dockerd answers;
#   2. read the user data from the metadata service (IMDSv2 token; v1 if no token);
#   3. pull the image named on line 2, retrying with backoff, progress in the journal;
#   4. run it with host networking and the user data mounted read-only, so the
#      container itself needs no metadata access; one container per slot (user-data
#      extension slots=N), each replaced by a fresh one whenever it exits.
# If the image cannot be pulled at all, it says why on the console and powers the
# instance off (EC2 then terminates it), so the master sees the failure at once.
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
set -eu

log() { echo "dockerami-bootstrap: $*"; }

give_up() {
    log "FATAL: $*"
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

mkdir -p "$STATE_DIR"
chmod 700 "$STATE_DIR"
attempt=1
until imds_get user-data > "$STATE_DIR/user-data.new"; do
    [ "$attempt" -ge 10 ] && give_up "cannot read user data from $IMDS"
    log "metadata service not ready (attempt $attempt); retrying"
    sleep 2
    attempt=$((attempt + 1))
done
# Readable inside the container (its user is not root); the directory keeps others out.
chmod 644 "$STATE_DIR/user-data.new"
mv "$STATE_DIR/user-data.new" "$STATE_DIR/user-data"

image=$(sed -n 2p "$STATE_DIR/user-data")
case $image in
    "" | -* | *[!A-Za-z0-9._:/@-]*) give_up "user data line 2 is not an image reference: '$image'" ;;
esac

attempt=1
delay=1
log "pulling $image"
until $DOCKER pull "$image"; do
    [ "$attempt" -ge "$PULL_ATTEMPTS" ] && give_up "cannot pull image $image after $attempt attempts"
    log "pull of $image failed (attempt $attempt of $PULL_ATTEMPTS); retrying in ${delay}s"
    sleep "$delay"
    attempt=$((attempt + 1))
    delay=$((delay * 2))
    [ "$delay" -gt "$PULL_MAX_DELAY" ] && delay=$PULL_MAX_DELAY
done

instance_id=$(imds_get meta-data/instance-id) || instance_id=unknown

# Extensions (lines 5+, ignored by the seed's readers): isolation=container makes each
# worker serve one build and exit; slots=N runs N workers, slot.K=<name> <password>.
extension() { sed -n '5,$p' "$STATE_DIR/user-data" | sed -n "s/^$1=//p" | head -n 1; }
isolation=$(extension isolation)
slots=$(extension slots)
slots=${slots:-1}
case $slots in "" | *[!0-9]* | 0) give_up "bad slots=$slots in user data" ;; esac
master=$(sed -n 1p "$STATE_DIR/user-data" | cut -d' ' -f3)

slot_container() { if [ "$1" -eq 0 ]; then echo "$CONTAINER"; else echo "$CONTAINER-$1"; fi; }

# Each slot's container sees user data whose line 1 is its own worker.
slot_user_data() {
    file="$STATE_DIR/user-data.$1"
    if [ "$1" -eq 0 ]; then
        cp "$STATE_DIR/user-data" "$file"
    else
        credentials=$(extension "slot.$1")
        [ -n "$credentials" ] || give_up "user data has slots=$slots but no slot.$1"
        { printf '%s %s\n' "$credentials" "$master"; sed -n '2,$p' "$STATE_DIR/user-data"; } > "$file"
    fi
    chmod 644 "$file"
}

# A container that exits (a finished isolated build, or a crash) is replaced at once
# by a fresh one from the same image.
run_slot() {
    name=$(slot_container "$1")
    while :; do
        $DOCKER rm -f "$name" >/dev/null 2>&1 || true
        log "starting $image as $name"
        # shellcheck disable=SC2086 # RUN_OPTIONS is a list of options
        $DOCKER run --rm --name "$name" --network host $RUN_OPTIONS \
            --mount "type=bind,source=$STATE_DIR/user-data.$1,target=/run/dockerami/user-data,readonly" \
            --env DOCKERAMI_USER_DATA_FILE=/run/dockerami/user-data \
            --env DOCKERAMI_INSTANCE_ID="$instance_id" --env DOCKERAMI_SLOT="$1" \
            "$image" || log "$name exited with status $?"
        # A crashing image must not spin; an isolated worker's exit is the normal case.
        [ "$isolation" = container ] || sleep 2
    done
}

stop_slots() {
    log "stopping"
    for job in $(jobs -p); do kill "$job" 2>/dev/null || true; done
    slot=0
    while [ "$slot" -lt "$slots" ]; do
        $DOCKER rm -f "$(slot_container "$slot")" >/dev/null 2>&1 || true
        slot=$((slot + 1))
    done
    exit 0
}
trap stop_slots TERM INT

slot=0
while [ "$slot" -lt "$slots" ]; do
    slot_user_data "$slot"
    run_slot "$slot" &
    slot=$((slot + 1))
done
wait
