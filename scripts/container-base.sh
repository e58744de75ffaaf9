#!/usr/bin/env bash
# A Debian 12 base image for building the Dockerfile without a registry (CI, the container test):
# debootstrap --variant=minbase with Python, git, ssh and gnupg, this machine's extra CA
# certificates trusted (pip behind a TLS-inspecting proxy), imported into podman as
# localhost/reconciler-base:<key>. The rootfs tarball and podman's storage (the image and the
# build's layer cache) live under /var/cache/reconciler-container, so a second run only checks
# that the image is there. <key> changes with this script (its package list, its recipe).
#   scripts/container-base.sh            prints the image name (builds it first if needed)
#   eval "$(scripts/container-base.sh --env)"   podman settings for this cache (see lab-notes)
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE=${RECONCILER_CONTAINER_CACHE:-/var/cache/reconciler-container}
PACKAGES=python3,python3-venv,git,openssh-client,gnupg,ca-certificates
MIRROR=${RECONCILER_DEBIAN_MIRROR:-http://deb.debian.org/debian}
KEY=$(sha256sum "$0" | cut -c1-12)
IMAGE=localhost/reconciler-base:$KEY

mkdir -p "$CACHE"
cat > "$CACHE/containers.conf" <<'CONF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
cat > "$CACHE/storage.conf" <<CONF
[storage]
driver = "overlay"
graphroot = "$CACHE/storage"
runroot = "/run/reconciler-container"
CONF
export CONTAINERS_CONF=$CACHE/containers.conf CONTAINERS_STORAGE_CONF=$CACHE/storage.conf
if [ "${1:-}" = "--env" ]; then
  printf 'export CONTAINERS_CONF=%q CONTAINERS_STORAGE_CONF=%q RECONCILER_BASE_IMAGE=%q\n' \
    "$CONTAINERS_CONF" "$CONTAINERS_STORAGE_CONF" "$IMAGE"
  exit 0
fi

if podman image exists "$IMAGE"; then
  echo "$IMAGE"
  exit 0
fi
tarball=$CACHE/base-$KEY.tar
if [ ! -s "$tarball" ]; then
  root=$(mktemp -d "$CACHE/rootfs.XXXXXX")
  trap 'rm -rf "$root"' EXIT
  echo "debootstrap: Debian 12 minbase + $PACKAGES (a few minutes, once)" >&2
  debootstrap --variant=minbase --include="$PACKAGES" bookworm "$root" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
    || { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
    chroot "$root" update-ca-certificates >/dev/null 2>&1
  fi
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar --numeric-owner -C "$root" -cf "$tarball.tmp" .
  mv "$tarball.tmp" "$tarball"
fi
podman import --change 'CMD ["/bin/bash"]' "$tarball" "$IMAGE" >/dev/null
echo "$IMAGE"
