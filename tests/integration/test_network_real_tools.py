"""Rendered network configuration against the real tools.

- every rendered ruleset passes ``iptables-restore --test`` in a scratch network namespace, and
  round-trips through ``iptables-restore``/``iptables-save`` rule for rule (so observed and
  desired compare cleanly);
- every rendered swanctl configuration is loaded by a real ``charon`` (private network and
  mount namespaces, rendered strongswan.d, tmpfs /run): ``swanctl --load-all`` exits 0 and
  ``swanctl --list-conns`` lists the n-1 peers; with libipsec the plugin is loaded;
- two hosts rendered with keys made by the rendered KeyPair commands establish IKEv2 with raw
  public keys over the libipsec datapath behind their rendered firewalls, and ping each other's
  internal /32;
- the ifupdown stanzas parse (``ifup --no-act``).

Namespaces, processes and mounts are per test run (prefix below) and removed even on failure;
charon is stopped by its PID.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "unit"))

from network_fleets import VARIANTS, example_fleet, make_host  # noqa: E402

from reconciler.commands.render import render_hosts, write_desired  # noqa: E402
from reconciler.fleet.model import Datapath, Fleet, IpsecBackend, MeshMode, frozen_map  # noqa: E402
from reconciler.netfilter.iptables import canonical_iptables  # noqa: E402

PREFIX = f"rcnnet{os.getpid() % 100000}"
CHARON = "/usr/lib/ipsec/charon"


def _need(*commands: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (network and mount namespaces)")
    for c in commands:
        if shutil.which(c) is None and not Path(c).exists():
            pytest.skip(f"{c} is not installed")


def run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, **kw)  # type: ignore[call-overload, no-any-return]


@contextmanager
def netns(suffix: str) -> Iterator[str]:
    name = f"{PREFIX}-{suffix}"
    run(["ip", "netns", "del", name])  # leftover of a crashed run with the same pid
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, timeout=10)
        yield name
    finally:
        run(["ip", "netns", "del", name])


def rules_of(text: str) -> list[str]:
    """Policies and rules of the filter table, comments and counters dropped."""
    out = []
    for line in text.splitlines():
        if line.startswith(":"):
            out.append(line.rsplit(" ", 1)[0])
        elif line.startswith("-A"):
            out.append(line)
    return out


def rendered(fleet: Fleet) -> dict[str, dict[str, bytes]]:
    desired = render_hosts(fleet, fleet.host_names())
    return {h: {f.path: f.content for f in d.files} for h, d in desired.items()}


# ---------------------------------------------------------------- iptables


@pytest.mark.lab
def test_every_rendered_ruleset_passes_iptables_restore_and_round_trips(tmp_path: Path) -> None:
    _need("ip", "iptables-restore", "iptables-save", "ip6tables-restore", "ip6tables-save")
    with netns("fw") as ns:
        for variant, fleet in VARIANTS.items():
            for host, files in rendered(fleet).items():
                for family, name in (("iptables", "rules.v4"), ("ip6tables", "rules.v6")):
                    path = tmp_path / f"{variant}-{host}.{name}"
                    path.write_bytes(files[f"/etc/iptables/{name}"])
                    where = f"{variant}/{host}/{name}"
                    test = run(["ip", "netns", "exec", ns, f"{family}-restore", "--test", str(path)])
                    assert test.returncode == 0, f"{where}: {test.stderr}"
                    load = run(["ip", "netns", "exec", ns, f"{family}-restore", str(path)])
                    assert load.returncode == 0, f"{where}: {load.stderr}"
                    saved = run(["ip", "netns", "exec", ns, f"{family}-save", "-t", "filter"])
                    assert saved.returncode == 0
                    assert rules_of(saved.stdout) == rules_of(path.read_text()), where
                    # and the engine's canonical form (what plan compares) agrees
                    live = canonical_iptables(saved.stdout).tables["filter"]
                    assert live == canonical_iptables(path.read_text()).tables["filter"], where
        path = tmp_path / "strongswan-ipip-kernel-web1.rules.v4"
        # and a broken ruleset really is refused, the old rules staying
        bad = tmp_path / "bad.rules"
        bad.write_text(path.read_text().replace("COMMIT", "-A INPUT -p nosuchproto -j ACCEPT\nCOMMIT"))
        refused = run(["ip", "netns", "exec", ns, "iptables-restore", "--test", str(bad)])
        assert refused.returncode != 0 and "line" in refused.stderr


# ---------------------------------------------------------------- charon


def strongswan_d(root: Path, files: dict[str, bytes]) -> Path:
    """A copy of the machine's /etc/strongswan.d with the rendered files laid over it."""
    target = root / "strongswan.d"
    shutil.copytree("/etc/strongswan.d", target, symlinks=True)
    for path, content in files.items():
        if path.startswith("/etc/strongswan.d/"):
            dest = target / path.removeprefix("/etc/strongswan.d/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(content)
    return target


def swanctl_dir(root: Path, files: dict[str, bytes]) -> Path:
    """An /etc/swanctl: Debian's swanctl.conf (include conf.d/*.conf) plus the rendered files."""
    target = root / "swanctl"
    for sub in ("conf.d", "pubkey", "private"):
        (target / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy("/etc/swanctl/swanctl.conf", target / "swanctl.conf")
    for path, content in files.items():
        if path.startswith("/etc/swanctl/"):
            dest = target / path.removeprefix("/etc/swanctl/")
            dest.write_bytes(content)
    return target


@contextmanager
def charon(ns: str, root: Path, sd: Path, swanctl: Path | None = None) -> Iterator[int]:
    """charon in network namespace ``ns`` and a private mount namespace: tmpfs /run, /var/log
    from ``root``, the given strongswan.d (and /etc/swanctl, if given). Yields its PID."""
    log = root / "log"
    log.mkdir(exist_ok=True)
    mounts = [
        "mount -t tmpfs tmpfs /run",
        f'mount --bind "{log}" /var/log',
        f'mount --bind "{sd}" /etc/strongswan.d',
    ]
    if swanctl is not None:
        mounts.append(f'mount --bind "{swanctl}" /etc/swanctl')
    script = " && ".join(mounts) + f" && exec {CHARON}"
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, "unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while run(["nsenter", "-t", str(proc.pid), "-m", "test", "-S", "/run/charon.vici"]).returncode != 0:
            assert proc.poll() is None, "charon exited at start"
            assert time.monotonic() < deadline, "charon did not open its vici socket"
            time.sleep(0.05)
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def in_charon(pid: int, argv: list[str]) -> subprocess.CompletedProcess[str]:
    return run(["nsenter", "-t", str(pid), "-m", "-n", *argv])


STRONGSWAN_VARIANTS = [v for v, f in VARIANTS.items() if f.mesh.backend is IpsecBackend.STRONGSWAN]


@pytest.mark.lab
@pytest.mark.parametrize("variant", STRONGSWAN_VARIANTS)
def test_every_rendered_swanctl_config_loads_into_real_charon(variant: str, tmp_path: Path) -> None:
    _need("ip", "unshare", "nsenter", "swanctl", CHARON)
    fleet = VARIANTS[variant]
    hosts = rendered(fleet)
    first = fleet.host_names()[0]
    sd = strongswan_d(tmp_path, hosts[first])
    with netns(f"sw{STRONGSWAN_VARIANTS.index(variant)}") as ns, charon(ns, tmp_path, sd) as pid:
        if fleet.mesh.datapath is Datapath.LIBIPSEC:
            stats = in_charon(pid, ["swanctl", "--stats"])
            assert "kernel-libipsec" in stats.stdout
        for host, files in hosts.items():
            sw = swanctl_dir(tmp_path / host, files)
            # the host's own public key, as its KeyPair would have made it
            shutil.copy(
                Path(__file__).parent.parent / "fixtures" / "keys" / "strongswan" / f"{host}.pub",
                sw / "pubkey" / f"{host}.pem",
            )
            loaded = in_charon(
                pid, ["swanctl", "--load-all", "--noprompt", "--file", str(sw / "swanctl.conf")]
            )
            assert loaded.returncode == 0, f"{host}: {loaded.stdout}{loaded.stderr}"
            conns = in_charon(pid, ["swanctl", "--list-conns"])
            assert conns.returncode == 0
            names = sorted(
                line.split(":")[0] for line in conns.stdout.splitlines() if line and line[0] != " "
            )
            assert names == sorted(f"mesh-{p}" for p in fleet.host_names() if p != host)
        log = (tmp_path / "log" / "charon.log").read_text()
        assert "charon" in log  # the rendered filelog writes, line-flushed


# ---------------------------------------------------------------- a real link


def two_host_fleet() -> Fleet:
    base = example_fleet(mode=MeshMode.TUNNEL, datapath=Datapath.LIBIPSEC, keys=False)
    hosts = (make_host("web1", 11, ("web",)), make_host("web2", 12, ("web",)))
    return replace(base, hosts=hosts)


@pytest.mark.lab
def test_libipsec_pair_establishes_with_raw_keys_and_pings_behind_rendered_firewalls(tmp_path: Path) -> None:
    """The rendered KeyPair commands make the keys, the rendered configs (ids, raw public keys,
    tunnel-mode selectors, one initiator) bring the CHILD_SA up, the rendered firewalls let
    IKE/NAT-T and ipsec0 traffic through."""
    _need("ip", "unshare", "nsenter", "swanctl", "openssl", "iptables-restore", "ping", CHARON)
    fleet = two_host_fleet()
    # 1. each host makes its key pair with the rendered argv lists (in its own /etc/swanctl)
    roots = {h: tmp_path / h for h in fleet.host_names()}
    keys: dict[str, str] = {}
    with netns("pair-a") as ns_a, netns("pair-b") as ns_b:
        nss = {"web1": ns_a, "web2": ns_b}
        run(
            [
                "ip",
                "link",
                "add",
                f"{PREFIX}a",
                "netns",
                ns_a,
                "type",
                "veth",
                "peer",
                f"{PREFIX}b",
                "netns",
                ns_b,
            ]
        )
        for host, ns, dev in (("web1", ns_a, f"{PREFIX}a"), ("web2", ns_b, f"{PREFIX}b")):
            h = fleet.host(host)
            for argv in (
                ["ip", "-n", ns, "link", "set", dev, "name", "eth0"],
                ["ip", "-n", ns, "addr", "add", f"{h.public_address}/24", "dev", "eth0"],
                ["ip", "-n", ns, "link", "set", "eth0", "up"],
                ["ip", "-n", ns, "addr", "add", f"{h.internal_address}/32", "dev", "lo"],
            ):
                subprocess.run(argv, check=True, timeout=10)
        first = render_hosts(fleet, fleet.host_names())
        for host, d in first.items():
            sw = swanctl_dir(roots[host], {})
            (kp,) = d.keypairs
            script = f'mount --bind "{sw}" /etc/swanctl && ' + " && ".join(
                " ".join(f"'{w}'" for w in argv) for argv in kp.generate
            )
            gen = run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script])
            assert gen.returncode == 0, gen.stderr
            assert (sw / "private" / f"{host}.pem").stat().st_mode & 0o077 == 0
            assert not list(sw.glob(".*.new"))
            keys[host] = (sw / "pubkey" / f"{host}.pem").read_text()
        # 2. "keys collect": the fleet now knows both public keys; render again and write
        fleet = replace(fleet, public_keys=frozen_map(keys))
        desired = render_hosts(fleet, fleet.host_names())
        assert all(not d.pending for d in desired.values())
        write_desired(tmp_path / "out", desired, per_host=True)
        procs: dict[str, int] = {}
        with ExitStack() as stack:
            for host, d in desired.items():
                files = {f.path: f.content for f in d.files}
                sw = swanctl_dir(roots[host], files)
                rules = roots[host] / "rules.v4"
                rules.write_bytes(files["/etc/iptables/rules.v4"])
                fw = run(["ip", "netns", "exec", nss[host], "iptables-restore", str(rules)])
                assert fw.returncode == 0, fw.stderr
                sd = strongswan_d(roots[host], files)
                procs[host] = stack.enter_context(charon(nss[host], roots[host], sd, sw))
            # the responder first: an initiator that gets NO_PROPOSAL_CHOSEN from a charon without
            # its config does not retry (see docs/NETWORK.md)
            for _host, pid in sorted(procs.items(), reverse=True):
                loaded = in_charon(pid, ["swanctl", "--load-all", "--noprompt"])
                assert loaded.returncode == 0, loaded.stdout + loaded.stderr
            # web1 sorts first: it initiates; web2 only responds
            deadline = time.monotonic() + 20
            while True:
                sas = in_charon(procs["web1"], ["swanctl", "--list-sas"])
                if "INSTALLED" in sas.stdout:
                    break
                assert time.monotonic() < deadline, (
                    "CHILD_SA not installed:\n"
                    + sas.stdout
                    + (roots["web1"] / "log" / "charon.log").read_text()[-3000:]
                )
                time.sleep(0.2)
            assert "ESTABLISHED" in sas.stdout and "mesh-web2-net" in sas.stdout
            ping = run(
                ["ip", "netns", "exec", ns_a, "ping", "-c", "2", "-W", "2", "-I", "10.99.0.11", "10.99.0.12"]
            )
            assert ping.returncode == 0, ping.stdout + ping.stderr
            # the peer admitted the first packet by its ping rule (the rest as ESTABLISHED): the
            # mesh is least privilege, there is no blanket accept of the peer on ipsec0
            counters = run(["ip", "netns", "exec", ns_b, "iptables", "-L", "INPUT", "-v", "-n", "-x"]).stdout
            echo = [line for line in counters.splitlines() if "icmptype 8" in line]
            assert echo and int(echo[0].split()[0]) >= 1, counters
            assert not [line for line in counters.splitlines() if "ipsec0" in line], counters


