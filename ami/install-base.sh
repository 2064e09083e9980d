#!/bin/sh
# Turns a fresh Debian/Ubuntu instance into the dockerami base AMI (run as root).
# The seed's steps: install Docker, let the default user run it without sudo, and
# start the image from the user data at boot (here: the bootstrap service, not cron).
set -eu
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends docker.io curl ca-certificates
# Private registries with the instance role (docs/base-ami-and-image.md, "Private
# registries and ECR"): ECR's credential helper, which the bootstrap names in the
# pull's credHelpers; the aws CLI and python3 read registry_credentials from SSM
# Parameter Store or Secrets Manager. (Ubuntu 24.04 has no awscli package: install
# AWS CLI v2 there by hand if you use registry_credentials.)
apt-get install -y --no-install-recommends amazon-ecr-credential-helper python3
apt-get install -y --no-install-recommends awscli \
    || echo "dockerami: WARNING: no awscli package; registry_credentials will not work"
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
