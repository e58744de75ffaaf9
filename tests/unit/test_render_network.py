"""What the network domains (ipsec, tunnels, firewall) render, as behaviour a user relies on."""

from __future__ import annotations

import re
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network
from types import MappingProxyType

import pytest
from network_fleets import VARIANTS, example_fleet, fixture_keys, make_host, with_hosts

from reconciler.domains import firewall, ipsec, tunnels
from reconciler.domains.render import merge
from reconciler.domains.tunnels import tunnel_name
from reconciler.errors import RenderError
from reconciler.fleet.model import (
    Datapath,
    Fleet,
    IpsecBackend,
    Mesh,
    MeshMode,
    RacoonProposal,
    ServicePort,
    Topology,
)
from reconciler.kinds.resources import Desired
from reconciler.netfilter.check import Packet, verdict


def desired(fleet: Fleet, host: str) -> Desired:
    h = fleet.host(host)
    return merge(
        host,
        [
            (n, m.render(fleet, h))
            for n, m in (("firewall", firewall), ("ipsec", ipsec), ("tunnels", tunnels))
        ],
    )


def files(d: Desired) -> dict[str, str]:
    return {f.path: f.content.decode() for f in d.files}


def conf_value(text: str, key: str) -> list[str]:
    return re.findall(rf"^\s*{re.escape(key)} = (.*)$", text, flags=re.M)


# ---------------------------------------------------------------- strongSwan


def test_each_host_gets_one_connection_per_peer_with_matching_identities_and_keys() -> None:
    fleet = example_fleet()
    for host in fleet.hosts:
        f = files(desired(fleet, host.name))
        confs = {p: t for p, t in f.items() if p.startswith("/etc/swanctl/conf.d/")}
        assert sorted(confs) == sorted(
            f"/etc/swanctl/conf.d/mesh-{p.name}.conf" for p in fleet.peers_of(host)
        )
        for peer in fleet.peers_of(host):
            text = confs[f"/etc/swanctl/conf.d/mesh-{peer.name}.conf"]
            assert conf_value(text, "id") == [str(host.public_address), str(peer.public_address)]
            assert conf_value(text, "pubkeys") == [f"{host.name}.pem", f"{peer.name}.pem"]
            assert conf_value(text, "auth") == ["pubkey", "pubkey"]
            assert conf_value(text, "local_ts") == ["dynamic[ipencap]"]
            assert conf_value(text, "mode") == ["transport"]
            assert conf_value(text, "start_action") == ["trap"]
            assert conf_value(text, "proposals") == [",".join(fleet.mesh.ike_proposals)]
            assert conf_value(text, "esp_proposals") == [",".join(fleet.mesh.esp_proposals)]
            assert conf_value(text, "rekey_time") == ["14400s", "3600s"]
            # the peer's key is installed as the fleet has it
            assert f[f"/etc/swanctl/pubkey/{peer.name}.pem"] == fleet.public_keys[peer.name]
        # this host's own key is made on the host, never rendered
        assert f"/etc/swanctl/pubkey/{host.name}.pem" not in f


def test_private_keys_are_never_rendered_and_key_generation_uses_no_shell() -> None:
    for fleet in VARIANTS.values():
        for host in fleet.host_names():
            d = desired(fleet, host)
            for f in d.files:
                assert b"PRIVATE KEY" not in f.content and b": RSA" not in f.content
                assert not f.path.startswith("/etc/swanctl/private")
                assert f.path != "/etc/racoon/ipsec.key"
            (kp,) = d.keypairs
            assert kp.private_path not in {f.path for f in d.files}
            assert all(argv[0] not in ("sh", "bash") for argv in kp.generate)
            # the private key appears at its path only when complete (rename last)
            assert kp.generate[-1][:2] == ("mv", "-f") and kp.generate[-1][-1] == kp.private_path


