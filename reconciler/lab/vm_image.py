"""The VM lab's base image: Debian 12 built once with mmdebstrap, cached, shared by every guest.

The image key is a hash of everything that decides the image's content (suite, package list,
the customize script below, the disk size): the image is rebuilt only when one of them changes.
Layout under ``CACHE_ROOT`` (``/var/cache/reconciler-lab``, so CI keeps it between steps)::

    debs/                 downloaded .deb files, reused by the next build (no second download)
    images/<key>/         base.img (raw ext4, the guests' read-only backing file), vmlinuz,
                          initrd.img, image.json (key, packages, sizes, build seconds), build.log
    images/.<key>.lock    flock'ed while building or checking that key

A build runs in ``images/.build-<key>-<pid>/`` and is renamed into place when complete, so a
crashed build never leaves a half image behind; older keys are pruned after a new build.

Per-host identity (hostname, address, host key, the lab's client key) is NOT in the image: each
guest gets a tiny config disk (``vm_guest.config_disk``) that the oneshot unit
``reconciler-lab-identity.service`` in the image reads early in every boot.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from reconciler.lab.lock import flocked
from reconciler.lab.model import LabError
from reconciler.lab.state import atomic_write
from reconciler.log import get_logger

log = get_logger(__name__)

CACHE_ROOT = Path(os.environ.get("RECONCILER_VM_CACHE", "/var/cache/reconciler-lab"))
SUITE = "bookworm"
DISK_SIZE = "4G"  # sparse raw file; the guests' writes go to their qcow2 overlays
BUILD_TIMEOUT = 3600.0
BUILD_TOOLS = ("mmdebstrap", "mke2fs", "qemu-img")

# What the example fleet and the tests need, so nothing is downloaded at test time: the mesh
# (strongSwan with its pki tool and plugins, ifupdown for the IP-IP stanzas, tcpdump for verify's
# capture), the firewall (iptables + persistence), Apache + mod_jk, MariaDB + AppArmor for the
# moved-datadir case, and what the engine and verify run on a host (coreutils/findutils are
# essential; procps, psmisc, curl, iputils-ping, openssl, sudo).
PACKAGES: tuple[str, ...] = (
    "linux-image-amd64",
    "systemd-sysv",
    "udev",
    "kmod",
    "openssh-server",
    "iproute2",
    "ifupdown",
    "iptables",
    "iptables-persistent",
    "conntrack",
    "strongswan-charon",
    "strongswan-swanctl",
    "strongswan-pki",
    "strongswan-starter",
    "libstrongswan-standard-plugins",
    "libstrongswan-extra-plugins",
    "libcharon-extra-plugins",
    "apparmor",
    "apparmor-utils",
    "apache2",
    "libapache2-mod-jk",
    "mariadb-server",
    "tcpdump",
    "iputils-ping",
    "curl",
    "openssl",
    "procps",
    "psmisc",
    "sudo",
    "ca-certificates",
    "netbase",
    "less",
)

# Run by the guest's systemd early in every boot, before networking and sshd: copies this
# guest's identity from its config disk (/dev/vdb, ext4, read-only) into place.
IDENTITY_SCRIPT = r"""#!/bin/sh
# reconciler lab: this guest's identity from its config disk (made by the lab, every boot).
set -eu
dev=/dev/vdb
mnt=/run/reconciler-lab-config
mkdir -p "$mnt"
mount -t ext4 -o ro,nosuid,nodev,noexec "$dev" "$mnt"
trap 'umount "$mnt"' EXIT
c=$mnt
install -m 0644 "$c/hostname" /etc/hostname
cat /etc/hostname > /proc/sys/kernel/hostname
install -m 0644 "$c/hosts" /etc/hosts
install -m 0644 "$c/interfaces" /etc/network/interfaces
install -m 0600 "$c/ssh_host_ed25519_key" /etc/ssh/ssh_host_ed25519_key
install -m 0644 "$c/ssh_host_ed25519_key.pub" /etc/ssh/ssh_host_ed25519_key.pub
install -d -m 0700 /root/.ssh
install -m 0600 "$c/authorized_keys" /root/.ssh/authorized_keys
echo "reconciler-lab-identity: $(cat /etc/hostname) ready" > /dev/console
"""

IDENTITY_UNIT = """[Unit]
Description=reconciler lab: hostname, address and SSH keys from the config disk
DefaultDependencies=no
Requires=dev-vdb.device
After=dev-vdb.device systemd-remount-fs.service
Before=sysinit.target network-pre.target networking.service ssh.service
Wants=network-pre.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/reconciler-lab-identity

