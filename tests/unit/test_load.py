# ruff: noqa: E501 - expected error lines are long
"""The fleet loader on the example fleet, the schemas, and the schemas as package data."""

from __future__ import annotations

import json
import subprocess
import sys
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from reconciler.errors import FleetInvalid
from reconciler.fleet import model as m
from reconciler.fleet.load import load_fleet, load_fleet_files, read_tree
from reconciler.fleet.schema import KINDS, schema

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "fleet-repo-example"


def test_example_fleet_loads_with_every_field() -> None:
    fleet = load_fleet(EXAMPLE)
    assert fleet.name == "example"
    assert fleet.host_names() == ("db1", "db2", "web1", "web2")
    web1 = fleet.host("web1")
    assert web1.public_address == IPv4Address("192.0.2.11")
    assert web1.internal_address == IPv4Address("10.99.0.11")
    assert web1.roles == ("web",) and web1.ssh == m.SshSpec(user="root", port=22)
    assert web1.source_file == "hosts/web1.yaml"
    mesh = fleet.mesh
    assert mesh.internal_network == IPv4Network("10.99.0.0/24")
    assert (mesh.backend, mesh.mode, mesh.datapath, mesh.topology) == (
        m.IpsecBackend.STRONGSWAN,
        m.MeshMode.IPIP,
        m.Datapath.KERNEL,
        m.Topology.FULL,
    )
    assert len(fleet.link_pairs()) == 6
    assert fleet.firewall.management_sources == (
        IPv4Network("192.0.2.254/32"),
        IPv4Network("198.51.100.0/24"),
    )
    assert fleet.drift.mode is m.DriftMode.ENFORCE and fleet.drift.interval_seconds == 300
    assert fleet.notifications.mail is not None
    assert fleet.notifications.mail.sender == "reconciler@example.com"
    assert fleet.notifications.mail.smtp.port == 8025
    shop = fleet.sites["shop"]
    assert shop.workers == (m.JkWorker(name="shop", host="127.0.0.1", port=8009),)
    assert shop.mounts == (m.JkMount("/shop/*", "shop"),)
    assert len(shop.unmounts) == 4
    assert shop.expires[0] == m.ExpiresRule(mime_type="text/css", seconds=1296000)
    assert shop.header_location == "^/shop/.*"
    mysqld = fleet.apparmor["usr.sbin.mysqld"]
    assert mysqld.moved_directories == (m.MovedDirectory(old="/var/lib/mysql", new="/data/var/mysql"),)
    motd = fleet.files["motd"]
    assert (motd.path, motd.mode, motd.template) == ("/etc/motd", 0o644, "templates/motd.j2")
    assert "{{ host.name }}" in fleet.templates["templates/motd.j2"]
    mysql = fleet.roles["db"].ports[0]
    assert (mysql.sources, mysql.source_hosts, mysql.source_roles) == ((), (), ("web",))
    assert fleet.mesh.trust is m.MeshTrust.LEAST
    assert str(fleet.host("web1").public_address_v6) == "2001:db8::11"
    assert fleet.warnings == ()


def test_load_fleet_files_equals_load_fleet() -> None:
    files, problems = read_tree(EXAMPLE)
    assert problems == []
    assert load_fleet_files(files) == load_fleet(EXAMPLE)
    assert "keys/README.md" not in files  # only what the format uses is read


def test_defaults_when_optional_fields_are_omitted() -> None:
    files, _ = read_tree(EXAMPLE)
    files["fleet.yaml"] = (
        b"apiVersion: reconciler/v1\nkind: Fleet\nname: tiny\nmesh:\n  internal_network: 10.99.0.0/24\n"
        b"firewall:\n  management_sources: [192.0.2.254/32]\n"
    )
    fleet = load_fleet_files(files)
    assert fleet.mesh == m.Mesh(internal_network=IPv4Network("10.99.0.0/24"))
    assert fleet.drift == m.DriftPolicy() and fleet.notifications == m.Notifications()


def test_stray_files_are_warned_not_read() -> None:
    files, _ = read_tree(EXAMPLE)
    files["hosts/web1.yaml~"] = b"garbage"
    files["hosts/.web1.yaml.swp"] = b"garbage"
    files["notes.txt"] = b"garbage"
    fleet = load_fleet_files(files)
    assert fleet.warnings == ("hosts/web1.yaml~:0:0: warning: ignored: only *.yaml files are read in hosts/",)


def test_problem_strings_are_file_line_col_field_message() -> None:
    files, _ = read_tree(EXAMPLE)
    files["hosts/web2.yaml"] = files["hosts/web2.yaml"].replace(b"port: 22", b"port: 70000")
    with pytest.raises(FleetInvalid) as info:
        load_fleet_files(files)
    assert str(info.value) == "hosts/web2.yaml:9:9: ssh.port: 70000 is more than the maximum 65535"