def test_strongswan_keypair_is_p384_made_by_openssl() -> None:
    fleet = example_fleet()
    (kp,) = desired(fleet, "web1").keypairs
    assert kp.private_path == "/etc/swanctl/private/web1.pem"
    assert kp.public_path == "/etc/swanctl/pubkey/web1.pem"
    assert ("install", "-d", "-m", "0700", "/etc/swanctl/private") in kp.generate
    gen = next(a for a in kp.generate if a[:2] == ("openssl", "genpkey"))
    assert "ec_paramgen_curve:P-384" in gen


def test_peers_without_keys_are_pending_and_the_rest_still_renders() -> None:
    fleet = example_fleet(keys=("db1",))
    d = desired(fleet, "web1")
    f = files(d)
    assert [p for p in f if p.startswith("/etc/swanctl/conf.d/")] == ["/etc/swanctl/conf.d/mesh-db1.conf"]
    assert sorted(p.subject for p in d.pending) == ["ipsec peer db2", "ipsec peer web2"]
    assert all("keys collect" in p.reason and ".pub is missing" in p.reason for p in d.pending)
    # tunnels and firewall are there for every declared peer
    assert sorted(t.peer for t in d.tunnels) == ["db1", "db2", "web2"]
    assert d.firewall is not None and "-s 192.0.2.12/32" in d.firewall.rules_v4


def test_a_key_of_the_wrong_kind_is_pending_not_a_broken_file() -> None:
    fleet = example_fleet()
    keys = dict(fleet.public_keys)
    keys["web2"] = fixture_keys(IpsecBackend.RACOON, ("web2",))["web2"]
    keys["db2"] = "-----BEGIN PUBLIC KEY-----\nnot base64 at all!\n-----END PUBLIC KEY-----\n"
    fleet = replace(fleet, public_keys=keys)
    d = desired(fleet, "web1")
    f = files(d)
    assert "/etc/swanctl/conf.d/mesh-web2.conf" not in f and "/etc/swanctl/pubkey/web2.pem" not in f
    assert "/etc/swanctl/conf.d/mesh-db2.conf" not in f
    reasons = {p.subject: p.reason for p in d.pending}
    assert "not a PEM public key" in reasons["ipsec peer web2"]
    assert "not a PEM public key" in reasons["ipsec peer db2"]


def test_libipsec_one_initiator_per_pair_and_the_plugin_on() -> None:
    fleet = example_fleet(mode=MeshMode.TUNNEL, datapath=Datapath.LIBIPSEC)
    starts: dict[frozenset[str], list[str]] = {}
    for host in fleet.hosts:
        f = files(desired(fleet, host.name))
        assert "load = yes" in f["/etc/strongswan.d/charon/kernel-libipsec.conf"]
        assert "flush_line = yes" in f["/etc/strongswan.d/charon-reconciler-log.conf"]
        for peer in fleet.peers_of(host):
            text = f[f"/etc/swanctl/conf.d/mesh-{peer.name}.conf"]
            assert conf_value(text, "mode") == ["tunnel"]
            assert conf_value(text, "local_ts") == [f"{host.internal_address}/32"]
            assert conf_value(text, "remote_ts") == [f"{peer.internal_address}/32"]
            assert "trap" not in text
            (action,) = conf_value(text, "start_action")
            if action == "start":
                starts.setdefault(frozenset((host.name, peer.name)), []).append(host.name)
    pairs = {frozenset(p) for p in fleet.link_pairs()}
    assert set(starts) == pairs
    assert all(len(v) == 1 and v[0] == min(k) for k, v in starts.items())


def test_kernel_datapath_keeps_libipsec_off() -> None:
    f = files(desired(example_fleet(), "db1"))
    assert "load = no" in f["/etc/strongswan.d/charon/kernel-libipsec.conf"]


