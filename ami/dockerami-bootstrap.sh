#!/bin/sh
# dockerami-bootstrap: run the worker image named in this instance's user data.
#
# Replaces the seed's `@reboot sleep 20 && docker run ...` crontab line. Run by
# dockerami-bootstrap.service (systemd restarts it, and so the container, if it exits):
#   1. wait until dockerd answers;
#   2. read the user data from the metadata service (IMDSv2 token; v1 if no token);
#   3. pull the image named on line 2, retrying with backoff, progress in the journal;
#   4. run it with host networking and the user data mounted read-only, so the
#      container itself needs no metadata access.
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

fetch_user_data() {
    token=$(curl -sf --max-time 5 -X PUT -H "X-aws-ec2-metadata-token-ttl-seconds: 21600" \
        "$IMDS/latest/api/token") || token=""
    if [ -n "$token" ]; then
        curl -sf --max-time 10 -H "X-aws-ec2-metadata-token: $token" "$IMDS/latest/user-data"
    else
        curl -sf --max-time 10 "$IMDS/latest/user-data"
    fi
}

mkdir -p "$STATE_DIR"
chmod 700 "$STATE_DIR"
attempt=1
until fetch_user_data > "$STATE_DIR/user-data.new"; do
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

$DOCKER rm -f "$CONTAINER" >/dev/null 2>&1 || true
log "starting $image as $CONTAINER"
# shellcheck disable=SC2086 # RUN_OPTIONS is a list of options
exec $DOCKER run --rm --name "$CONTAINER" --network host $RUN_OPTIONS \
    --mount "type=bind,source=$STATE_DIR/user-data,target=/run/dockerami/user-data,readonly" \
    --env DOCKERAMI_USER_DATA_FILE=/run/dockerami/user-data \
    "$image"
