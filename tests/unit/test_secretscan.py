"""Secrets by path and by content: the classifier, host side (real grep -E) and Python side agree."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
from snapshot_local import LocalRunner

from reconciler.drift.history import HistoryRepo
from reconciler.drift.scan import DriftScanner
from reconciler.drift.secretscan import ContentRules, is_builtin_secret, literal_ere
from reconciler.drift.snapshot import PathPolicy, fetch_files
from reconciler.errors import FleetInvalid
from reconciler.fleet.load import load_fleet
from reconciler.fleet.model import DriftPolicy

ROOT = Path(__file__).resolve().parents[2]
CANARY = "CANARYq7x"  # in every secret sample below

SECRETS: dict[str, tuple[str, bytes]] = {
    "rsa": (
        "private key",
        f"-----BEGIN RSA PRIVATE KEY-----\nMIIE{CANARY}\n-----END RSA PRIVATE KEY-----\n".encode(),
    ),
    "ec": ("private key", f"# key\n-----BEGIN EC PRIVATE KEY-----\n{CANARY}\n".encode()),
    "pkcs8": ("private key", f"-----BEGIN PRIVATE KEY-----\n{CANARY}\n".encode()),
    "encrypted": ("private key", f"-----BEGIN ENCRYPTED PRIVATE KEY-----\n{CANARY}\n".encode()),
    "openssh": ("private key", f"-----BEGIN OPENSSH PRIVATE KEY-----\nb3Bl{CANARY}\n".encode()),
    "pgp": ("private key", f"-----BEGIN PGP PRIVATE KEY BLOCK-----\n\nlQ{CANARY}\n".encode()),
    "putty": ("private key", f"PuTTY-User-Key-File-3: ssh-ed25519\nPrivate-Lines: 1\n{CANARY}\n".encode()),
    "openvpn": ("private key", f"-----BEGIN OpenVPN Static key V1-----\n{CANARY}\n".encode()),
    "kubeconfig": (
        "private key",
        f"users:\n- name: admin\n  user:\n    client-certificate-data: LS0t\n"
        f"    client-key-data: {CANARY}\n".encode(),
    ),
    "wireguard": ("private key", b"[Interface]\nPrivateKey = yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\n"),
    "sha512crypt": ("password hash", f"u:$6$rounds=5000$saltsalt${CANARY}aaaaaaaaaaaaaaaaaaaa:1\n".encode()),
    "yescrypt": ("password hash", f"u:$y$j9T$F5Jx5fExrKuJdcZBmBwDQ0${CANARY}bbbbbbbbbbbbbbbbbbb:\n".encode()),
    "bcrypt": (
        "password hash",
        f"u:$2b$12${CANARY}R9h/cIPz0gi.URNNX3kh2OPST9/PgBkqquzi.Ss7KIUgO2t0jWMUW\n".encode(),
    ),
    "apr1": ("password hash", f"admin:$apr1$r31.....$HqJZimcKQFAMYayBlzkrA/{CANARY}\n".encode()),
    "binary": ("private key", b"\x00\x01\xff-----BEGIN RSA PRIVATE KEY-----\x00" + CANARY.encode()),
}

PLAIN: dict[str, bytes] = {
    "cert": b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    "pubkey": b"-----BEGIN PUBLIC KEY-----\nMIIB\n",
    "ssh-pub": b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI root@host\n",
    "openssl.cnf": b"[cmp]\nsecret = pass:insta # can be used for both client and server side\n",
    "nsswitch": b"passwd:         files systemd\nshadow:         files\n",
    "shell": b'#!/bin/sh\necho "$1$2$3"\nprintf \'%s\\n\' "$1$rest$x"\nPASS=$(cat /run/x)\n',
    "pam": b"password\trequisite\tpam_pwquality.so retry=3\n",
    "sshd": b"PasswordAuthentication no\nPubkeyAuthentication yes\n",
    "wg-public": b"[Peer]\nPublicKey = yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\n",
    "kubeconfig-no-key": b"clusters:\n- cluster:\n    certificate-authority-data: LS0t\n",
}


async def host_side(rules: ContentRules, files: list[Path]) -> set[str]:
    """The fetch's own host script, run here: which files it names secret (and never sends)."""
    got = await fetch_files(LocalRunner(), [str(f) for f in files], rules=rules)
    assert set(got.contents) | set(got.secret) == {str(f) for f in files} and not got.problems
    assert not set(got.contents) & set(got.secret)
    return {Path(p).name for p in got.secret}