def test_handlers_reload_swanctl_and_restart_for_plugin_changes() -> None:
    d = desired(example_fleet(), "web1")
    assert d.handler("charon").reload == ("swanctl", "--load-all", "--noprompt")
    restart = " ".join(d.handler("charon-restart").reload)
    # systemd: Debian 12's unit for the classic charon, then the swanctl config loaded again
    assert "systemctl restart strongswan-starter.service" in restart
    assert restart.index("strongswan-starter.service") < restart.index("swanctl --load-all")
    by_path = {f.path: f.handler for f in d.files}
    assert by_path["/etc/strongswan.d/charon/kernel-libipsec.conf"] == "charon-restart"
    assert by_path["/etc/swanctl/conf.d/mesh-web2.conf"] == "charon"
    racoon, svc = d.services  # racoon stopped if a switch left it running, and charon
    assert (racoon.name, racoon.running) == ("racoon", False)
    assert svc.name == "strongswan-starter"
    assert svc.status[:2] == ("sh", "-c") and "charon.pid" in svc.status[2]
    assert "/usr/lib/ipsec/charon" in " ".join(svc.start)
    assert "swanctl --load-all" in " ".join(svc.post_start)  # the unit loads no swanctl config
    assert "/etc/swanctl/conf.d" in d.owned_dirs


@pytest.mark.parametrize(
    ("backend", "mode", "field"),
    [
        (IpsecBackend.STRONGSWAN, MeshMode.IPIP, "mesh.datapath"),
        (IpsecBackend.RACOON, MeshMode.TUNNEL, "mesh.datapath"),
    ],
)
def test_impossible_datapath_combinations_are_refused(
    backend: IpsecBackend, mode: MeshMode, field: str
) -> None:
    fleet = example_fleet(backend=backend, mode=mode, datapath=Datapath.LIBIPSEC)
    with pytest.raises(RenderError, match=field):
        ipsec.render(fleet, fleet.host("web1"))


def test_links_topology_renders_only_linked_peers() -> None:
    base = example_fleet()
    fleet = replace(
        base, mesh=replace(base.mesh, topology=Topology.LINKS, links=(("db1", "web1"), ("web1", "web2")))
    )
    d = desired(fleet, "web1")
    assert sorted(t.peer for t in d.tunnels) == ["db1", "web2"]
    assert not any("db2" in p for p in files(d))
    assert "192.0.2.22" not in d.firewall.rules_v4  # type: ignore[union-attr]
    assert desired(fleet, "db2").keypairs == ()  # no peers: no mesh at all


# ---------------------------------------------------------------- racoon (the seed's shape)


def test_racoon_seed_shape() -> None:
    fleet = example_fleet(backend=IpsecBackend.RACOON)
    f = files(desired(fleet, "web1"))
    setkey = [ln for ln in f["/etc/ipsec-tools.conf"].splitlines() if ln and not ln.startswith("#")]
    assert setkey[:2] == ["flush;", "spdflush;"]
    spd = setkey[2:]
    assert len(spd) == 2 * 3
    for peer in ("192.0.2.12", "192.0.2.21", "192.0.2.22"):
        assert (
            f"spdadd 192.0.2.11 {peer} any -P out ipsec esp/transport//require ah/transport//require;" in spd
        )
        assert (
            f"spdadd {peer} 192.0.2.11 any -P in ipsec esp/transport//require ah/transport//require;" in spd
        )
    conf = f["/etc/racoon/racoon.conf"]
    assert conf.count("remote ") == 3 and "remote anonymous" not in conf
    for line in (
        "exchange_mode main;",
        "lifetime time 12 hour;",
        'certificate_type plain_rsa "/etc/racoon/ipsec.key";',
        "generate_policy off;",
        "authentication_method rsasig;",
        "encryption_algorithm aes 256;",
        "hash_algorithm sha256;",
        "dh_group modp3072;",
    ):
        assert conf[: conf.index("sainfo")].count(line) == 3, line
    for peer in ("db1", "db2", "web2"):
        assert f'peers_certfile plain_rsa "/etc/racoon/peers/{peer}.pub";' in conf
        assert f[f"/etc/racoon/peers/{peer}.pub"].startswith(": PUB 0s")
    sainfo = conf[conf.index("sainfo anonymous {") :]
    for line in (
        "pfs_group modp3072;",
        "encryption_algorithm aes 256;",
        "authentication_algorithm hmac_sha256;",
        "compression_algorithm deflate;",
    ):
        assert line in sainfo
    assert not any(p.startswith("/etc/swanctl") for p in f)