[Install]
WantedBy=sysinit.target
"""

SSHD_CONF = """# reconciler lab guest: key authentication only, the one host key from the config disk
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UseDNS no
# no PAM session per login (no logind here): a new SSH connection costs 1.5 s instead of 4.5 s
# under emulation
UsePAM no
MaxStartups 400:30:800
MaxSessions 200
"""

# Services the reconciler starts itself (it enables what the fleet declares), timers and
# gettys of no use in a lab guest (they would cost CPU under emulation at every boot).
DISABLED_UNITS = ("apache2.service", "mariadb.service", "strongswan-starter.service")
MASKED_UNITS = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "fstrim.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "getty@tty1.service",
)
# an initramfs with just what mounts /dev/vda (virtio, ext4): 35 MB -> a few MB, faster boot
INITRAMFS_MODULES = ("virtio_pci", "virtio_blk", "ext4", "crc32c_generic")
# a fixed machine id: the first boot is not a "first boot" (no unit presets re-enabling what
# is disabled above); guests never meet outside the lab
MACHINE_ID = "5eed0f1ab0000000000000000000c0de"


def _heredoc(path: str, text: str, mode: str) -> str:
    return f'cat > "$R{path}" <<\'RECONCILER_EOF\'\n{text}RECONCILER_EOF\nchmod {mode} "$R{path}"\n'


CUSTOMIZE_SCRIPT = (
    "#!/bin/sh\n# reconciler lab: customize the guest root (mmdebstrap --customize-hook, $1 = root)\n"
    "set -eu\nR=$1\n"
    + _heredoc("/usr/local/sbin/reconciler-lab-identity", IDENTITY_SCRIPT, "0755")
    + _heredoc("/etc/systemd/system/reconciler-lab-identity.service", IDENTITY_UNIT, "0644")
    + _heredoc("/etc/ssh/sshd_config.d/reconciler-lab.conf", SSHD_CONF, "0644")
    + 'chroot "$R" systemctl enable reconciler-lab-identity.service\n'
    + f'chroot "$R" systemctl disable {" ".join(DISABLED_UNITS)}\n'
    + f'chroot "$R" systemctl mask {" ".join(MASKED_UNITS)}\n'
    + "# no host key of the build, no firewall rules saved from the build machine\n"
    + 'rm -f "$R"/etc/ssh/ssh_host_*\n'
    + 'rm -f "$R/etc/iptables/rules.v4" "$R/etc/iptables/rules.v6"\n'
    + f'echo {MACHINE_ID} > "$R/etc/machine-id"\n'
    + 'echo "/dev/vda / ext4 rw,errors=remount-ro 0 1" > "$R/etc/fstab"\n'
    + 'echo lab > "$R/etc/hostname"\n'
    + "printf '%s\\n' "
    + " ".join(INITRAMFS_MODULES)
    + ' >> "$R/etc/initramfs-tools/modules"\n'
    + "sed -i 's/^MODULES=.*/MODULES=list/' \"$R/etc/initramfs-tools/initramfs.conf\"\n"
    + 'chroot "$R" update-initramfs -u -k all\n'
)


# The prime boot: the finished disk is booted once, read-write, before it becomes the base, so
# the work of a first boot is done once for every guest: above all AppArmor compiling every
# profile for the guest kernel (28 s of a 62 s boot under emulation), then udev's hwdb, ldconfig,
# tmpfiles. systemd runs /bin/true after boot, then powers off (systemd-run-generator).
PRIME_APPEND = (
    "console=ttyS0 root=/dev/vda rw net.ifnames=0 systemd.show_status=0 random.trust_cpu=on "
    "systemd.run=/bin/true systemd.run_success_action=poweroff systemd.run_failure_action=poweroff"
)
PRIME_TIMEOUT = 900.0


def image_key() -> str:
    """Hash of everything that decides the image's content."""
    recipe = {
        "suite": SUITE,
        "packages": sorted(PACKAGES),
        "customize": CUSTOMIZE_SCRIPT,
        "disk_size": DISK_SIZE,
        "variant": "apt",
        "prime": PRIME_APPEND,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class BaseImage:
    key: str
    directory: Path
    disk: Path  # raw ext4, the guests' backing file (never written)
    kernel: Path
    initrd: Path
    build_seconds: float = 0.0


def _image_at(directory: Path) -> BaseImage | None:
    meta_path = directory / "image.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    img = BaseImage(
        key=str(meta.get("key", "")),
        directory=directory,
        disk=directory / "base.img",
        kernel=directory / "vmlinuz",
        initrd=directory / "initrd.img",
        build_seconds=float(meta.get("build_seconds", 0.0)),
    )
    if not all(p.is_file() for p in (img.disk, img.kernel, img.initrd)):
        return None
    return img


