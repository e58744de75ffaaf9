"""`reconciler keys collect`: only a PUBLIC key ever enters the fleet repo (commands/keys.py).

The attacker here is whoever controls a host's key file (a compromised host, or a local user
who won a race to the path): the file must never carry private key material into git."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from network_fleets import example_fleet

from reconciler.commands import keys as keys_command
from reconciler.commands.keys import check_public_key, collect
from reconciler.engine.identity import Seen, SeenIdentity, claim_for
from reconciler.fleet.model import Fleet

_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
_EC = ec.generate_private_key(ec.SECP256R1())
_ED = ed25519.Ed25519PrivateKey.generate()


def _private(key: Any, fmt: serialization.PrivateFormat, enc: Any = None) -> bytes:
    return bytes(key.private_bytes(serialization.Encoding.PEM, fmt, enc or serialization.NoEncryption()))


def _public(key: Any) -> bytes:
    return bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def _relabel_as_public(private_pem: bytes) -> bytes:
    """A private key's DER under a PUBLIC KEY label (fools a check that only reads labels)."""
    body = b"".join(ln for ln in private_pem.splitlines() if not ln.startswith(b"-----"))
    return b"-----BEGIN PUBLIC KEY-----\n" + body + b"\n-----END PUBLIC KEY-----\n"


PUBLIC_PEM = _public(_RSA)
RACOON_PUB = (
    b": PUB 0s"
    + base64.b64encode(b"\x03\x01\x00\x01" + _RSA.public_key().public_numbers().n.to_bytes(256, "big"))
    + b"\n"
)
PKCS8 = _private(_RSA, serialization.PrivateFormat.PKCS8)
PRIVATE_KEYS = {
    "pkcs8 rsa": PKCS8,
    "traditional rsa": _private(_RSA, serialization.PrivateFormat.TraditionalOpenSSL),
    "sec1 ec": _private(_EC, serialization.PrivateFormat.TraditionalOpenSSL),
    "openssh ed25519": _private(_ED, serialization.PrivateFormat.OpenSSH),
    "encrypted pkcs8": _private(
        _RSA, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")
    ),
    "lower-case label": PKCS8.replace(b"PRIVATE KEY", b"private key"),
    "public then private": PUBLIC_PEM + PKCS8,
    "private DER labelled PUBLIC KEY": _relabel_as_public(PKCS8),
    "racoon plainrsa-gen output": b"# RSA private key\n: RSA\t{\n\tModulus: 0x00c1\n"
    b"\tPublicExponent: 0x010001\n\tPrivateExponent: 0x2a\n\t}\n# " + RACOON_PUB,
    "putty": b"PuTTY-User-Key-File-3: ssh-ed25519\nEncryption: none\nPrivate-Lines: 1\nAAAA\n",
    "raw DER": _RSA.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ),
}


@pytest.mark.parametrize(
    "key", [PUBLIC_PEM, _public(_EC), _public(_ED), RACOON_PUB], ids=["rsa", "ec", "ed25519", "racoon"]
)
def test_a_public_key_is_accepted(key: bytes) -> None:
    assert check_public_key(key) is None


@pytest.mark.parametrize("name", sorted(PRIVATE_KEYS))
def test_private_key_material_is_refused_in_every_form(name: str) -> None:
    problem = check_public_key(PRIVATE_KEYS[name])
    assert problem is not None, name
    assert "PRIVATE" in problem or "not a public key" in problem or "not ASCII" in problem, problem


class _Pool:
    async def get(self, host: str) -> object:
        return object()


async def _collect(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, files: dict[str, bytes]
) -> dict[str, Any]:
    """Run the real collect() over the example fleet; each host's key file holds files[host]
    (the host's identity is this fleet's)."""
    fleet: Fleet = example_fleet()

    async def read_key(conn: object, path: str) -> tuple[SeenIdentity, bytes, str]:
        host = next(h for h in files if path.endswith(f"/{h}.pem"))
        return SeenIdentity(Seen.FILE, claim_for(fleet, host)), files[host], ""

    monkeypatch.setattr(keys_command, "read_key", read_key)
    results = await collect(fleet, list(files), _Pool(), tmp_path)
    return {host: (message, ok) for host, message, ok in results}


async def test_collect_writes_a_public_key_and_never_a_private_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    results = await _collect(
        monkeypatch, tmp_path, {"db1": PUBLIC_PEM, "web1": PKCS8, "web2": PUBLIC_PEM + PKCS8}
    )
    assert results["db1"][1] is True and "wrote keys/db1.pub" in results["db1"][0]
    assert (tmp_path / "keys" / "db1.pub").read_bytes() == PUBLIC_PEM  # positive evidence first
    for host in ("web1", "web2"):
        message, ok = results[host]
        assert ok is False and "PRIVATE key: refused" in message, message
        assert not (tmp_path / "keys" / f"{host}.pub").exists()
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and b"PRIVATE" in p.read_bytes().upper()]
    assert leaked == []
