#!/bin/sh
# Turns a fresh Debian/Ubuntu instance into the dockerami base AMI (run as root).
# The seed's steps: install Docker, let the default user run it without sudo, and
# start the image from the user data at boot (here: the bootstrap service, not cron).
set -eu
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends docker.io curl ca-certificates
systemctl enable docker.service
# Docker without sudo for the default login user, as the seed did.
for user in admin ubuntu ec2-user; do
    if id "$user" >/dev/null 2>&1; then usermod -aG docker "$user"; fi
done
install -m 0755 /tmp/dockerami-bootstrap /usr/local/sbin/dockerami-bootstrap
install -m 0644 /tmp/dockerami-bootstrap.service /etc/systemd/system/dockerami-bootstrap.service
systemctl daemon-reload
systemctl enable dockerami-bootstrap.service
# Nothing of this build instance's identity may leak into the AMI.
apt-get clean
rm -f /etc/ssh/ssh_host_* /root/.ssh/authorized_keys