def test_racoon_follows_the_fleet_proposal_and_use_ah() -> None:
    base = example_fleet(backend=IpsecBackend.RACOON)
    legacy = RacoonProposal(
        encryption_algorithm="3des",
        dh_group="modp1024",
        pfs_group="modp1024",
        sa_encryption_algorithm="3des",
        use_ah=False,
    )
    fleet = replace(base, mesh=replace(base.mesh, racoon=legacy))
    f = files(desired(fleet, "web1"))
    assert "ah/transport" not in f["/etc/ipsec-tools.conf"]
    assert (
        "spdadd 192.0.2.11 192.0.2.12 any -P out ipsec esp/transport//require;" in f["/etc/ipsec-tools.conf"]
    )
    assert "encryption_algorithm 3des;" in f["/etc/racoon/racoon.conf"]
    assert "pfs_group modp1024;" in f["/etc/racoon/racoon.conf"]


def test_racoon_keypair_is_4096_bits_and_cuts_the_pub_line() -> None:
    (kp,) = desired(example_fleet(backend=IpsecBackend.RACOON), "web1").keypairs
    gen = next(a for a in kp.generate if a[0] == "plainrsa-gen")
    assert gen[gen.index("-b") + 1] == "4096" and gen[gen.index("-e") + 1] == "65537"
    sed = next(a for a in kp.generate if a[0] == "sed")
    assert sed[-2].endswith(f"w {kp.public_path}") and ": PUB" in sed[-2]
    assert kp.private_path == "/etc/racoon/ipsec.key"


def test_racoon_mode_tunnel_protects_the_internal_addresses() -> None:
    f = files(desired(example_fleet(backend=IpsecBackend.RACOON, mode=MeshMode.TUNNEL), "web1"))
    assert (
        "spdadd 10.99.0.11/32 10.99.0.12/32 any -P out ipsec esp/tunnel/192.0.2.11-192.0.2.12/require;"
        in f["/etc/ipsec-tools.conf"]
    )
    assert "sainfo address 10.99.0.11/32 any address 10.99.0.12/32 any {" in f["/etc/racoon/racoon.conf"]


# ---------------------------------------------------------------- tunnels


def test_ipip_tunnel_per_peer_with_persistent_ifupdown_stanza() -> None:
    fleet = example_fleet()
    d = desired(fleet, "web1")
    f = files(d)
    for t in d.tunnels:
        peer = fleet.host(t.peer)
        assert (t.local, t.remote) == ("192.0.2.11", str(peer.public_address))
        assert (t.address, t.peer_address) == ("10.99.0.11", str(peer.internal_address))
        stanza = f[f"/etc/network/interfaces.d/{t.name}"]
        assert f"iface {t.name} inet tunnel" in stanza and "mode ipip" in stanza
        assert f"endpoint {peer.public_address}" in stanza and f"dstaddr {peer.internal_address}" in stanza
    assert d.addresses == ()


def test_tunnel_names_fit_ifnamsiz_and_stay_unique() -> None:
    names = [f"database-primary-{i}" for i in range(30)] + ["web1", "abcdefghij", "abcdefghijk"]
    rendered = [tunnel_name(n) for n in names]
    assert all(len(r) <= 15 for r in rendered)
    assert len(set(rendered)) == len(rendered)
    assert tunnel_name("web2") == "ipip-web2" and tunnel_name("abcdefghij") == "ipip-abcdefghij"
    assert tunnel_name("database-primary-1") == tunnel_name("database-primary-1")  # stable
    # a shortened name never looks like a full one (host names have no "_")
    assert "_" in tunnel_name("abcdefghijk")


