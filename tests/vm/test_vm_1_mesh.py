"""The example fleet exactly as shipped (mode ipip, datapath kernel) on four QEMU guests.

The namespace lab's kernel has no ipip and no kernel ESP; the guests' Debian 12 kernel has both.
Proven here: the fleet converges through the real engine (systemd as PID 1), every host has
its IP-IP tunnels up, `verify` passes every check for all 12 ordered pairs, with a capture on
eth0 showing ESP as protocol 50 (not UDP 4500) and no clear IP-IP; a second apply changes
nothing. Then the attacker's packet: a clear IP-IP packet with a peer's source address, sent
from the lab network, is dropped, and the counters show by what.
"""

from __future__ import annotations

import asyncio
import re
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from vm_fleet import converge, pool_for, sh

from reconciler.engine.fleet import IN_SYNC, reconcile_fleet
from reconciler.fleet.model import Fleet
from reconciler.host import netns
from reconciler.lab import Lab
from reconciler.verify import Status, VerifyOptions, VerifyReport, verify_fleet

pytestmark = [pytest.mark.lab, pytest.mark.vm, pytest.mark.timeout(1800)]

_fleet: list[Fleet] = []


def verify(fleet: Fleet, lab: Lab) -> VerifyReport:
    async def main() -> VerifyReport:
        async with pool_for(fleet, lab) as pool:
            return await verify_fleet(fleet, None, pool, options=VerifyOptions(host_timeout=300))

    return asyncio.run(main())


def first_packets(fleet: Fleet, lab: Lab, timeout: float = 180) -> None:
    """Send each pair its first packets and wait until every CHILD_SA is installed.

    The kernel datapath installs trap policies: the first packet between two hosts makes
    charon negotiate the pair's CHILD_SA (traffic waits or is dropped meanwhile). Under
    emulation that takes seconds, longer than verify's three pings 0.2 s apart; on real
    hardware tens of milliseconds. This is the traffic that would flow anyway."""
    from concurrent.futures import ThreadPoolExecutor

    def kick(h: str) -> None:
        peers = " ".join(str(p.internal_address) for p in fleet.peers_of(fleet.host(h)))
        own = fleet.host(h).internal_address
        lab.exec(
            h, ["sh", "-c", f"for p in {peers}; do ping -n -q -c 3 -W 5 -I {own} $p & done; wait"], timeout=60
        )

    with ThreadPoolExecutor(max_workers=len(fleet.hosts)) as pool:
        list(pool.map(kick, fleet.host_names()))
    deadline = time.monotonic() + timeout
    pending = list(fleet.host_names())
    while pending and time.monotonic() < deadline:
        pending = [
            h
            for h in pending
            if sh(lab, h, "swanctl --list-sas").count("INSTALLED, TRANSPORT")
            < len(fleet.peers_of(fleet.host(h)))
        ]
        if pending:
            time.sleep(3)
    assert not pending, f"CHILD_SAs not installed on {pending} after {timeout:.0f} s"


def converged(vm_lab: Lab, example_repo: Path) -> Fleet:
    if not _fleet:
        _fleet.append(converge(example_repo, vm_lab))
    return _fleet[0]


