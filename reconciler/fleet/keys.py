"""Public keys of the hosts (``keys/<host>.pub``): parse and judge them.

Two formats: a PEM ``PUBLIC KEY`` (strongSwan raw public keys, ``swanctl/pubkey``) or racoon's
plain-RSA line ``: PUB 0s<base64>`` (cut from ``plainrsa-gen`` output, with or without the
leading ``#``). The base64 holds an RFC 3110 RSA key: exponent length, exponent, modulus.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Literal

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

MIN_RSA_BITS = 2048
MIN_EC_BITS = 256
MAX_KEY_FILE_BYTES = 64 * 1024

KeyFormat = Literal["pem", "racoon"]

_RACOON = re.compile(r"#?[ \t]*:[ \t]*PUB[ \t]+0s([A-Za-z0-9+/=]+)[ \t]*")
_PEM = re.compile(r"-----BEGIN PUBLIC KEY-----\n[A-Za-z0-9+/=\n]+-----END PUBLIC KEY-----\n?")


@dataclass(frozen=True)
class PublicKey:
    format: KeyFormat
    text: str  # normalised: the PEM block with a final newline, or ": PUB 0s..."
    algorithm: str  # rsa | ec | ed25519 | ed448
    bits: int
    exponent: int | None = None  # RSA only


class KeyFileError(ValueError):
    """A key file that cannot be used (the message says why)."""


def parse_public_key(data: bytes) -> PublicKey:
    if len(data) > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"key file is larger than {MAX_KEY_FILE_BYTES} bytes")
    try:
        text = data.decode("ascii").replace("\r\n", "\n").strip()
    except UnicodeDecodeError:
        raise KeyFileError("a public key file must be ASCII text") from None
    m = _RACOON.fullmatch(text)
    if m is not None:
        return _racoon(m.group(1))
    if _PEM.fullmatch(text + "\n"):
        return _pem(text + "\n")
    raise KeyFileError("not a PEM public key (-----BEGIN PUBLIC KEY-----) nor a racoon ': PUB 0s...' line")


def _rfc3110(b64: str) -> tuple[int, int]:
    """(exponent, modulus) of the base64 RFC 3110 key of a ': PUB 0s' line."""
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise KeyFileError("the ': PUB 0s' key is not valid base64") from None
    if len(raw) < 3:
        raise KeyFileError("the ': PUB 0s' key is too short")
    if raw[0] != 0:
        elen, rest = raw[0], raw[1:]
    else:
        elen, rest = int.from_bytes(raw[1:3], "big"), raw[3:]
    if elen == 0 or len(rest) <= elen:
        raise KeyFileError("the ': PUB 0s' key is malformed (RFC 3110)")
    return int.from_bytes(rest[:elen], "big"), int.from_bytes(rest[elen:], "big")


def _racoon(b64: str) -> PublicKey:
    exponent, modulus = _rfc3110(b64)
    return PublicKey("racoon", f": PUB 0s{b64}", "rsa", modulus.bit_length(), exponent)


def _pem(text: str) -> PublicKey:
    try:
        key = load_pem_public_key(text.encode("ascii"))
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFileError("the PEM public key cannot be read") from None
    if isinstance(key, rsa.RSAPublicKey):
        return PublicKey("pem", text, "rsa", key.key_size, key.public_numbers().e)
    if isinstance(key, ec.EllipticCurvePublicKey):
        return PublicKey("pem", text, "ec", key.curve.key_size)
    if isinstance(key, ed25519.Ed25519PublicKey):
        return PublicKey("pem", text, "ed25519", 256)
    if isinstance(key, ed448.Ed448PublicKey):
        return PublicKey("pem", text, "ed448", 448)
    if isinstance(key, dsa.DSAPublicKey):
        raise KeyFileError("DSA keys are not supported")
    raise KeyFileError(f"unsupported key type {type(key).__name__}")


def weaknesses(key: PublicKey) -> tuple[list[str], list[str]]:
    """(deprecated: errors unless legacy, warnings) for a parsed key."""
    weak: list[str] = []
    warn: list[str] = []
    if key.algorithm == "rsa" and key.bits < MIN_RSA_BITS:
        weak.append(f"RSA key of {key.bits} bits is too short (at least {MIN_RSA_BITS})")
    if key.algorithm == "ec" and key.bits < MIN_EC_BITS:
        weak.append(f"EC key of {key.bits} bits is too short (at least {MIN_EC_BITS})")
    if key.exponent == 3:
        warn.append("RSA public exponent 3 (plainrsa-gen's default): regenerate with e=65537")
    elif key.exponent is not None and (key.exponent < 3 or key.exponent % 2 == 0):
        weak.append(f"RSA public exponent {key.exponent} is invalid")
    return weak, warn


# ---------------------------------------------------------------- one RSA key, both forms
# A link between a racoon host and a strongSwan host (IKEv1) needs each end's key in the
# other's form: racoon reads ": PUB 0s..." (RFC 3110), swanctl reads PEM. Only RSA keys have
# both forms (racoon knows no EC keys).


def racoon_to_pem(text: str) -> str:
    """The PEM ``PUBLIC KEY`` of a racoon ``: PUB 0s...`` line (KeyFileError if malformed)."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    m = _RACOON.fullmatch(text.strip())
    if m is None:
        raise KeyFileError("not a racoon ': PUB 0s...' line")
    e, n = _rfc3110(m.group(1))
    try:
        key = rsa.RSAPublicNumbers(e, n).public_key()
    except ValueError as exc:
        raise KeyFileError(f"the ': PUB 0s' key is not a usable RSA key: {exc}") from None
    return key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode("ascii")


def pem_to_racoon(text: str) -> str:
    """The racoon ``: PUB 0s...`` line of an RSA PEM public key (KeyFileError for other keys)."""
    try:
        key = load_pem_public_key(text.encode("ascii"))
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFileError("the PEM public key cannot be read") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise KeyFileError("is not an RSA key: racoon (IKEv1 plain_rsa) can use only RSA keys")
    nums = key.public_numbers()
    e = nums.e.to_bytes((nums.e.bit_length() + 7) // 8, "big")
    n = nums.n.to_bytes((nums.n.bit_length() + 7) // 8, "big")
    head = bytes([len(e)]) if len(e) < 256 else b"\x00" + len(e).to_bytes(2, "big")
    return ": PUB 0s" + base64.b64encode(head + e + n).decode("ascii") + "\n"
