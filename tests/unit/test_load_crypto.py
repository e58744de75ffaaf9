# ruff: noqa: E501 - expected error lines are long
"""Crypto policy at load time: deprecated algorithms rejected unless every host on the link is legacy."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from reconciler.errors import FleetInvalid
from reconciler.fleet.crypto import check_proposal
from reconciler.fleet.keys import parse_public_key
from reconciler.fleet.load import load_fleet_files, read_tree
from reconciler.fleet.model import Fleet

EXAMPLE = Path(__file__).resolve().parents[2] / "fleet-repo-example"
_BASE, _ = read_tree(EXAMPLE)
HOSTS = ("db1", "db2", "web1", "web2")


def fleet_files(
    fleet_yaml: str | None = None, legacy: tuple[str, ...] = (), keys: dict[str, bytes] | None = None
) -> dict[str, bytes]:
    files = dict(_BASE)
    if fleet_yaml is not None:
        files["fleet.yaml"] = fleet_yaml.encode()
    for h in legacy:
        files[f"hosts/{h}.yaml"] += b"legacy_crypto: true\n"
    for h, data in (keys or {}).items():
        files[f"keys/{h}.pub"] = data
    return files


def proposals(ike: str, esp: str = "[aes256gcm16-x25519]") -> str:
    text = _BASE["fleet.yaml"].decode()
    text = text.replace(
        "ike_proposals: [aes256gcm16-prfsha384-x25519, aes256gcm16-prfsha384-ecp384]", f"ike_proposals: {ike}"
    )
    return text.replace("esp_proposals: [aes256gcm16-x25519, aes256gcm16-ecp384]", f"esp_proposals: {esp}")


def errors(files: dict[str, bytes]) -> list[str]:
    with pytest.raises(FleetInvalid) as info:
        load_fleet_files(files)
    return [str(p) for p in info.value.problems if p.severity == "error"]


def warnings(fleet: Fleet) -> list[str]:
    return list(fleet.warnings)


@pytest.mark.parametrize(
    ("proposal", "message"),
    [
        ("3des-sha256-modp3072", "3DES is deprecated (RFC 8221)"),
        ("des-sha256-modp3072", "DES is broken (RFC 8221)"),
        ("cast128-sha256-modp3072", "CAST is deprecated (RFC 8221)"),
        ("blowfish256-sha256-modp3072", "Blowfish is deprecated (RFC 8221)"),
        ("aes256-md5-modp3072", "MD5 as integrity algorithm is deprecated (RFC 8221)"),
        ("aes256-sha1-modp3072", "SHA-1 as integrity algorithm is deprecated (RFC 8221, RFC 8247)"),
        ("aes256gcm16-prfsha1-x25519", "SHA-1 as PRF is deprecated (RFC 8247)"),
        ("aes256gcm16-prfmd5-x25519", "MD5 as PRF is deprecated (RFC 8247)"),
        ("aes256gcm16-prfsha384-modp512", "modp512 is broken"),
        ("aes256gcm16-prfsha384-modp768", "modp768 (group 1) is broken (RFC 8247)"),
        ("aes256gcm16-prfsha384-modp1024", "modp1024 (group 2) is deprecated (RFC 8247)"),
        ("aes256gcm16-prfsha384-modp1024s160", "modp1024s160 (group 22) is deprecated (RFC 8247)"),
        ("aes256gcm16-prfsha384-modp1536", "modp1536 (group 5) is deprecated (RFC 8247)"),
        ("aes256gcm16-prfsha384-modp2048s224", "modp2048s224 (group 23) is deprecated (RFC 8247)"),
        ("aes256gcm16-prfsha384-modp2048s256", "modp2048s256 (group 24) is deprecated (RFC 8247)"),
        ("aes256gcm16-prfsha384-ecp192", "ecp192 (group 25) is too weak"),
    ],
)
def test_deprecated_ike_algorithm_rejected_unless_every_host_is_legacy(proposal: str, message: str) -> None:
    errs = errors(fleet_files(proposals(f"[{proposal}]")))
    assert errs == [
        f"fleet.yaml:11:19: mesh.ike_proposals[0]: {proposal}: {message}; allowed only when every host on the link "
        "sets legacy_crypto: true (not: db1, db2, web1, web2)"
    ]
    # three legacy hosts are not enough in a full mesh
    errs = errors(fleet_files(proposals(f"[{proposal}]"), legacy=("db1", "db2", "web1")))
    assert errs == [
        f"fleet.yaml:11:19: mesh.ike_proposals[0]: {proposal}: {message}; allowed only when every host on the link "
        "sets legacy_crypto: true (not: web2)"
    ]
    fleet = load_fleet_files(fleet_files(proposals(f"[{proposal}]"), legacy=HOSTS))
    assert (
        f"fleet.yaml:11:19: mesh.ike_proposals[0]: warning: {proposal}: {message} (allowed: every host on the link is legacy_crypto)"
        in warnings(fleet)
    )


def test_legacy_hosts_only_need_to_cover_the_declared_links() -> None:
    text = proposals("[aes256-sha1-modp3072]").replace(
        "topology: full", "topology: links\n  links: [[db1, db2]]"
    )
    fleet = load_fleet_files(fleet_files(text, legacy=("db1", "db2")))
    assert fleet.link_pairs() == (("db1", "db2"),)
    assert any("SHA-1 as integrity algorithm is deprecated" in w for w in fleet.warnings)


def test_mixing_aead_and_non_aead_in_one_proposal() -> None:
    errs = errors(fleet_files(proposals("[aes256gcm16-aes256-sha256-prfsha384-x25519]")))
    assert errs == [
        "fleet.yaml:11:19: mesh.ike_proposals[0]: aes256gcm16-aes256-sha256-prfsha384-x25519: mixes AEAD (aes256gcm16) and non-AEAD (aes256, sha256) algorithms in one proposal: write two proposals"
    ]
    fleet = load_fleet_files(fleet_files(proposals("[aes256gcm16-prfsha384-x25519, aes256-sha384-x25519]")))
    assert fleet.mesh.ike_proposals == ("aes256gcm16-prfsha384-x25519", "aes256-sha384-x25519")


def test_malformed_proposals() -> None:
    errs = errors(
        fleet_files(
            proposals(
                "[aes256gcm16-x25519, aes256gcm16-prfsha384-foo25519, default]",
                "[aes256gcm16-prfsha384-x25519]",
            )
        )
    )
    assert errs == [
        "fleet.yaml:11:19: mesh.ike_proposals[0]: aes256gcm16-x25519: an AEAD IKE proposal needs a PRF (e.g. prfsha384)",
        "fleet.yaml:11:39: mesh.ike_proposals[1]: aes256gcm16-prfsha384-foo25519: an IKE proposal needs a key exchange method (e.g. x25519)",
        "fleet.yaml:11:39: mesh.ike_proposals[1]: aes256gcm16-prfsha384-foo25519: unknown algorithm 'foo25519'",
        "fleet.yaml:11:71: mesh.ike_proposals[2]: default: 'default' is not allowed: list the algorithms explicitly",
        "fleet.yaml:12:19: mesh.esp_proposals[0]: aes256gcm16-prfsha384-x25519: prfsha384: a PRF belongs in IKE proposals, not ESP",
    ]


def test_warnings_for_sha256_96_and_esp_without_pfs() -> None:
    fleet = load_fleet_files(fleet_files(proposals("[aes256-sha256_96-x25519]", "[aes256gcm16]")))
    assert warnings(fleet) == [
        "fleet.yaml:11:19: mesh.ike_proposals[0]: warning: aes256-sha256_96-x25519: sha256_96 truncates to 96 bits for old Linux kernels; use sha256",
        "fleet.yaml:12:19: mesh.esp_proposals[0]: warning: aes256gcm16: ESP proposal without a key exchange method: no perfect forward secrecy",
    ]


def racoon_fleet(settings: str) -> str:
    text = _BASE["fleet.yaml"].decode().replace("backend: strongswan ", "backend: racoon    ")
    text = text.replace("  ike_proposals: [aes256gcm16-prfsha384-x25519, aes256gcm16-prfsha384-ecp384]\n", "")
    text = text.replace("  esp_proposals: [aes256gcm16-x25519, aes256gcm16-ecp384]\n", "")
    return text.replace("  topology: full\n", f"  topology: full\n  racoon:\n{settings}")


def test_racoon_seed_crypto_needs_legacy_hosts() -> None:
    seed = "    encryption_algorithm: 3des\n    dh_group: modp1024\n    pfs_group: modp1024\n    exchange_mode: aggressive\n    sa_authentication_algorithm: hmac_sha1\n"
    errs = errors(fleet_files(racoon_fleet(seed)))
    tail = "; allowed only when every host on the link sets legacy_crypto: true (not: db1, db2, web1, web2)"
    assert errs == [
        f"fleet.yaml:12:27: mesh.racoon.encryption_algorithm: 3DES is deprecated (RFC 8221){tail}",
        f"fleet.yaml:13:15: mesh.racoon.dh_group: modp1024 (group 2) is deprecated (RFC 8247){tail}",
        f"fleet.yaml:14:16: mesh.racoon.pfs_group: modp1024 (group 2) is deprecated (RFC 8247){tail}",
        f"fleet.yaml:15:20: mesh.racoon.exchange_mode: IKEv1 aggressive mode exposes the identity and an offline-crackable hash{tail}",
        f"fleet.yaml:16:34: mesh.racoon.sa_authentication_algorithm: SHA-1 as integrity algorithm is deprecated (RFC 8221, RFC 8247){tail}",
    ]
    fleet = load_fleet_files(fleet_files(racoon_fleet(seed), legacy=HOSTS))
    assert fleet.mesh.racoon.encryption_algorithm == "3des"
    assert fleet.mesh.racoon.exchange_mode == "aggressive"
    assert len(fleet.warnings) == 6  # five allowed-legacy warnings + "racoon speaks only IKEv1"


# ---------------------------------------------------------------- keys


def pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def racoon_line(bits: int, e: int = 65537) -> bytes:
    key = rsa.generate_private_key(public_exponent=e, key_size=bits)
    n = key.public_key().public_numbers().n
    eb = e.to_bytes((e.bit_length() + 7) // 8, "big")
    raw = bytes([len(eb)]) + eb + n.to_bytes((n.bit_length() + 7) // 8, "big")
    return b"# : PUB 0s" + base64.b64encode(raw) + b"\n"


@pytest.fixture(scope="module")
def rsa1024() -> bytes:
    return pem(rsa.generate_private_key(public_exponent=65537, key_size=1024))


def test_good_keys_are_loaded() -> None:
    key = pem(ec.generate_private_key(ec.SECP384R1()))
    ed = pem(ed25519.Ed25519PrivateKey.generate())
    fleet = load_fleet_files(fleet_files(keys={"web1": key, "web2": ed}))
    assert fleet.public_keys["web1"] == key.decode()
    assert fleet.public_keys["web2"].startswith("-----BEGIN PUBLIC KEY-----\n")
    assert "db1" not in fleet.public_keys


def test_short_rsa_key_rejected_unless_legacy(rsa1024: bytes) -> None:
    errs = errors(fleet_files(keys={"web1": rsa1024}))
    assert errs == [
        "keys/web1.pub:1:1: RSA key of 1024 bits is too short (at least 2048); allowed only when every host on its links sets legacy_crypto: true (not: db1, db2, web1, web2)"
    ]
    fleet = load_fleet_files(fleet_files(keys={"web1": rsa1024}, legacy=HOSTS))
    assert (
        "keys/web1.pub:1:1: warning: RSA key of 1024 bits is too short (at least 2048) (allowed: legacy_crypto)"
        in fleet.warnings
    )


def test_ecp192_key_rejected() -> None:
    errs = errors(fleet_files(keys={"db1": pem(ec.generate_private_key(ec.SECP192R1()))}))
    assert errs[0].startswith("keys/db1.pub:1:1: EC key of 192 bits is too short (at least 256)")


def test_racoon_keys_exponent_3_warned_and_format_checked() -> None:
    text = racoon_fleet("    encryption_algorithm: aes 256\n")
    line = racoon_line(2048, e=3)
    fleet = load_fleet_files(fleet_files(text, keys={"db1": line}))
    assert fleet.public_keys["db1"].startswith(": PUB 0sAQ")
    assert (
        "keys/db1.pub:1:1: warning: RSA public exponent 3 (plainrsa-gen's default): regenerate with e=65537"
        in fleet.warnings
    )
    errs = errors(fleet_files(keys={"db1": line}))  # strongswan backend wants PEM
    assert errs == ["keys/db1.pub:1:1: backend strongswan needs a PEM public key"]
    errs = errors(fleet_files(text, keys={"db1": pem(ed25519.Ed25519PrivateKey.generate())}))
    assert errs == ["keys/db1.pub:1:1: backend racoon needs a racoon ': PUB 0s...' line"]


def test_racoon_1024_bit_key_as_plainrsa_gen_makes_by_default() -> None:
    text = racoon_fleet("    encryption_algorithm: aes 256\n")
    errs = errors(fleet_files(text, keys={"web2": racoon_line(1024, e=3)}))
    assert errs == [
        "keys/web2.pub:1:1: RSA key of 1024 bits is too short (at least 2048); allowed only when every host on its links sets legacy_crypto: true (not: db1, db2, web1, web2)"
    ]


def test_bad_key_files() -> None:
    errs = errors(
        fleet_files(keys={"web1": b"ssh-ed25519 AAAA", "nohost": pem(ed25519.Ed25519PrivateKey.generate())})
    )
    assert errs == [
        "keys/nohost.pub:1:1: public key for undeclared host 'nohost'",
        "keys/web1.pub:1:1: not a PEM public key (-----BEGIN PUBLIC KEY-----) nor a racoon ': PUB 0s...' line",
    ]
    garbage = b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"
    assert errors(fleet_files(keys={"web1": garbage})) == [
        "keys/web1.pub:1:1: the PEM public key cannot be read"
    ]
    assert parse_public_key(racoon_line(2048)).bits == 2048


def test_proposal_parser_accepts_the_recommended_suites() -> None:
    for p in (
        "aes256gcm16-prfsha384-x25519",
        "aes256gcm16-prfsha384-ecp384",
        "aes256gcm16-prfsha384-modp3072",
        "chacha20poly1305-prfsha256-x448",
    ):
        assert check_proposal(p, ike=True) == []
    for p in ("aes256gcm16-x25519", "aes256gcm16-ecp384", "aes128-sha256-modp3072-esn"):
        assert check_proposal(p, ike=False) == []
