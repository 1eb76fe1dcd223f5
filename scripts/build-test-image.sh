#!/usr/bin/env bash
# Build (or reuse) the Debian 12 image with systemd as PID 1 that the Molecule scenarios boot.
#
# No container registry is reachable here, so the image is made from scratch: debootstrap a minimal
# bookworm root file system, then `podman import` it as localhost/innova-debian12-systemd:<tag>.
# The tag is a hash of the package list and image_rev, so changing either gives a new image, and otherwise the
# image already built is reused (a few ms instead of ~3 min).
#
# Usage: scripts/build-test-image.sh            # prints the image name on stdout (last line)
#        INNOVA_TEST_IMAGE_FORCE=1 scripts/build-test-image.sh   # rebuild even if present
# Needs: root, podman, runc, debootstrap (scripts/molecule.sh installs them), HTTP access to the Debian mirror.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$repo_root/containers.conf}"

mirror="${INNOVA_TEST_IMAGE_MIRROR:-http://deb.debian.org/debian}"
# Everything the roles install with apt is baked in, so converge needs no network for packages
# (the scenarios set innova_base_apt_update_cache: false). Keep in sync with innova_base_packages.
packages=(
  systemd systemd-sysv dbus                 # PID 1 and systemctl
  python3 python3-venv python3-apt python3-packaging   # Ansible modules (apt, pip), the service venv
  sudo acl                                  # become / become_user to the unprivileged innova user
  ca-certificates curl                      # HTTPS downloads on real hosts; debugging
  libgomp1                                  # OpenMP runtime that llama.cpp links against
  cron                                      # the health-check cron job (issue 4)
  procps iproute2                           # ps, ss while debugging a failed scenario
  haproxy                                   # the balancer of the fleet scenario (role innova_lb, issue 20)
)
include="$(IFS=,; echo "${packages[*]}")"
# Bump when the customisation below changes.
image_rev=2

name="localhost/innova-debian12-systemd"
tag="$(echo "$include $image_rev" | sha256sum | cut -c1-12)"
image="$name:$tag"

if [[ -z "${INNOVA_TEST_IMAGE_FORCE:-}" ]] && podman image exists "$image"; then
  echo "reusing $image" >&2
  echo "$image"
  exit 0
fi

work="$(mktemp -d /var/tmp/innova-rootfs.XXXXXX)"
trap 'rm -rf "$work"' EXIT
rootfs="$work/rootfs"

echo "debootstrap bookworm -> $rootfs (about a minute)" >&2
debootstrap --variant=minbase --include="$include" bookworm "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 || {
  tail -n 30 "$work/debootstrap.log" >&2
  exit 1
}

# Make it a quiet, boot-fast container: no consoles, no periodic apt jobs, a fresh machine-id per container.
for unit in getty@tty1.service console-getty.service serial-getty@.service \
            apt-daily.timer apt-daily-upgrade.timer systemd-firstboot.service \
            systemd-remount-fs.service; do
  ln -sf /dev/null "$rootfs/etc/systemd/system/$unit"
done
# HAProxy is baked in for the balancer host only: it stays off until the innova_lb role enables it.
rm -f "$rootfs/etc/systemd/system/multi-user.target.wants/haproxy.service"
: >"$rootfs/etc/machine-id"
rm -f "$rootfs/var/lib/dbus/machine-id"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
echo "innova-test" >"$rootfs/etc/hostname"

echo "podman import -> $image" >&2
tar -C "$rootfs" -c . | podman import \
  --change 'CMD ["/sbin/init"]' \
  --change 'STOPSIGNAL SIGRTMIN+3' \
  - "$image" >/dev/null
# Drop the images of older versions of this script (those no container uses).
podman images --format '{{.Repository}}:{{.Tag}}' | grep "^$name:" | grep -v ":$tag$" | xargs -r podman rmi >/dev/null 2>&1 || true  # no -f: never remove a container in use
echo "$image"
