# ruff: noqa: E501 - expected messages are long
"""IPsec stack per host: racoon and strongSwan hosts in one fleet, IKEv1 between them."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from reconciler.domains import ipsec
from reconciler.domains.render import render_host
from reconciler.errors import FleetInvalid
from reconciler.fleet.keys import parse_public_key, pem_to_racoon, racoon_to_pem
from reconciler.fleet.load import load_fleet_files, read_tree
from reconciler.fleet.model import Fleet, IpsecBackend

EXAMPLE = Path(__file__).resolve().parents[2] / "fleet-repo-example"
_BASE, _ = read_tree(EXAMPLE)
# racoon's default proposal (aes 256 / sha256 / modp3072) allowed on the strongSwan side
MIXED_PROPOSALS = (
    "ike_proposals: [aes256gcm16-prfsha384-x25519, aes256-sha256-modp3072]",
    "esp_proposals: [aes256gcm16-x25519, aes256-sha256-modp3072]",
)


def rsa_pem(bits: int = 2048) -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def ec_pem() -> str:
    key = ec.generate_private_key(ec.SECP384R1())
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def files(
    racoon: tuple[str, ...] = ("db1",), proposals: bool = True, keys: dict[str, str] | None = None
) -> dict[str, bytes]:
    out = dict(_BASE)
    if proposals:
        text = out["fleet.yaml"].decode()
        text = text.replace(
            "ike_proposals: [aes256gcm16-prfsha384-x25519, aes256gcm16-prfsha384-ecp384]", MIXED_PROPOSALS[0]
        )
        text = text.replace("esp_proposals: [aes256gcm16-x25519, aes256gcm16-ecp384]", MIXED_PROPOSALS[1])
        out["fleet.yaml"] = text.encode()
    for h in racoon:
        out[f"hosts/{h}.yaml"] += b"ipsec: racoon\n"
    for h, text in (keys or {}).items():
        out[f"keys/{h}.pub"] = text.encode()
    return out


def load(data: dict[str, bytes]) -> Fleet:
    return load_fleet_files(data)


def errors(data: dict[str, bytes]) -> list[str]:
    with pytest.raises(FleetInvalid) as info:
        load_fleet_files(data)
    return [str(p) for p in info.value.problems if p.severity == "error"]


def test_stack_of_a_host_is_its_own_else_the_fleets() -> None:
    fleet = load(files())
    assert fleet.stack_of(fleet.host("db1")) is IpsecBackend.RACOON
    assert fleet.stack_of(fleet.host("web1")) is IpsecBackend.STRONGSWAN
    assert any("hosts/db1.yaml" in w and "racoon speaks only IKEv1" in w for w in fleet.warnings)


def test_a_mixed_link_without_a_common_proposal_is_refused_naming_both_files() -> None:
    errs = errors(files(proposals=False))
    assert len(errs) == 1, errs
    (err,) = errs
    assert err.startswith("hosts/db1.yaml:")
    assert (
        "link db1 (racoon) - db2 (strongswan, hosts/db2.yaml) (and 2 more strongSwan peers) is IKEv1" in err
    )
    assert "no IKE proposal in common: racoon offers aes256-sha256-modp3072 (mesh.racoon)" in err
    assert "no ESP proposal in common" in err
    assert "add aes256-sha256-modp3072 to mesh.ike_proposals" in err


def test_racoon_host_in_a_libipsec_or_tunnel_mesh_is_refused_on_its_ipsec_field() -> None:
    data = files()
    text = data["fleet.yaml"].decode().replace("mode: ipip ", "mode: tunnel ")
    data["fleet.yaml"] = text.replace("datapath: kernel", "datapath: libipsec").encode()
    errs = errors(data)
    assert any(e.startswith("hosts/db1.yaml:") and "ipsec: racoon builds" in e for e in errs), errs
    assert any(e.startswith("hosts/db1.yaml:") and "racoon needs mesh.datapath kernel" in e for e in errs), (
        errs
    )


def test_the_strongswan_end_of_a_racoon_link_is_ikev1_with_racoons_proposal() -> None:
    db1_key = pem_to_racoon(rsa_pem())
    fleet = load(files(keys={"db1": db1_key, "web1": rsa_pem(), "db2": rsa_pem(), "web2": ec_pem()}))
    web1 = render_host(fleet, fleet.host("web1"))
    conf = {f.path: f.content.decode() for f in web1.files}
    to_db1 = conf["/etc/swanctl/conf.d/mesh-db1.conf"]
    assert "version = 1" in to_db1
    assert "proposals = aes256-sha256-modp3072" in to_db1
    assert "esp_proposals = aes256-sha256-modp3072" in to_db1
    assert "local_ts = dynamic\n" in to_db1 and "ipencap" not in to_db1  # racoon's SPD covers any protocol
    assert "IKEv1 (the peer runs racoon)" in to_db1
    to_db2 = conf["/etc/swanctl/conf.d/mesh-db2.conf"]
    assert "version = 2" in to_db2 and "aes256gcm16-prfsha384-x25519" in to_db2
    # db1's racoon key, as PEM for swanctl
    assert conf["/etc/swanctl/pubkey/db1.pem"] == racoon_to_pem(db1_key)
    # web1 has a racoon peer: it makes an RSA key pair (racoon knows no EC keys)
    (kp,) = web1.keypairs
    assert "RSA" in kp.generate[2] and "rsa_keygen_bits:4096" in kp.generate[2]


def test_the_racoon_end_gets_rsa_keys_as_pub_lines_and_no_ah_towards_strongswan() -> None:
    web1_pem = rsa_pem()
    fleet = load(
        files(keys={"db1": pem_to_racoon(rsa_pem()), "web1": web1_pem, "db2": rsa_pem(), "web2": ec_pem()})
    )
    db1 = render_host(fleet, fleet.host("db1"))
    conf = {f.path: f.content.decode() for f in db1.files}
    assert conf["/etc/racoon/peers/web1.pub"] == pem_to_racoon(web1_pem)
    setkey = conf["/etc/ipsec-tools.conf"]
    assert "ah/transport" not in setkey  # strongSwan has no ESP+AH bundles
    # web2's EC key has no racoon form: pending with the reason, not an error
    (pend,) = db1.pending
    assert pend.subject == "ipsec peer web2"
    assert "not an RSA key" in pend.reason and "makes an RSA key" in pend.reason
    assert db1.requires[0].what == "ipsec: racoon"
    assert db1.requires[0].packages == ("ipsec-tools", "racoon")


def test_a_switched_host_retires_the_other_stack() -> None:
    fleet = load(files(racoon=()))
    web1 = render_host(fleet, fleet.host("web1"))
    assert {a.path for a in web1.absent if a.path.startswith("/etc/r") or "ipsec" in a.path} == {
        "/etc/ipsec-tools.conf",
        "/etc/racoon/racoon.conf",
    }
    assert "/etc/racoon/peers" in web1.owned_dirs
    racoon = next(s for s in web1.services if s.name == "racoon")
    assert not racoon.running and racoon.needs_package is None
    assert "setkey -FP" in racoon.stop[2]
    # and the other way round: charon stopped, swanctl's conf.d pruned
    frag = ipsec.retired(IpsecBackend.RACOON)
    (charon,) = frag.services
    assert (charon.name, charon.running) == ("strongswan-starter", False)
    assert "/etc/swanctl/conf.d" in frag.owned_dirs


def test_rsa_keys_convert_both_ways_exactly() -> None:
    pem = rsa_pem(3072)
    line = pem_to_racoon(pem)
    parsed = parse_public_key(line.encode())
    assert (parsed.format, parsed.algorithm, parsed.bits, parsed.exponent) == ("racoon", "rsa", 3072, 65537)
    assert racoon_to_pem(line) == pem
