# ruff: noqa: E501 - expected error lines are long
"""Semantic rules of the fleet loader: one bad fleet per rule, error text and FILE:LINE:COL asserted."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.errors import FleetInvalid
from reconciler.fleet.load import load_fleet_files, read_tree
from reconciler.fleet.model import Fleet

EXAMPLE = Path(__file__).resolve().parents[2] / "fleet-repo-example"
_BASE, _ = read_tree(EXAMPLE)


def files_with(changes: dict[str, str | None]) -> dict[str, bytes]:
    files = dict(_BASE)
    for path, text in changes.items():
        if text is None:
            files.pop(path, None)
        else:
            files[path] = text.encode()
    return files


def text(path: str) -> str:
    return _BASE[path].decode()


def edit(path: str, old: str, new: str) -> dict[str, str | None]:
    original = text(path)
    assert old in original, (path, old)
    return {path: original.replace(old, new, 1)}


def errors(changes: dict[str, str | None]) -> list[str]:
    with pytest.raises(FleetInvalid) as info:
        load_fleet_files(files_with(changes))
    return [str(p) for p in info.value.problems if p.severity == "error"]


def valid(changes: dict[str, str | None]) -> Fleet:
    return load_fleet_files(files_with(changes))


def host_yaml(name: str, public: str, internal: str, roles: str = "[web]", extra: str = "") -> str:
    return (
        f"apiVersion: reconciler/v1\nkind: Host\nname: {name}\npublic_address: {public}\n"
        f"internal_address: {internal}\nroles: {roles}\n{extra}"
    )


# ---------------------------------------------------------------- hosts


def test_duplicate_host_name() -> None:
    errs = errors({"hosts/web3.yaml": host_yaml("web1", "192.0.2.13", "10.99.0.13")})
    assert errs == ["hosts/web3.yaml:3:7: name: Host 'web1' is declared twice (also at hosts/web1.yaml:3:7)"]


def test_duplicate_public_and_internal_addresses() -> None:
    errs = errors({"hosts/web3.yaml": host_yaml("web3", "192.0.2.11", "10.99.0.12")})
    assert errs == [
        "hosts/web3.yaml:4:17: public_address: 192.0.2.11 is also the public address of web1 (hosts/web1.yaml:4:17)",
        "hosts/web3.yaml:5:19: internal_address: 10.99.0.12 is also the internal address of web2 "
        "(hosts/web2.yaml:5:19)",
    ]


def test_internal_address_outside_internal_network() -> None:
    errs = errors(edit("hosts/web2.yaml", "10.99.0.12", "10.98.0.12"))
    assert errs == [
        "hosts/web2.yaml:5:19: internal_address: 10.98.0.12 is not inside mesh.internal_network 10.99.0.0/24"
    ]


def test_internal_address_is_network_address_and_public_inside_mesh() -> None:
    errs = errors({"hosts/web3.yaml": host_yaml("web3", "10.99.0.200", "10.99.0.0")})
    assert errs == [
        "hosts/web3.yaml:4:17: public_address: 10.99.0.200 is inside mesh.internal_network 10.99.0.0/24",
        "hosts/web3.yaml:5:19: internal_address: 10.99.0.0 is the network or broadcast address of 10.99.0.0/24",
    ]


def test_unknown_role() -> None:
    errs = errors(edit("hosts/web2.yaml", "roles: [web]", "roles: [web, cache]"))
    assert errs == ["hosts/web2.yaml:6:14: roles[1]: unknown role 'cache' (known: db, web)"]


def test_reference_to_an_invalid_document_is_not_reported_twice() -> None:
    errs = errors(edit("roles/web.yaml", "packages: [curl]", "packages: [Curl]"))
    assert errs == [
        "roles/web.yaml:4:12: packages[0]: 'Curl' is not valid: must be a Debian package name such as apache2"
    ]


def test_host_name_with_shell_metacharacters() -> None:
    errs = errors(edit("hosts/web2.yaml", "name: web2", "name: 'web2;reboot'"))
    assert errs == [
        "hosts/web2.yaml:3:7: name: 'web2;reboot' is not valid: must be a host name: a lowercase letter, "
        "then up to 30 lowercase letters, digits or '-'"
    ]


def test_interface_name_too_long() -> None:
    errs = errors(
        edit("hosts/web2.yaml", "roles: [web]", "roles: [web]\npublic_interface: averyveryverylongname")
    )
    assert errs == [
        "hosts/web2.yaml:7:19: public_interface: 'averyveryverylongname' is not valid: must be the interface "
        "holding public_address (a Linux interface name)"
    ]


def test_newline_in_a_value_that_reaches_a_config_file() -> None:
    errs = errors(edit("sites/shop.yaml", "header_location: '^/shop/.*'", 'header_location: "^/shop/\\n.*"'))
    assert (
        "sites/shop.yaml:26:18: header_location: contains a newline: values that reach config files must be one line"
        in errs
    )


def test_nul_and_tab_in_string_values_found_recursively() -> None:
    profile = text("apparmor/usr.sbin.mysqld.yaml") + 'rules: ["/data/ r,", "/srv/ r,\\0"]\n'
    errs = errors({"apparmor/usr.sbin.mysqld.yaml": profile})
    line = profile.count("\n")  # the appended line is the last one
    assert errs == [
        f"apparmor/usr.sbin.mysqld.yaml:{line}:22: rules[1]: contains a NUL character: values that reach config files must be one line"
    ]
    motd = text("files/motd.yaml") + 'validate: [/usr/bin/test, "-f\\n", "{path}"]\n'
    errs = errors({"files/motd.yaml": motd})
    assert errs == [
        "files/motd.yaml:9:27: validate[1]: contains a newline: values that reach config files must be one line"
    ]
    errs = errors(edit("sites/shop.yaml", "log_level: warn", 'log_level: "warn\\t"'))
    assert (
        "sites/shop.yaml:8:12: log_level: contains a tab: values that reach config files must be one line"
        in errs
    )


def test_inline_file_content_may_hold_newlines_but_not_nul() -> None:
    motd = text("files/motd.yaml").replace("template: templates/motd.j2", 'content: "line 1\\nline 2\\n"')
    fleet = valid({"files/motd.yaml": motd})
    assert fleet.files["motd"].content == "line 1\nline 2\n"
    motd = text("files/motd.yaml").replace("template: templates/motd.j2", 'content: "bad\\0"')
    assert errors({"files/motd.yaml": motd}) == ["files/motd.yaml:5:10: content: contains a NUL character"]


# ---------------------------------------------------------------- paths


@pytest.mark.parametrize(
    "path", ["etc/motd", "/etc/../motd", "/etc//motd", "/etc/motd/", "/etc/./motd", "/etc/mo td", "/"]
)
def test_paths_must_be_absolute_and_normalised(path: str) -> None:
    errs = errors(edit("files/motd.yaml", "path: /etc/motd", f"path: '{path}'"))
    assert errs == [
        f"files/motd.yaml:4:7: path: {path!r} is not valid: must be an absolute, normalised path "
        "(no '.', '..', '//', trailing '/', spaces or quotes)"
    ]


def test_moved_directory_to_itself() -> None:
    errs = errors(edit("apparmor/usr.sbin.mysqld.yaml", "to: /data/var/mysql", "to: /var/lib/mysql"))
    assert errs == [
        "apparmor/usr.sbin.mysqld.yaml:7:32: moved_directories[0].to: 'to' is the same directory as 'from'"
    ]


# ---------------------------------------------------------------- references


def test_unknown_site_profile_file_references() -> None:
    errs = errors(
        {
            **edit("roles/web.yaml", "sites: [shop]", "sites: [shop, blog]"),
            **edit(
                "roles/db.yaml", "apparmor: [usr.sbin.mysqld]", "apparmor: [usr.sbin.mysqld, usr.sbin.named]"
            ),
        }
    )
    assert errs == [
        "roles/db.yaml:7:29: apparmor[1]: unknown AppArmor profile 'usr.sbin.named' (known: usr.sbin.mysqld)",
        "roles/web.yaml:8:15: sites[1]: unknown site 'blog' (known: shop)",
    ]
    errs = errors(edit("roles/db.yaml", "files: [motd]", "files: [motd, issue]"))
    assert errs == ["roles/db.yaml:8:15: files[1]: unknown managed file 'issue' (known: motd)"]


def test_unknown_jk_worker_and_duplicate_worker() -> None:
    errs = errors(
        edit("sites/shop.yaml", "  - {path: /shop/*, worker: shop}", "  - {path: /shop/*, worker: shopp}")
    )
    assert errs == ["sites/shop.yaml:12:29: mounts[0].worker: unknown worker 'shopp' (known: shop)"]
    errs = errors(
        edit(
            "sites/shop.yaml",
            "  - {name: shop, host: 127.0.0.1, port: 8009}",
            "  - {name: shop}\n  - {name: shop}",
        )
    )
    assert errs == ["sites/shop.yaml:11:12: workers[1].name: worker 'shop' is declared twice"]


def test_template_must_exist() -> None:
    errs = errors({"templates/motd.j2": None})
    assert errs == ["files/motd.yaml:5:11: template: template 'templates/motd.j2' not found in the repo"]


def test_template_syntax_error_is_located() -> None:
    errs = errors({"templates/motd.j2": "line one\n{{ host.name }\n"})
    assert len(errs) == 2
    assert errs[0] == "files/motd.yaml:5:11: template: template 'templates/motd.j2' not found in the repo"
    assert errs[1].startswith("templates/motd.j2:2:0: template syntax error:")


def test_managed_file_needs_exactly_one_source() -> None:
    both = text("files/motd.yaml").replace(
        "template: templates/motd.j2", "template: templates/motd.j2\ncontent: hi"
    )
    assert errors({"files/motd.yaml": both}) == [
        "files/motd.yaml:6:10: content: give exactly one of content, template or link_target (got template, content)"
    ]
    none = text("files/motd.yaml").replace("template: templates/motd.j2\n", "")
    assert errors({"files/motd.yaml": none}) == [
        "files/motd.yaml:3:7: name: give exactly one of content, template or link_target"
    ]


def test_two_files_with_one_path_on_a_host() -> None:
    issue = text("files/motd.yaml").replace("name: motd", "name: motd2")
    errs = errors(
        {"files/motd2.yaml": issue, **edit("roles/db.yaml", "files: [motd]", "files: [motd, motd2]")}
    )
    assert errs == ["hosts/db1.yaml:6:8: roles: files 'motd' and 'motd2' both write /etc/motd on this host"]


def test_duplicate_role_site_profile_file_names() -> None:
    errs = errors({"roles/web2.yaml": text("roles/web.yaml")})
    assert errs == ["roles/web2.yaml:3:7: name: Role 'web' is declared twice (also at roles/web.yaml:3:7)"]


def test_package_installed_and_purged() -> None:
    errs = errors(edit("roles/web.yaml", "packages: [curl]", "packages: [curl]\npurge_packages: [curl]"))
    assert errs == ["roles/web.yaml:5:18: purge_packages[0]: 'curl' is both installed and purged"]


# ---------------------------------------------------------------- mesh, links, firewall


def links_fleet(links: str) -> dict[str, str | None]:
    return edit("fleet.yaml", "topology: full", f"topology: links\n  links: {links}")


def test_links_only_between_declared_hosts_no_self_no_duplicates() -> None:
    errs = errors(links_fleet("[[web1, db1], [db1, web1], [web1, web1], [web1, nope]]"))
    assert errs == [
        "fleet.yaml:11:24: mesh.links[1]: link db1-web1 is listed twice (also links[0])",
        "fleet.yaml:11:37: mesh.links[2]: a host cannot link to itself (web1)",
        "fleet.yaml:11:58: mesh.links[3][1]: unknown host 'nope'",
    ]


def test_explicit_links_give_the_pairs() -> None:
    fleet = valid(links_fleet("[[web1, db1], [db2, web2]]"))
    assert fleet.link_pairs() == (("db1", "web1"), ("db2", "web2"))
    assert [h.name for h in fleet.peers_of(fleet.host("db1"))] == ["web1"]


def test_links_with_full_topology_is_an_error() -> None:
    errs = errors(edit("fleet.yaml", "topology: full", "topology: full\n  links: [[web1, db1]]"))
    assert errs == ["fleet.yaml:11:10: mesh.links: links are only used with topology: links"]


def test_libipsec_needs_tunnel_mode() -> None:
    errs = errors(edit("fleet.yaml", "datapath: kernel", "datapath: libipsec"))
    assert errs == [
        "fleet.yaml:9:13: mesh.datapath: datapath libipsec has no transport mode: it needs mode: tunnel"
    ]
    fleet = valid(
        {
            "fleet.yaml": text("fleet.yaml")
            .replace("datapath: kernel", "datapath: libipsec")
            .replace("mode: ipip", "mode: tunnel")
        }
    )
    assert fleet.mesh.datapath.value == "libipsec"


def test_racoon_needs_mode_ipip_and_is_warned() -> None:
    racoon = text("fleet.yaml").replace("backend: strongswan ", "backend: racoon    ")
    errs = errors({"fleet.yaml": racoon.replace("mode: ipip ", "mode: tunnel")})
    assert errs == [
        "fleet.yaml:8:9: mesh.mode: backend racoon builds the seed's transport-mode IP-IP mesh: it needs mode: ipip"
    ]
    fleet = valid({"fleet.yaml": racoon})
    assert (
        "fleet.yaml:7:12: mesh.backend: warning: backend racoon speaks only IKEv1 (deprecated by RFC 8247; "
        "racoon is unmaintained)" in fleet.warnings
    )


def test_network_with_host_bits() -> None:
    errs = errors(edit("fleet.yaml", "internal_network: 10.99.0.0/24", "internal_network: 10.99.0.1/24"))
    assert errs == [
        "fleet.yaml:6:21: mesh.internal_network: '10.99.0.1/24' has host bits set (the network is 10.99.0.0/24)"
    ]


def test_management_sources_must_not_be_empty() -> None:
    errs = errors(
        edit("fleet.yaml", "management_sources: [192.0.2.254/32, 198.51.100.0/24]", "management_sources: []")
    )
    assert errs == ["fleet.yaml:17:23: firewall.management_sources: needs at least 1 item"]
    errs = errors(edit("fleet.yaml", "  management_sources: [192.0.2.254/32, 198.51.100.0/24]\n", ""))
    assert errs == ["fleet.yaml:17:3: firewall: missing required field 'management_sources'"]


def test_management_port_must_equal_every_hosts_ssh_port() -> None:
    """The firewall admits SSH only on management_port; the engine and the dead-man switch's
    confirmation connect to ssh.port: a mismatch would cut SSH and roll back every change."""
    changes = edit("fleet.yaml", "management_port: 22", "management_port: 2222")
    for host in ("web1", "web2", "db2"):
        changes |= edit(
            f"hosts/{host}.yaml", "  port: 22\n", "  port: 2222\n" if host != "web2" else "  port: 2200\n"
        )
    changes |= edit("hosts/db1.yaml", "  port: 22\n", "")  # the default, 22
    assert errors(changes) == [
        "fleet.yaml:18:20: firewall.management_port: 2222 differs from ssh.port 22 (the default: not set) of "
        "host(s) db1 (hosts/db1.yaml): the firewall admits management SSH only on port 2222, so SSH to them and "
        "the dead-man switch's confirmation (a new SSH connection) would be cut and every firewall change "
        "rolled back; set ssh.port or make them equal",
        "hosts/web2.yaml:9:9: ssh.port: 2200 differs from firewall.management_port 2222 (fleet.yaml:18:20): the "
        "firewall admits management SSH only on port 2222, so SSH to web2 and the dead-man switch's "
        "confirmation (a new SSH connection) would be cut and every firewall change rolled back; make them equal",
    ]
    changes |= edit("hosts/db1.yaml", "  port: 22\n", "  port: 2222\n")
    changes |= edit("hosts/web2.yaml", "  port: 22\n", "  port: 2222\n")
    assert valid(changes).firewall.management_port == 2222
    # the default on both sides is fine; so is the default port written out on one side only
    assert valid(edit("fleet.yaml", "  management_port: 22\n", "")).firewall.management_port == 22


def test_fleet_id_is_optional_and_pinned_as_written() -> None:
    assert valid({}).id == ""
    assert (
        valid(edit("fleet.yaml", "name: example\n", "name: example\nid: 6f1c2e0a-5d7b\n")).id
        == "6f1c2e0a-5d7b"
    )
    errs = errors(edit("fleet.yaml", "name: example\n", "name: example\nid: -bad id\n"))
    assert len(errs) == 1 and errs[0].startswith("fleet.yaml:5:5: id: '-bad id' is not valid")


# ---------------------------------------------------------------- mail


def test_mail_password_is_a_schema_error() -> None:
    errs = errors(edit("fleet.yaml", "      security: none", "      security: none\n      password: hunter2"))
    assert errs == [
        "fleet.yaml:32:7: notifications.mail.smtp.password: unknown field 'password': credentials never go in the "
        "fleet repo; give the NAME of an environment variable (username_env, password_env)"
    ]
    assert not any("hunter2" in e for e in errs)


def test_mail_credentials_by_environment_variable_name() -> None:
    fleet = valid(
        edit(
            "fleet.yaml",
            "      security: none",
            "      security: starttls\n      username_env: SMTP_USER\n      password_env: SMTP_PASSWORD",
        )
    )
    assert fleet.notifications.mail is not None
    assert fleet.notifications.mail.smtp.password_env == "SMTP_PASSWORD"
    errs = errors(
        edit("fleet.yaml", "      security: none", "      security: tls\n      password_env: s3cr3t-value")
    )
    assert errs == [
        "fleet.yaml:32:21: notifications.mail.smtp.password_env: 's3cr3t-value' is not valid: must be the NAME of an "
        "environment variable (upper case, digits, '_'), never a value",
    ]


def test_missing_fleet_yaml() -> None:
    assert errors({"fleet.yaml": None}) == [
        "fleet.yaml:0:0: missing: the fleet repo needs fleet.yaml (kind Fleet)"
    ]


def test_document_kind_and_api_version() -> None:
    errs = errors(edit("hosts/web2.yaml", "kind: Host", "kind: Role"))
    assert errs == ["hosts/web2.yaml:2:7: kind: a Role document does not belong in hosts/ (put it in roles/)"]
    errs = errors(edit("hosts/web2.yaml", "apiVersion: reconciler/v1", "apiVersion: reconciler/v2"))
    assert errs == [
        "hosts/web2.yaml:1:13: apiVersion: apiVersion 'reconciler/v2' is not supported (expected reconciler/v1)"
    ]
    errs = errors({"hosts/web2.yaml": "- just\n- a list\n"})
    assert errs == ["hosts/web2.yaml:1:1: a document must be a mapping with apiVersion and kind, not a list"]


def test_all_errors_are_collected_and_sorted() -> None:
    errs = errors(
        {
            **edit("hosts/web2.yaml", "roles: [web]", "roles: [nope]"),
            **edit("hosts/db2.yaml", "10.99.0.22", "10.98.0.22"),
            **edit("fleet.yaml", "interval_seconds: 300", "interval_seconds: 5"),
        }
    )
    assert errs == [
        "fleet.yaml:22:21: drift.interval_seconds: 5 is less than the minimum 60",
        "hosts/db2.yaml:5:19: internal_address: 10.98.0.22 is not inside mesh.internal_network 10.99.0.0/24",
        "hosts/web2.yaml:6:9: roles[0]: unknown role 'nope' (known: db, web)",
    ]
