"""The shell script that becomes PID 1 of a lab host (then execs sshd).

It runs inside the host's network namespace and fresh mount/UTS/IPC/PID namespaces
(``ip netns exec NS unshare ... sh INIT ...``). Arguments are our own validated values
(state directory, host name, address, interface name), passed as argv, never spliced.
"""

from __future__ import annotations

INIT_SCRIPT = r"""#!/bin/sh
# reconciler lab host init (PID 1 of the host until it execs sshd)
set -eu
H="$1"; NAME="$2"; ADDR="$3"; PEER="$4"; TAG="$5"; ADDR6="${6:-}"
M="$H/merged"

# -- network: our side of the veth becomes eth0; no default route (only the lab subnet).
# IPv6 on (a static documentation-prefix address, no router discovery, no default route) when
# the host has an IPv6 address, off otherwise
V6=1; [ -n "$ADDR6" ] && V6=0
# (no duplicate address detection either: the addresses are ours alone, and a link-local
# address left "tentative" for a second would make the host's state change by itself)
for c in all default; do
    echo "$V6" > "/proc/sys/net/ipv6/conf/$c/disable_ipv6" 2>/dev/null || true
    for k in accept_ra router_solicitations accept_dad; do
        echo 0 > "/proc/sys/net/ipv6/conf/$c/$k" 2>/dev/null || true
    done
done
ip link set lo up
ip link set "$PEER" name eth0
for k in accept_ra router_solicitations accept_dad; do
    echo 0 > "/proc/sys/net/ipv6/conf/eth0/$k" 2>/dev/null || true
done
echo "$V6" > /proc/sys/net/ipv6/conf/eth0/disable_ipv6 2>/dev/null || true
ip addr add "$ADDR" dev eth0
[ -n "$ADDR6" ] && ip -6 addr add "$ADDR6" dev eth0 nodad
ip link set eth0 up
hostname "$NAME"

# -- filesystem: the machine's / as a read-only lower layer, per-host upper layer
mount -t overlay "$TAG" -o "lowerdir=/,upperdir=$H/upper,workdir=$H/work" "$M"
mount -t proc -o nosuid,nodev,noexec proc "$M/proc"
mount -t sysfs -o nosuid,nodev,noexec sysfs "$M/sys"
mount --rbind /dev "$M/dev"
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs "$M/dev/shm"
if mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts "$M/dev/pts" 2>/dev/null; then
    mount --bind "$M/dev/pts/ptmx" "$M/dev/ptmx" || true
fi
mount -t tmpfs -o nosuid,nodev,mode=755,size=128m tmpfs "$M/run"
mount -t tmpfs -o nosuid,nodev,mode=1777,size=512m tmpfs "$M/tmp"
mount --bind "$H/home-root" "$M/root"
mkdir -p "$M/data" "$M/run/sshd" "$M/run/lock" "$M/run/apache2" "$M/run/lock/apache2" \
         "$M/var/log/apache2" "$M/run/user"
chmod 755 "$M/run/sshd"
chmod 1777 "$M/run/lock"

# -- identity: hostname files, only our host key, our sshd_config
printf '%s\n' "$NAME" > "$M/etc/hostname"
cp "$H/etc/hosts" "$M/etc/hosts"
rm -f "$M"/etc/ssh/ssh_host_*
cp "$H/etc/ssh_host_ed25519_key" "$M/etc/ssh/ssh_host_ed25519_key"
cp "$H/etc/ssh_host_ed25519_key.pub" "$M/etc/ssh/ssh_host_ed25519_key.pub"
chmod 600 "$M/etc/ssh/ssh_host_ed25519_key"
cp "$H/etc/sshd_config" "$M/etc/ssh/sshd_config"
rm -f "$M/etc/machine-id"
: > "$M/etc/machine-id"
# a new host: nothing of the machine's own reconciler state (host identity, inventory, journal)
rm -rf "$M/etc/reconciler/identity" "$M/var/lib/reconciler"

# -- become the host: the overlay is our root, the machine's root is gone from view
cd "$M"
pivot_root . .
umount -l .
cd /
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
exec /usr/sbin/sshd -D -e
"""

SSHD_CONFIG = """\
# reconciler lab host sshd: key authentication only
Port 22
ListenAddress 0.0.0.0
AddressFamily inet
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PubkeyAuthentication yes
AuthorizedKeysFile .ssh/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
ChallengeResponseAuthentication no
HostbasedAuthentication no
UsePAM no
UseDNS no
PrintMotd no
PrintLastLog no
StrictModes yes
MaxStartups 400:30:800
MaxSessions 200
LoginGraceTime 30
PidFile /run/sshd.pid
AcceptEnv LANG LC_*
Subsystem sftp internal-sftp
LogLevel INFO
"""