def test_long_host_names_render_unique_tunnels_per_host() -> None:
    base = example_fleet(keys=False)
    hosts = tuple(make_host(f"database-primary-{i}", 30 + i, ("db",)) for i in range(6))
    fleet = with_hosts(base, hosts)
    for h in fleet.hosts:
        d = desired(fleet, h.name)
        assert len({t.name for t in d.tunnels}) == 5
        assert all(len(t.name) <= 15 for t in d.tunnels)


def test_mode_tunnel_puts_the_internal_address_on_lo_and_no_interfaces() -> None:
    d = desired(example_fleet(mode=MeshMode.TUNNEL), "db2")
    assert d.tunnels == ()
    (addr,) = d.addresses
    assert (addr.interface, addr.address) == ("lo", "10.99.0.22/32")
    assert "address 10.99.0.22/32" in files(d)["/etc/network/interfaces.d/reconciler-mesh-lo"]


# ---------------------------------------------------------------- firewall


def rules(d: Desired) -> list[str]:
    assert d.firewall is not None
    return [ln for ln in d.firewall.rules_v4.splitlines() if ln.startswith("-A")]


def test_firewall_management_ssh_comes_before_anything_that_can_drop() -> None:
    for fleet in VARIANTS.values():
        for host in fleet.host_names():
            r = rules(desired(fleet, host))
            mgmt = [i for i, ln in enumerate(r) if "--dport 22 -j ACCEPT" in ln]
            drops = [i for i, ln in enumerate(r) if ln.startswith("-A INPUT") and ln.endswith("-j DROP")]
            assert len(mgmt) == 2 and max(mgmt) < min(drops)
            assert r[mgmt[0]] == "-A INPUT -s 192.0.2.254/32 -p tcp -m tcp --dport 22 -j ACCEPT"


def test_firewall_policies_and_persistent_copy() -> None:
    d = desired(example_fleet(), "web1")
    assert d.firewall is not None
    text = d.firewall.rules_v4
    assert ":INPUT DROP [0:0]" in text and ":FORWARD DROP [0:0]" in text and ":OUTPUT ACCEPT [0:0]" in text
    assert files(d)["/etc/iptables/rules.v4"] == text
    assert d.firewall.persistent_path == "/etc/iptables/rules.v4"


def test_firewall_per_peer_ike_esp_ah_and_ipip_only_with_policy() -> None:
    fleet = example_fleet()
    r = rules(desired(fleet, "web1"))
    for peer in ("192.0.2.12", "192.0.2.21", "192.0.2.22"):
        for rule in (
            f"-A INPUT -s {peer}/32 -i eth0 -p udp -m udp --sport 500 --dport 500 -j ACCEPT",
            f"-A INPUT -s {peer}/32 -i eth0 -p udp -m udp --sport 4500 --dport 4500 -j ACCEPT",
            f"-A INPUT -s {peer}/32 -i eth0 -p esp -j ACCEPT",
            f"-A INPUT -s {peer}/32 -i eth0 -p ah -j ACCEPT",
            f"-A INPUT -s {peer}/32 -d 192.0.2.11/32 -i eth0 -p ipencap "
            + "-m policy --dir in --pol ipsec -j ACCEPT",
            f"-A OUTPUT -d {peer}/32 -o eth0 -p udp -m udp --sport 500 --dport 500 -j ACCEPT",
            f"-A OUTPUT -d {peer}/32 -o eth0 -p esp -j ACCEPT",
            f"-A OUTPUT -d {peer}/32 -o eth0 -p ipencap -m policy --dir out --pol ipsec -j ACCEPT",
        ):
            assert rule in r
    ipencap_accepts = [ln for ln in r if "-p ipencap" in ln and ln.endswith("ACCEPT")]
    assert ipencap_accepts and all("--pol ipsec" in ln for ln in ipencap_accepts)
    assert "-A OUTPUT -p ipencap -j DROP" in r
    last_accept = max(i for i, ln in enumerate(r) if "-p ipencap" in ln and ln.endswith("ACCEPT"))
    assert r.index("-A OUTPUT -p ipencap -j DROP") > last_accept