def cached_image(root: Path | None = None) -> BaseImage | None:
    """The image for the current recipe if it is built, else None."""
    return _image_at((root or CACHE_ROOT) / "images" / image_key())


def missing_tools() -> list[str]:
    return [t for t in BUILD_TOOLS if shutil.which(t) is None]


def ensure_image(
    root: Path | None = None,
    *,
    rebuild: bool = False,
    progress: Callable[[str], None] | None = None,
) -> BaseImage:
    """The base image for the current recipe, built first if it is not cached (minutes).
    Concurrent callers wait for one build (flock per key)."""
    root = root or CACHE_ROOT
    key = image_key()
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True, mode=0o755)
    final = images / key
    with flocked(images / f".{key}.lock", BUILD_TIMEOUT, poll=1.0, held="another image build held it"):
        img = _image_at(final)
        if img is not None and not rebuild:
            return img
        if rebuild and final.exists():
            shutil.rmtree(final)
        img = _build(root, key, progress or (lambda _m: None))
    _prune(images, keep=key)
    return img


def _run_logged(argv: list[str], logfile: Path, timeout: float, what: str) -> None:
    with open(logfile, "ab") as out:
        out.write(f"$ {shlex.join(argv)}\n".encode())
        out.flush()
        try:
            proc = subprocess.run(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            raise LabError(f"{what} timed out after {timeout:.0f}s (log: {logfile})") from None
    if proc.returncode != 0:
        tail = "\n".join(logfile.read_text(errors="replace").splitlines()[-20:])
        raise LabError(f"{what} failed with exit {proc.returncode} (log: {logfile}):\n{tail}")


def _build(root: Path, key: str, progress: Callable[[str], None]) -> BaseImage:
    missing = missing_tools()
    if missing:
        raise LabError(f"building the VM base image needs {', '.join(missing)} (scripts/install.sh)")
    t0 = time.monotonic()
    images = root / "images"
    debs = root / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    work = images / f".build-{key}-{os.getpid()}"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(mode=0o755)
    try:
        rootfs = work / "rootfs"
        hook = work / "customize.sh"
        atomic_write(hook, CUSTOMIZE_SCRIPT, 0o755)
        logfile = work / "build.log"
        q = shlex.quote
        argv = [
            "mmdebstrap",
            "--variant=apt",
            '--aptopt=Acquire::Retries "3"',
            f"--include={','.join(PACKAGES)}",
            "--skip=essential/unlink",
            '--setup-hook=mkdir -p "$1"/var/cache/apt/archives/',
            f"--setup-hook=sync-in {q(str(debs))} /var/cache/apt/archives/",
            f"--customize-hook=sync-out /var/cache/apt/archives {q(str(debs))}",
            '--customize-hook=rm -f "$1"/var/cache/apt/archives/*.deb',
            f'--customize-hook=sh {q(str(hook))} "$1"',
            SUITE,
            str(rootfs),
        ]
        progress(f"building the VM base image {key} with mmdebstrap (a few minutes; log {logfile})")
        _run_logged(argv, logfile, BUILD_TIMEOUT, "mmdebstrap")
        kernels = sorted((rootfs / "boot").glob("vmlinuz-*"))
        initrds = sorted((rootfs / "boot").glob("initrd.img-*"))
        if len(kernels) != 1 or len(initrds) != 1:
            raise LabError(
                f"image {key}: expected one kernel and one initrd in /boot, found {kernels} {initrds}"
            )
        shutil.copyfile(kernels[0], work / "vmlinuz")
        shutil.copyfile(initrds[0], work / "initrd.img")
        progress("writing the ext4 disk image (mke2fs -d)")
        _run_logged(
            [
                "mke2fs",
                "-q",
                "-F",
                "-t",
                "ext4",
                "-L",
                "rclroot",
                "-d",
                str(rootfs),
                str(work / "base.img"),
                DISK_SIZE,
            ],
            logfile,
            600,
            "mke2fs",
        )
        shutil.rmtree(rootfs)
        t_prime = time.monotonic()
        progress("prime boot: booting the image once so every guest starts from a booted system")
        _prime(work, logfile)
        prime_seconds = time.monotonic() - t_prime
        seconds = time.monotonic() - t0
        meta = {
            "key": key,
            "suite": SUITE,
            "packages": list(PACKAGES),
            "kernel": kernels[0].name,
            "disk_size": DISK_SIZE,
            "build_seconds": round(seconds, 1),
            "prime_seconds": round(prime_seconds, 1),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        atomic_write(work / "image.json", json.dumps(meta, indent=2) + "\n", 0o644)
        work.rename(images / key)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    img = _image_at(images / key)
    if img is None:  # pragma: no cover - just written
        raise LabError(f"image {key}: incomplete after build")
    log.info("lab.vm.image_built", key=key, seconds=round(seconds, 1))
    progress(f"VM base image {key} built in {seconds:.0f} s")
    return img


def _prime(work: Path, logfile: Path) -> None:
    """Boot ``work/base.img`` once, read-write, until systemd powers it off (see PRIME_APPEND)."""
    from reconciler.lab import vm_accel

    cfg = work / "prime-config"
    cfg.mkdir()
    files = {
        "hostname": "prime\n",
        "hosts": "127.0.0.1\tlocalhost\n",
        "interfaces": "auto lo\niface lo inet loopback\n\nsource /etc/network/interfaces.d/*\n",
        "ssh_host_ed25519_key": "",
        "ssh_host_ed25519_key.pub": "",
        "authorized_keys": "",
    }
    for name, text in files.items():
        atomic_write(cfg / name, text, 0o600)
    cfg_img = work / "prime-config.img"
    _run_logged(
        ["mke2fs", "-q", "-F", "-t", "ext4", "-L", "rclcfg", "-d", str(cfg), str(cfg_img), "4M"],
        logfile,
        60,
        "mke2fs (prime config disk)",
    )
    accel = vm_accel.choose(work / "vmlinuz")
    console = work / "prime-console.log"
    argv = [
        vm_accel.QEMU, *accel.qemu_args(), "-m", "512", "-smp", "1",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-serial", f"file:{console}",
        "-kernel", str(work / "vmlinuz"), "-initrd", str(work / "initrd.img"), "-append", PRIME_APPEND,
        "-drive", f"file={work / 'base.img'},if=virtio,format=raw,cache=writeback",
        "-drive", f"file={cfg_img},if=virtio,format=raw,readonly=on",
        "-device", "virtio-rng-pci",
    ]  # fmt: skip
    try:
        _run_logged(argv, logfile, PRIME_TIMEOUT, "the prime boot")
    except LabError as err:
        tail = "\n".join(console.read_text(errors="replace").splitlines()[-20:]) if console.exists() else ""
        raise LabError(f"{err}\nserial console:\n{tail}") from None
    text = console.read_text(errors="replace") if console.exists() else ""
    if "reboot: Power down" not in text:
        raise LabError(f"the prime boot did not power off cleanly (console: {console})")
    shutil.rmtree(cfg)
    cfg_img.unlink()


def _prune(images: Path, keep: str) -> None:
    """Remove images of older recipes and builds whose process died (never the one in use)."""
    for entry in images.iterdir():
        if entry.name == keep or not entry.is_dir():
            continue
        if entry.name.startswith(".build-"):
            pid = entry.name.rsplit("-", 1)[-1]
            if pid.isdigit() and Path(f"/proc/{pid}").exists():
                continue
        elif (images / f".{entry.name}.lock").exists():
            with contextlib.suppress(OSError):
                (images / f".{entry.name}.lock").unlink()
        log.info("lab.vm.image_pruned", path=str(entry))
        shutil.rmtree(entry, ignore_errors=True)