async def test_content_rules_agree_on_host_and_in_python(tmp_path: Path) -> None:
    rules = ContentRules()
    files = []
    for name, (_, data) in SECRETS.items():
        files.append(tmp_path / name)
        files[-1].write_bytes(data)
    for name, data in PLAIN.items():
        files.append(tmp_path / name)
        files[-1].write_bytes(data)
    assert await host_side(rules, files) == set(SECRETS)
    for name, (kind, data) in SECRETS.items():
        assert rules.find(data) == kind, name
    for name, data in PLAIN.items():
        assert rules.find(data) is None, name


async def test_fleet_markers_are_literals_on_both_sides(tmp_path: Path) -> None:
    marker = r"tok.en*[x]$(y)|z\w{1}^+?"
    rules = ContentRules((marker, "aws_secret_access_key"))
    literal = tmp_path / "literal"
    literal.write_text(f"key = {marker}\n")
    near = tmp_path / "near"  # what the marker would match as a regex, not as a literal
    near.write_text("tokXen[x]y\n")
    aws = tmp_path / "aws"
    aws.write_text("[default]\naws_secret_access_key = abc\n")
    assert await host_side(rules, [literal, near, aws]) == {"literal", "aws"}
    assert rules.find(literal.read_bytes()) == "secret marker"
    assert rules.find(near.read_bytes()) is None
    assert ContentRules().find(aws.read_bytes()) is None  # not a built-in
    with pytest.raises(ValueError):
        literal_ere("two\nlines")


def test_default_secret_paths() -> None:
    for p in (
        "/etc/letsencrypt/archive/example.com/privkey1.pem",
        "/etc/letsencrypt/accounts/acme-v02.api.letsencrypt.org/directory/x/private_key.json",
        "/etc/kubernetes/admin.conf",
        "/etc/kubernetes/pki/ca.key",
        "/etc/postfix/sasl_passwd",
        "/etc/postfix/sasl_passwd.db",
        "/etc/app/server.key",
        "/etc/apache2/.htpasswd",
        "/etc/nginx/htpasswd.users",
        "/etc/NetworkManager/system-connections/wifi.nmconnection",
        "/etc/ssh/ssh_host_ed25519_key",
        "/etc/ssl/private/a.pem",
    ):
        assert is_builtin_secret(p), p
    for p in ("/etc/postfix/main.cf", "/etc/passwd", "/etc/ssh/ssh_host_ed25519_key.pub", "/etc/hosts"):
        assert not is_builtin_secret(p), p


def test_policy_from_the_fleet_drift_policy(tmp_path: Path) -> None:
    fleet = load_fleet(ROOT / "fleet-repo-example")
    fleet = dataclasses.replace(
        fleet,
        drift=DriftPolicy(
            secret_content=("X-CORP-TOKEN",), max_file_bytes=2 << 20, secret_paths=("/etc/app/*",)
        ),
    )
    scanner = DriftScanner(fleet, HistoryRepo.open(tmp_path / "h", tmp_path / "s"), None, tmp_path / "s")
    policy = scanner.policy_for(None)
    assert policy.max_file_bytes == 2 << 20
    assert policy.content.find(b"a: X-CORP-TOKEN\n") == "secret marker"
    assert policy.secret("/etc/app/db.conf") and not policy.secret("/etc/apps.conf")
    with pytest.raises(ValueError):
        PathPolicy(max_file_bytes=1000)


def test_fleet_yaml_drift_fields_load_and_bad_markers_are_named(tmp_path: Path) -> None:
    repo = tmp_path / "fleet"
    shutil.copytree(ROOT / "fleet-repo-example", repo)
    fleet_yaml = repo / "fleet.yaml"
    base = fleet_yaml.read_text()
    fleet_yaml.write_text(
        base.replace(
            "  mode: enforce\n",
            "  mode: enforce\n  secret_content: [X-CORP-TOKEN]\n  max_file_bytes: 2097152\n",
        )
    )
    drift = load_fleet(repo).drift
    assert drift.secret_content == ("X-CORP-TOKEN",) and drift.max_file_bytes == 2097152
    fleet_yaml.write_text(
        base.replace("  mode: enforce\n", '  mode: enforce\n  secret_content: ["a\\tb-token"]\n')
    )
    with pytest.raises(FleetInvalid) as err:
        load_fleet(repo)
    assert "fleet.yaml" in str(err.value) and "secret_content" in str(err.value)
    fleet_yaml.write_text(base.replace("  mode: enforce\n", "  mode: enforce\n  max_file_bytes: 1000\n"))
    with pytest.raises(FleetInvalid, match="max_file_bytes"):
        load_fleet(repo)