def test_firewall_ipip_packets_are_judged_right() -> None:
    text = desired(example_fleet(), "web1").firewall.rules_v4  # type: ignore[union-attr]
    peer, me = IPv4Address("192.0.2.12"), IPv4Address("192.0.2.11")
    clear = Packet(src=peer, dst=me, proto="ipencap", in_iface="eth0")
    assert not verdict(text, "INPUT", clear).accepted
    assert verdict(text, "INPUT", replace(clear, ipsec=True)).accepted
    out = Packet(src=me, dst=peer, proto="ipencap", out_iface="eth0")
    assert not verdict(text, "OUTPUT", out).accepted
    assert verdict(text, "OUTPUT", replace(out, ipsec=True)).accepted
    stranger = Packet(src=IPv4Address("203.0.113.9"), dst=me, proto="esp", in_iface="eth0")
    assert not verdict(text, "INPUT", stranger).accepted


def test_firewall_libipsec_admits_declared_mesh_traffic_on_ipsec0_only() -> None:
    text = desired(example_fleet(mode=MeshMode.TUNNEL, datapath=Datapath.LIBIPSEC), "db1").firewall.rules_v4  # type: ignore[union-attr]
    # MySQL is declared for role web: web1's internal address, only on ipsec0
    assert "-A INPUT -s 10.99.0.11/32 -i ipsec0 -p tcp -m tcp --dport 3306 -j ACCEPT" in text
    pkt = Packet(src=IPv4Address("10.99.0.11"), dst=IPv4Address("10.99.0.21"), proto="tcp", dport=3306)
    assert verdict(text, "INPUT", replace(pkt, in_iface="ipsec0")).accepted
    assert not verdict(text, "INPUT", replace(pkt, in_iface="eth0")).accepted
    # no blanket accept of the peer's mesh traffic: another port is refused
    assert not verdict(text, "INPUT", replace(pkt, in_iface="ipsec0", dport=5000)).accepted
    leak = Packet(src=IPv4Address("10.99.0.21"), dst=IPv4Address("10.99.0.11"), proto="tcp", out_iface="eth0")
    assert not verdict(text, "OUTPUT", leak).accepted
    assert verdict(text, "OUTPUT", replace(leak, out_iface="ipsec0")).accepted


def test_firewall_kernel_tunnel_mode_needs_ipsec_policy_for_internal_traffic() -> None:
    text = desired(example_fleet(mode=MeshMode.TUNNEL), "db1").firewall.rules_v4  # type: ignore[union-attr]
    pkt = Packet(
        src=IPv4Address("10.99.0.12"), dst=IPv4Address("10.99.0.21"), proto="tcp", dport=3306, in_iface="eth0"
    )
    assert not verdict(text, "INPUT", pkt).accepted
    assert verdict(text, "INPUT", replace(pkt, ipsec=True)).accepted