def test_example_as_shipped_converges_with_ipip_in_kernel_esp(vm_lab: Lab, example_repo: Path) -> None:
    fleet = converged(vm_lab, example_repo)
    assert fleet.mesh.mode.value == "ipip" and fleet.mesh.datapath.value == "kernel"

    # systemd is PID 1, and the guest kernel has what the namespace lab's lacks
    assert sh(vm_lab, "web1", "cat /proc/1/comm").strip() == "systemd"
    # every host: one IP-IP tunnel per peer, up, with its internal address
    for h in fleet.hosts:
        links = sh(vm_lab, h.name, "ip -d -o link show type ipip")
        for peer in fleet.peers_of(h):
            want = (
                rf"ipip-{peer.name}@\S+: <([^>]*)>.*link/ipip {h.public_address} peer {peer.public_address}"
            )
            m = re.search(want, links)
            assert m and "UP" in m.group(1).split(","), (h.name, peer.name, links)
        addrs = sh(vm_lab, h.name, "ip -o -4 addr show")
        assert str(h.internal_address) in addrs
        # transport-mode ESP policies in the kernel, for protocol 4 (ipencap) only
        policies = sh(vm_lab, h.name, "ip xfrm policy")
        assert "proto ipencap" in policies and "mode transport" in policies, policies

    first_packets(fleet, vm_lab)
    report = verify(fleet, vm_lab)
    failed = [c for c in report.checks if c.status is Status.FAIL]
    assert not failed, "\n".join(f"{c.host}->{c.peer} {c.name}: {c.cause}" for c in failed)
    datapath = [c for c in report.checks if c.name == "datapath"]
    assert len(datapath) == 12 and all(c.status is Status.PASS for c in datapath)
    for c in datapath:
        d = c.details
        assert d["esp_out"] and d["esp_in"], c.evidence  # ESP on the wire, both ways
        assert d["esp_udp_encapsulated"] == 0, c.evidence  # protocol 50, not UDP 4500
        assert d["clear_icmp"] == 0 and d["clear_ipip"] == 0, c.evidence
    children = [c for c in report.checks if c.name == "ipsec.child"]
    assert len(children) == 12 and all(c.status is Status.PASS for c in children)

    # converged: a second run plans nothing
    async def plan() -> list[str]:
        async with pool_for(fleet, vm_lab) as pool:
            result = await reconcile_fleet(fleet, None, pool, apply=False)
        return [f"{h.host}: {h.status} {h.error or ''}" for h in result.hosts if h.status != IN_SYNC]

    assert asyncio.run(plan()) == []


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def _ipv4(src: str, dst: str, proto: int, payload: bytes, ident: int) -> bytes:
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0, 64, proto, 0,
        socket.inet_aton(src), socket.inet_aton(dst),
    )  # fmt: skip
    return header[:10] + struct.pack("!H", _checksum(header)) + header[12:] + payload


def clear_ipip_ping(outer_src: str, outer_dst: str, inner_src: str, inner_dst: str, ident: int) -> bytes:
    """An IP-IP packet (protocol 4) carrying an ICMP echo request, with no IPsec at all."""
    icmp = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"reconciler-vm-clear-ipip"
    icmp = icmp[:2] + struct.pack("!H", _checksum(icmp)) + icmp[4:]
    inner = _ipv4(inner_src, inner_dst, 1, icmp, ident)
    return _ipv4(outer_src, outer_dst, 4, inner, ident + 1)


@dataclass(frozen=True)
class Counters:
    policy_drop: int  # INPUT's DROP policy
    clear_guard: int  # `-i eth0 -p ipencap -m policy --dir in --pol none -j DROP`, before ESTABLISHED
    ipsec_rule: int  # the peer's `-p ipencap -m policy --dir in --pol ipsec -j ACCEPT` rule
    xfrm_tmpl_mismatch: int  # the kernel's xfrm input check: IP-IP that arrived without ESP
    tunnel_rx: int  # packets the ipip-web2 interface received (decapsulated)


def counters(lab: Lab, peer_public: str) -> Counters:
    out = sh(lab, "web1", "iptables -L INPUT -v -x -n; cat /proc/net/xfrm_stat; "
                          "echo rx $(cat /sys/class/net/ipip-web2/statistics/rx_packets)")  # fmt: skip
    policy = int(re.search(r"policy DROP (\d+) packets", out).group(1))  # type: ignore[union-attr]
    rule = sum(
        int(line.split()[0])
        for line in out.splitlines()
        if "policy match dir in pol ipsec" in line and peer_public in line
    )
    guard = sum(
        int(line.split()[0])
        for line in out.splitlines()
        if len(line.split()) > 3
        and line.split()[2] == "DROP"
        and line.split()[3] in ("ipencap", "4")
        and "policy match dir in pol none" in line
    )
    tmpl = int(re.search(r"XfrmInTmplMismatch\s+(\d+)", out).group(1))  # type: ignore[union-attr]
    rx = int(re.search(r"^rx (\d+)$", out, re.M).group(1))  # type: ignore[union-attr]
    return Counters(policy, guard, rule, tmpl, rx)


