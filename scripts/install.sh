#!/usr/bin/env bash
# Installs what reconciler, its lab and its tests need on a fresh Debian 12 machine (as root).
# Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  git openssh-server openssh-client iproute2 iptables procps psmisc util-linux kmod
  strongswan-charon strongswan-swanctl strongswan-pki strongswan-starter
  libstrongswan-standard-plugins libstrongswan-extra-plugins libcharon-extra-plugins
  apache2 libapache2-mod-jk apparmor apparmor-utils
  iputils-ping tcpdump curl dpkg-dev python3-venv sqlite3 iptables-persistent debconf-utils ifupdown sudo strace gnupg openssl
  # the VM lab tier (docs/LAB.md): QEMU guests booting a Debian 12 image built with mmdebstrap
  qemu-system-x86 qemu-utils ipxe-qemu mmdebstrap e2fsprogs
  # the operator's view (#19): promtool checks /metrics; a headless browser loads the status
  # pages; podman builds and runs the image from a local debootstrap base (no registry)
  prometheus chromium chromium-driver podman buildah runc debootstrap fonts-dejavu-core
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # iptables-persistent must not save this machine's rules during install.
  printf 'iptables-persistent iptables-persistent/autosave_v4 boolean false\niptables-persistent iptables-persistent/autosave_v6 boolean false\n' | debconf-set-selections
  # policy-rc.d keeps the machine's own sshd/apache2/strongswan from being started by dpkg.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d
fi

# sshd -t and every lab host's sshd need the privilege separation directory; /run is a tmpfs, so
# a fresh (or rebooted) machine does not have it until something creates it.
install -d -m 0755 /run/sshd

PY=${PYTHON:-python3}
"$PY" -m pip install -q --disable-pip-version-check -e '.[test]'