# ---------------------------------------------------------------- ifupdown


def test_rendered_ifupdown_stanzas_parse(tmp_path: Path) -> None:
    if shutil.which("ifup") is None:
        pytest.skip("ifupdown is not installed (apt-get install ifupdown)")
    for variant in ("strongswan-ipip-kernel", "strongswan-tunnel-kernel"):
        desired = render_hosts(VARIANTS[variant], VARIANTS[variant].host_names())
        for host, d in desired.items():
            for f in d.files:
                if not f.path.startswith("/etc/network/interfaces.d/"):
                    continue
                (validator,) = f.validators
                path = tmp_path / f"{variant}-{host}-{Path(f.path).name}"
                path.write_bytes(f.content)
                argv = [str(path) if a == "{path}" else a for a in validator.argv]
                argv += ["--state-dir", str(tmp_path / "state")]
                result = run(argv)
                assert result.returncode == 0, f"{variant}/{host}: {result.stderr}"
                if f.path.endswith("reconciler-mesh-lo"):
                    assert f"ip addr add {desired[host].addresses[0].address.split('/')[0]}/" in result.stderr
                else:
                    t = next(t for t in d.tunnels if f.path.endswith(t.name))
                    assert (
                        f"ip tunnel add {t.name} mode ipip remote {t.remote} local {t.local}" in result.stderr
                    )