def test_firewall_service_ports_icmp_and_logging() -> None:
    base = example_fleet()
    fleet = replace(base, firewall=replace(base.firewall, allow_icmp=False, log_drops=True))
    web = rules(desired(fleet, "web1"))
    assert "-A INPUT -p tcp -m tcp --dport 80 -j ACCEPT" in web
    assert "-A INPUT -p tcp -m tcp --dport 443 -j ACCEPT" in web
    assert not any("icmp" in ln for ln in web)
    assert web[-1 - sum(1 for ln in web if ln.startswith("-A OUTPUT"))].startswith("-A INPUT -m limit")
    db = rules(desired(base, "db1"))
    # a port declared for role web: each web host by its internal address, only out of its own
    # tunnel (never in clear), and by its public address
    assert "-A INPUT -s 10.99.0.11/32 -i ipip-web1 -p tcp -m tcp --dport 3306 -j ACCEPT" in db
    assert "-A INPUT -s 10.99.0.12/32 -i ipip-web2 -p tcp -m tcp --dport 3306 -j ACCEPT" in db
    assert "-A INPUT -s 192.0.2.11/32 -p tcp -m tcp --dport 3306 -j ACCEPT" in db
    assert not any("10.99.0.22" in ln and "3306" in ln for ln in db)  # the other db host: no
    assert "-A INPUT -p icmp -m icmp --icmp-type 8 -j ACCEPT" in db
    assert not any("--dport 80 " in ln for ln in db)


def test_firewall_uses_the_hosts_public_interface() -> None:
    base = example_fleet()
    hosts = tuple(replace(h, public_interface="ens3") if h.name == "web1" else h for h in base.hosts)
    r = rules(desired(with_hosts(base, hosts), "web1"))
    assert "-A INPUT -s 192.0.2.12/32 -i ens3 -p esp -j ACCEPT" in r
    assert not any("eth0" in ln for ln in r)


def test_render_refuses_a_ruleset_without_management_access() -> None:
    base = example_fleet()
    fleet = replace(base, firewall=replace(base.firewall, management_sources=()))
    with pytest.raises(RenderError, match=r"firewall\.management_sources"):
        firewall.render(fleet, fleet.host("web1"))


def test_lockout_check_evaluates_the_rendered_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault injection: a ruleset that drops before the SSH rule is refused by render."""
    original = firewall.ruleset

    def broken(fleet: Fleet, host: object) -> str:
        text = original(fleet, host)  # type: ignore[arg-type]
        return text.replace("# loopback\n", "# loopback\n-A INPUT -s 198.51.100.0/25 -j DROP\n", 1)

    monkeypatch.setattr(firewall, "ruleset", broken)
    fleet = example_fleet()
    with pytest.raises(RenderError) as err:
        firewall.render(fleet, fleet.host("web1"))
    message = str(err.value)
    assert "198.51.100.0" in message and "firewall.management_sources" in message
    assert "-A INPUT -s 198.51.100.0/25 -j DROP" in message
    assert "192.0.2.254" not in message  # that source is still admitted


def test_mesh_defaults_are_the_strong_ones() -> None:
    m = Mesh(internal_network=IPv4Network("10.99.0.0/24"))
    assert m.backend is IpsecBackend.STRONGSWAN and m.datapath is Datapath.KERNEL


def test_mesh_only_port_needs_mesh_protection_in_every_mode() -> None:
    mysql = ServicePort(port=3306, sources=(IPv4Network("10.99.0.0/24"),), name="mysql")
    for mode, datapath, want in (
        (
            MeshMode.IPIP,
            Datapath.KERNEL,
            "-A INPUT -s 10.99.0.0/24 -i ipip+ -p tcp -m tcp --dport 3306 -j ACCEPT",
        ),
        (
            MeshMode.TUNNEL,
            Datapath.KERNEL,
            "-A INPUT -s 10.99.0.0/24 -p tcp -m tcp --dport 3306 -m policy --dir in --pol ipsec -j ACCEPT",
        ),
        (
            MeshMode.TUNNEL,
            Datapath.LIBIPSEC,
            "-A INPUT -s 10.99.0.0/24 -i ipsec0 -p tcp -m tcp --dport 3306 -j ACCEPT",
        ),
    ):
        f = example_fleet()
        f = replace(
            f,
            mesh=replace(f.mesh, mode=mode, datapath=datapath),
            roles=MappingProxyType({**f.roles, "db": replace(f.roles["db"], ports=(mysql,))}),
        )
        assert want in rules(desired(f, "db1")), (mode, datapath)
