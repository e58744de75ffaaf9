# ruff: noqa: E501 - expected error lines are long
"""Port sources by host, role or network; mesh.trust; IPv6 addresses and management sources:
one bad fleet per rule, the error's FILE:LINE:COL and field asserted; nothing loads from it."""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Address, IPv6Network

from test_load_semantic import edit, errors, host_yaml, text, valid

from reconciler.fleet import model as m

DB = "roles/db.yaml"
MYSQL = "  - {name: mysql, port: 3306, protocol: tcp, sources: [web]}"


def with_sources(sources: str) -> dict[str, str | None]:
    return edit(DB, MYSQL, f"  - {{name: mysql, port: 3306, protocol: tcp, sources: {sources}}}")


def test_sources_resolve_hosts_roles_and_networks_v4_and_v6() -> None:
    fleet = valid(with_sources("[web, db2, host:web1, role:db, 10.99.0.0/24, 2001:db8:aa::/48]"))
    (mysql,) = fleet.roles["db"].ports
    assert mysql.source_roles == ("web", "db")
    assert mysql.source_hosts == ("db2", "web1")
    assert mysql.sources == (IPv4Network("10.99.0.0/24"), IPv6Network("2001:db8:aa::/48"))
    assert not mysql.anyone
    assert fleet.roles["web"].ports[0].anyone


def test_unknown_source_name_is_an_error_with_its_line() -> None:
    errs = errors(with_sources("[web, wbe1]"))
    assert errs == [
        "roles/db.yaml:6:61: ports[0].sources[1]: 'wbe1' is neither a host nor a role nor a network (CIDR) (known: db, db1, db2, web, web1, web2)"
    ]


def test_prefixed_source_must_name_that_kind() -> None:
    errs = errors(with_sources("[host:web, role:web1]"))
    assert errs == [
        "roles/db.yaml:6:56: ports[0].sources[0]: unknown host 'web' (known: db1, db2, web1, web2)",
        "roles/db.yaml:6:66: ports[0].sources[1]: unknown role 'web1' (known: db, web)",
    ]


def test_a_name_that_is_both_a_host_and_a_role_must_say_which() -> None:
    changes = {"hosts/web.yaml": host_yaml("web", "192.0.2.13", "10.99.0.13")}
    changes.update(with_sources("[web]"))
    errs = errors(changes)
    assert errs == [
        "roles/db.yaml:6:56: ports[0].sources[0]: 'web' is both a host and a role: write host:web or role:web"
    ]
    fleet = valid({**changes, **with_sources("[host:web, role:web]")})
    assert fleet.roles["db"].ports[0].source_hosts == ("web",)


def test_source_networks_with_host_bits_or_out_of_range_are_errors() -> None:
    errs = errors(with_sources("[10.99.0.1/24, '2001:db8::1/64', '1::2::3/64']"))
    assert errs[0] == (
        "roles/db.yaml:6:56: ports[0].sources[0]: '10.99.0.1/24' has host bits set (the network is 10.99.0.0/24)"
    )
    assert errs[1] == (
        "roles/db.yaml:6:70: ports[0].sources[1]: '2001:db8::1/64' has host bits set (the network is 2001:db8::/64)"
    )
    assert errs[2].startswith("roles/db.yaml:6:88: ports[0].sources[2]: '1::2::3/64' is not a network")


def test_a_source_that_is_no_name_nor_network_is_a_schema_error() -> None:
    errs = errors(with_sources("['10.0.0.1', 'Web']"))
    assert len(errs) == 2 and all("ports[0].sources[" in e for e in errs)
    assert errs[0].startswith("roles/db.yaml:6:56: ports[0].sources[0]: '10.0.0.1' is not valid: must be")
    assert "a host name, a role name" in errs[0]


def test_a_role_with_no_hosts_warns_that_the_port_opens_to_nobody() -> None:
    changes = {"roles/batch.yaml": "apiVersion: reconciler/v1\nkind: Role\nname: batch\n"}
    changes.update(with_sources("[web, batch]"))
    fleet = valid(changes)
    assert any("role 'batch' has no hosts: it opens port 3306 to nobody" in w for w in fleet.warnings)


def test_mesh_trust_defaults_to_least_and_all_is_explicit() -> None:
    assert valid({}).mesh.trust is m.MeshTrust.LEAST
    fleet = valid(edit("fleet.yaml", "  topology: full\n", "  topology: full\n  trust: all\n"))
    assert fleet.mesh.trust is m.MeshTrust.ALL
    errs = errors(edit("fleet.yaml", "  topology: full\n", "  topology: full\n  trust: everyone\n"))
    assert errs == ["fleet.yaml:11:10: mesh.trust: 'everyone' is not one of: least, all"]


def test_management_sources_may_hold_ipv6_but_need_ipv4() -> None:
    line = "  management_sources: [192.0.2.254/32, 198.51.100.0/24]"
    fleet = valid(edit("fleet.yaml", line, "  management_sources: [192.0.2.254/32, '2001:db8:ff::/48']"))
    assert fleet.firewall.management_sources[1] == IPv6Network("2001:db8:ff::/48")
    errs = errors(edit("fleet.yaml", line, "  management_sources: ['2001:db8:ff::/48']"))
    assert errs == [
        "fleet.yaml:17:23: firewall.management_sources: needs at least one IPv4 network: reconciler reaches every host at its IPv4 public_address (IPv6 sources are added to rules.v6)"
    ]
    errs = errors(edit("fleet.yaml", line, "  management_sources: [192.0.2.254/32, '2001:db8:ff::1/48']"))
    assert errs[0].startswith(
        "fleet.yaml:17:40: firewall.management_sources[1]: '2001:db8:ff::1/48' has host bits set"
    )


def test_public_address_v6_is_parsed_checked_and_unique() -> None:
    assert valid({}).host("db1").public_address_v6 == IPv6Address("2001:db8::21")
    web2 = text("hosts/web2.yaml")
    for bad, why in (
        ("fe80::12", "fe80::12 is a link-local address"),
        ("::1", "::1 is a loopback address"),
        ("ff02::1", "ff02::1 is a multicast address"),
        ("'::ffff:c000:20c'", "::ffff:c000:20c is an IPv4-mapped address"),
        ("'2001:db8::21'", "2001:db8::21 is also the public address v6 of db1 (hosts/db1.yaml:10:20)"),
        ("'1::2::3'", "'1::2::3' is not an IPv6 address"),
    ):
        changed = web2.replace("public_address_v6: 2001:db8::12", f"public_address_v6: {bad}")
        errs = errors({"hosts/web2.yaml": changed})
        assert len(errs) == 1 and errs[0].startswith("hosts/web2.yaml:10:20: public_address_v6: "), errs
        assert why in errs[0], errs