def forge(lab: Lab, fleet: Fleet, ident: int) -> list[bytes]:
    """From the lab's network: three clear IP-IP packets "from web2" to web1, each carrying an
    ICMP echo request between their internal addresses. Returns what web1 sent back in clear
    IP-IP (nothing, if the packets were dropped). A capture on web1 proves they arrived."""
    web1, web2 = fleet.host("web1"), fleet.host("web2")
    cap = lab.exec(
        "web1",
        ["sh", "-c", f"rm -f /tmp/forged.cap; timeout 60 tcpdump -n -l -i eth0 -c 3 "
                     f"'ip proto 4 and src host {web2.public_address}' >/tmp/forged.cap 2>/tmp/forged.err & "
                     "i=0; until grep -q listening /tmp/forged.err; do i=$((i+1)); "
                     "[ $i -gt 100 ] && exit 1; sleep 0.1; done"],
        timeout=60,
    )  # fmt: skip
    assert cap.returncode == 0, cap.stderr
    ns = lab.info.ssh_netns
    sock = netns.socket_in(ns, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    reply = netns.socket_in(ns, socket.AF_INET, socket.SOCK_RAW, 4)
    answered = []
    try:
        reply.settimeout(0.5)
        packet = clear_ipip_ping(
            str(web2.public_address), str(web1.public_address),
            str(web2.internal_address), str(web1.internal_address), ident,
        )  # fmt: skip
        for _ in range(3):
            sock.sendto(packet, (str(web1.public_address), 0))
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                data, addr = reply.recvfrom(2048)
            except TimeoutError:
                continue
            if addr[0] == str(web1.public_address):
                answered.append(data)
    finally:
        sock.close()
        reply.close()
    wait = "i=0; until [ $(wc -l < /tmp/forged.cap) -ge 3 ] || [ $i -gt 100 ]; do i=$((i+1)); sleep 0.1; done"
    seen = sh(lab, "web1", f"{wait}; cat /tmp/forged.cap")
    outer = f"{web2.public_address} > {web1.public_address}"
    want = f"{outer}: IP {web2.internal_address} > {web1.internal_address}: ICMP echo request"
    assert seen.count(want) == 3, seen  # they reached web1's wire
    return answered


def test_clear_ipip_from_a_peer_address_is_dropped(vm_lab: Lab, example_repo: Path) -> None:
    """The attacker on the lab network forges IP-IP with web2's public address as source, to
    web1, without ESP. Each packet reaches web1 (a capture there sees it) and is dropped by the
    firewall's clear IP-IP guard (`-p ipencap -m policy --dir in --pol none -j DROP`, which comes
    BEFORE the ESTABLISHED rule): never decapsulated, no echo reply. Two cases:

    - no tracked IP-IP flow between the two (conntrack cleared);
    - right after protected tunnel traffic (verify's pings): conntrack has the (protected) flow,
      and without the guard's place before ESTABLISHED the forged packet would pass as part of
      it (only the kernel's xfrm input check, XfrmInTmplMismatch, stopped it before the guard
      existed). The guard's counter takes the three packets; the xfrm counter does not move."""
    fleet = converged(vm_lab, example_repo)
    peer = str(fleet.host("web2").public_address)

    # 1. no tracked flow
    sh(vm_lab, "web1", "conntrack -D -p 4 >/dev/null 2>&1; true")
    before = counters(vm_lab, peer)
    assert forge(vm_lab, fleet, 0x5A50) == []
    after = counters(vm_lab, peer)
    assert after.clear_guard >= before.clear_guard + 3  # the firewall's guard dropped them
    assert after.ipsec_rule == before.ipsec_rule  # the ipsec-only rule did not admit them
    assert after.xfrm_tmpl_mismatch == before.xfrm_tmpl_mismatch  # they never got that far
    assert after.tunnel_rx == before.tunnel_rx

    # 2. with the protected flow tracked: still the firewall's guard, before ESTABLISHED
    sh(vm_lab, "web1", f"ping -n -q -c 2 -W 5 -I {fleet.host('web1').internal_address} "
                       f"{fleet.host('web2').internal_address}")  # fmt: skip
    assert "unknown  4" in sh(vm_lab, "web1", "conntrack -L -p 4 2>/dev/null")
    before = counters(vm_lab, peer)
    assert forge(vm_lab, fleet, 0x5A60) == []
    after = counters(vm_lab, peer)
    assert after.clear_guard >= before.clear_guard + 3
    assert after.ipsec_rule == before.ipsec_rule
    assert after.xfrm_tmpl_mismatch == before.xfrm_tmpl_mismatch
    assert after.tunnel_rx == before.tunnel_rx