@pytest.mark.parametrize(
    ("path", "old", "new", "expected"),
    [
        ("hosts/web2.yaml", "name: web2\n", "", "hosts/web2.yaml:1:1: missing required field 'name'"),
        (
            "hosts/web2.yaml",
            "ssh:",
            "sssh:",
            "hosts/web2.yaml:7:1: sssh: unknown field 'sssh' (did you mean 'ssh'?)",
        ),
        (
            "hosts/web2.yaml",
            "port: 22",
            "port: '22'",
            "hosts/web2.yaml:9:9: ssh.port: must be an integer, not a string (a TCP/UDP port, 1-65535)",
        ),
        (
            "hosts/web2.yaml",
            "192.0.2.12",
            "192.0.2.256",
            "hosts/web2.yaml:4:17: public_address: '192.0.2.256' is not valid: must be an IPv4 address such as 192.0.2.10",
        ),
        (
            "fleet.yaml",
            "backend: strongswan",
            "backend: openswan",
            "fleet.yaml:7:12: mesh.backend: 'openswan' is not one of: strongswan, racoon",
        ),
        (
            "fleet.yaml",
            "mode: enforce",
            "mode: fix",
            "fleet.yaml:23:9: drift.mode: 'fix' is not one of: enforce, report",
        ),
        (
            "sites/shop.yaml",
            "port: 8009",
            "port: 0",
            "sites/shop.yaml:10:41: workers[0].port: 0 is less than the minimum 1",
        ),
        (
            "roles/web.yaml",
            "sites: [shop]",
            "sites: [shop, shop]",
            "roles/web.yaml:8:8: sites: items must be unique",
        ),
        (
            "files/motd.yaml",
            'mode: "0644"',
            'mode: "0964"',
            "files/motd.yaml:6:7: mode: '0964' is not valid: must be octal permission bits as a string, e.g. \"0644\"",
        ),
    ],
)
def test_schema_errors_point_at_the_offending_node(path: str, old: str, new: str, expected: str) -> None:
    files, _ = read_tree(EXAMPLE)
    assert old.encode() in files[path]
    files[path] = files[path].replace(old.encode(), new.encode(), 1)
    with pytest.raises(FleetInvalid) as info:
        load_fleet_files(files)
    assert [str(p) for p in info.value.problems] == [expected]


def test_misspelt_key_gives_unknown_and_missing() -> None:
    files, _ = read_tree(EXAMPLE)
    path = "apparmor/usr.sbin.mysqld.yaml"
    files[path] = files[path].replace(b"from: /var/lib/mysql", b"form: /var/lib/mysql")
    with pytest.raises(FleetInvalid) as info:
        load_fleet_files(files)
    assert [str(p) for p in info.value.problems] == [
        f"{path}:7:5: moved_directories[0]: missing required field 'from'",
        f"{path}:7:6: moved_directories[0].form: unknown field 'form' (did you mean 'from'?)",
    ]


def test_unquoted_mode_with_leading_zero_is_read_as_octal_text() -> None:
    files, _ = read_tree(EXAMPLE)
    files["files/motd.yaml"] = files["files/motd.yaml"].replace(b'mode: "0644"', b"mode: 0600")
    assert load_fleet_files(files).files["motd"].mode == 0o600


def test_schemas_are_valid_2020_12_and_strict() -> None:
    names = sorted(p.name for p in (ROOT / "schemas").glob("*.json"))
    assert names == sorted(f"{stem}.schema.json" for stem in KINDS.values())
    defs = None
    for kind in KINDS:
        s = schema(kind)
        Draft202012Validator.check_schema(s)
        assert s["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert s["required"][:2] == ["apiVersion", "kind"]
        assert s["properties"]["kind"] == {"const": kind, "description": f"always {kind}"}
        defs = defs or s["$defs"]
        assert s["$defs"] == defs, f"{kind}: shared $defs drifted"

        def walk(node: object, where: str) -> None:
            if isinstance(node, dict):
                if node.get("type") == "object":
                    assert node.get("additionalProperties") is False, where
                for k, v in node.items():
                    walk(v, f"{where}.{k}")
            elif isinstance(node, list):
                for i, v in enumerate(node):
                    walk(v, f"{where}[{i}]")

        walk(s, kind)


@pytest.mark.slow
def test_schemas_ship_as_package_data(tmp_path: Path) -> None:
    """A non-editable install (as in a container image) finds the schemas (a few seconds: pip builds)."""
    target = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        pytest.fail(f"pip install failed: {proc.stderr[-2000:]}")
    shipped = sorted(p.name for p in (target / "reconciler" / "schemas").iterdir())
    assert shipped == sorted(p.name for p in (ROOT / "schemas").glob("*.json"))
    assert not (target / "reconciler" / "schemas").is_symlink()
    code = (
        "import json, sys; from pathlib import Path; from reconciler.fleet.load import load_fleet; "
        f"f = load_fleet(Path({str(EXAMPLE)!r})); print(json.dumps([f.name, len(f.hosts)]))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout) == ["example", 4]


def test_fleet_md_documents_every_field_and_its_examples_validate() -> None:
    import re

    import yaml

    from reconciler.fleet.schema import validator

    doc = (ROOT / "docs" / "FLEET.md").read_text()

    def fields(node: dict[str, object], prefix: str) -> list[str]:
        out: list[str] = []
        props = node.get("properties")
        for name, sub in (props or {}).items() if isinstance(props, dict) else ():
            out.append(prefix + name)
            if isinstance(sub, dict) and sub.get("type") == "object":
                out += fields(sub, prefix + name + ".")
            items = sub.get("items") if isinstance(sub, dict) else None
            if isinstance(items, dict) and items.get("type") == "object":
                out += fields(items, prefix + name + "[].")
        return out

    for kind in KINDS:
        for f in fields(schema(kind), ""):
            assert f"| `{f}` |" in doc, f"docs/FLEET.md lacks {kind} field {f}"
    examples = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", doc, re.S)]
    full = [e for e in examples if isinstance(e, dict) and "kind" in e]
    assert {e["kind"] for e in full} == set(KINDS)
    for e in full:
        errors = [err.message for err in validator(e["kind"]).iter_errors(e)]
        assert errors == [], (e["kind"], errors)
