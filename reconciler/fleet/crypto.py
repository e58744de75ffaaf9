"""IPsec algorithm policy (RFC 8221, RFC 8247, strongSwan's security recommendations).

``check_proposal`` parses a strongSwan proposal string (``aes256gcm16-prfsha384-x25519``) into
findings; ``check_racoon`` does the same for the racoon (IKEv1) settings. A finding is
``invalid`` (always an error: unknown keyword, malformed proposal), ``weak`` (deprecated: an
error unless every host on the link is marked ``legacy_crypto``, then a warning) or ``warn``
(always just a warning).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from reconciler.fleet.model import RacoonProposal

Level = Literal["invalid", "weak", "warn"]


@dataclass(frozen=True)
class Finding:
    level: Level
    message: str
    field: str = ""  # a sub-field (racoon settings), empty for a whole proposal


_ICV = r"(?:8|12|16|64|96|128)?"
_AEAD = re.compile(rf"aes(?:128|192|256)?(?:gcm|ccm){_ICV}|chacha20poly1305|camellia(?:128|192|256)ccm{_ICV}")
_ENC = re.compile(r"aes(?:128|192|256)?(?:ctr)?|camellia(?:128|192|256)?(?:ctr)?")
_WEAK_ENC = {
    "des": "DES is broken (RFC 8221)",
    "3des": "3DES is deprecated (RFC 8221)",
    "cast128": "CAST is deprecated (RFC 8221)",
    "blowfish": "Blowfish is deprecated (RFC 8221)",
    "blowfish128": "Blowfish is deprecated (RFC 8221)",
    "blowfish192": "Blowfish is deprecated (RFC 8221)",
    "blowfish256": "Blowfish is deprecated (RFC 8221)",
    "null": "null encryption gives no confidentiality",
}
_GMAC = re.compile(r"aes(?:128|192|256)gmac")
_INTEG = frozenset({"sha256", "sha384", "sha512", "sha2_256", "sha2_384", "sha2_512", "aesxcbc", "aescmac"})
_INTEG_WARN = {
    "sha256_96": "sha256_96 truncates to 96 bits for old Linux kernels; use sha256",
    "sha2_256_96": "sha2_256_96 truncates to 96 bits for old Linux kernels; use sha256",
}
_WEAK_INTEG = {
    "md5": "MD5 as integrity algorithm is deprecated (RFC 8221)",
    "md5_128": "MD5 as integrity algorithm is deprecated (RFC 8221)",
    "sha1": "SHA-1 as integrity algorithm is deprecated (RFC 8221, RFC 8247)",
    "sha": "SHA-1 as integrity algorithm is deprecated (RFC 8221, RFC 8247)",
    "sha1_160": "SHA-1 as integrity algorithm is deprecated (RFC 8221, RFC 8247)",
}
_PRF = frozenset(
    {
        "prfsha256",
        "prfsha384",
        "prfsha512",
        "prfsha2_256",
        "prfsha2_384",
        "prfsha2_512",
        "prfaesxcbc",
        "prfaescmac",
    }
)
_WEAK_PRF = {
    "prfmd5": "MD5 as PRF is deprecated (RFC 8247)",
    "prfsha1": "SHA-1 as PRF is deprecated (RFC 8247)",
}
_KE = re.compile(
    r"(?:ke[1-7]_)?(?:modp(?:2048|3072|4096|6144|8192)|ecp(?:224|256|384|521)|ecp(?:224|256|384|512)bp"
    r"|x25519|curve25519|x448|curve448|mlkem(?:512|768|1024))"
)
_WEAK_KE = {
    "modp512": "modp512 is broken",
    "modp768": "modp768 (group 1) is broken (RFC 8247)",
    "modp1024": "modp1024 (group 2) is deprecated (RFC 8247)",
    "modp1024s160": "modp1024s160 (group 22) is deprecated (RFC 8247)",
    "modp1536": "modp1536 (group 5) is deprecated (RFC 8247)",
    "modp2048s224": "modp2048s224 (group 23) is deprecated (RFC 8247)",
    "modp2048s256": "modp2048s256 (group 24) is deprecated (RFC 8247)",
    "ecp192": "ecp192 (group 25) is too weak",
}
_ESN = frozenset({"esn", "noesn"})


def check_proposal(text: str, *, ike: bool) -> list[Finding]:
    """Findings for one strongSwan IKE (``ike=True``) or ESP proposal."""
    out: list[Finding] = []
    aead: list[str] = []
    classic: list[str] = []
    integ: list[str] = []
    prf: list[str] = []
    ke: list[str] = []
    what = "IKE" if ike else "ESP"
    if text == "default":
        return [Finding("invalid", "'default' is not allowed: list the algorithms explicitly")]
    for token in text.split("-"):
        if _AEAD.fullmatch(token):
            aead.append(token)
        elif _ENC.fullmatch(token):
            classic.append(token)
        elif token in _WEAK_ENC:
            classic.append(token)
            out.append(Finding("weak", _WEAK_ENC[token]))
        elif _GMAC.fullmatch(token):
            aead.append(token)
            out.append(Finding("weak", f"{token} authenticates only and gives no confidentiality"))
        elif token in _INTEG:
            integ.append(token)
        elif token in _INTEG_WARN:
            integ.append(token)
            out.append(Finding("warn", _INTEG_WARN[token]))
        elif token in _WEAK_INTEG:
            integ.append(token)
            out.append(Finding("weak", _WEAK_INTEG[token]))
        elif token in _PRF or token in _WEAK_PRF:
            prf.append(token)
            if token in _WEAK_PRF:
                out.append(Finding("weak", _WEAK_PRF[token]))
            if not ike:
                out.append(Finding("invalid", f"{token}: a PRF belongs in IKE proposals, not ESP"))
        elif _KE.fullmatch(token):
            ke.append(token)
        elif token in _WEAK_KE:
            ke.append(token)
            out.append(Finding("weak", _WEAK_KE[token]))
        elif token in _ESN:
            if ike:
                out.append(Finding("invalid", f"{token} belongs in ESP proposals, not IKE"))
        else:
            out.append(Finding("invalid", f"unknown algorithm {token!r}"))
    if aead and (classic or integ):
        out.append(
            Finding(
                "invalid",
                f"mixes AEAD ({', '.join(aead)}) and non-AEAD ({', '.join(classic + integ)}) algorithms "
                "in one proposal: write two proposals",
            )
        )
    if not aead and not classic:
        out.append(Finding("invalid", "has no encryption algorithm"))
    elif classic and not integ and not aead:
        out.append(Finding("invalid", "a non-AEAD cipher needs an integrity algorithm (e.g. sha256)"))
    if ike and not ke:
        out.append(Finding("invalid", "an IKE proposal needs a key exchange method (e.g. x25519)"))
    if ike and aead and not prf:
        out.append(Finding("invalid", "an AEAD IKE proposal needs a PRF (e.g. prfsha384)"))
    if not ike and not ke:
        out.append(
            Finding("warn", f"{what} proposal without a key exchange method: no perfect forward secrecy")
        )
    return out


_RACOON_WEAK_ENC = {"3des", "des", "cast128", "blowfish"}


def check_racoon(r: RacoonProposal) -> list[Finding]:
    """Findings for the racoon (IKEv1) settings."""
    out: list[Finding] = []
    if r.exchange_mode == "aggressive":
        out.append(
            Finding(
                "weak",
                "IKEv1 aggressive mode exposes the identity and an offline-crackable hash",
                "exchange_mode",
            )
        )
    for name, value in (
        ("encryption_algorithm", r.encryption_algorithm),
        ("sa_encryption_algorithm", r.sa_encryption_algorithm),
    ):
        if value in _RACOON_WEAK_ENC:
            out.append(Finding("weak", _WEAK_ENC[value], name))
    if r.hash_algorithm in ("md5", "sha1"):
        out.append(Finding("weak", _WEAK_INTEG[r.hash_algorithm], "hash_algorithm"))
    if r.sa_authentication_algorithm in ("hmac_md5", "hmac_sha1"):
        out.append(
            Finding("weak", _WEAK_INTEG[r.sa_authentication_algorithm[5:]], "sa_authentication_algorithm")
        )
    for name, value in (("dh_group", r.dh_group), ("pfs_group", r.pfs_group)):
        if value in _WEAK_KE:
            out.append(Finding("weak", _WEAK_KE[value], name))
    return out


# ---------------------------------------------------------------- racoon <-> strongSwan (IKEv1)
# A link between a racoon host and a strongSwan host is IKEv1 with racoon's one proposal,
# written in strongSwan's words; the strongSwan end accepts it only when one of the fleet's
# strongSwan proposals allows every algorithm of it (``common_proposal``).

_SWAN_ENC = {
    "aes 128": "aes128",
    "aes 192": "aes192",
    "aes 256": "aes256",
    "camellia 128": "camellia128",
    "camellia 192": "camellia192",
    "camellia 256": "camellia256",
    "3des": "3des",
    "des": "des",
    "cast128": "cast128",
    "blowfish": "blowfish128",
}
_SWAN_AUTH = {
    "hmac_sha256": "sha256",
    "hmac_sha384": "sha384",
    "hmac_sha512": "sha512",
    "hmac_sha1": "sha1",
    "hmac_md5": "md5",
}
_SYNONYMS = {"sha2_256": "sha256", "sha2_384": "sha384", "sha2_512": "sha512", "sha": "sha1"}


def racoon_ike_proposal(r: RacoonProposal) -> str:
    """racoon's phase 1 proposal in strongSwan's words (IKEv1: the hash is also the PRF)."""
    return f"{_SWAN_ENC[r.encryption_algorithm]}-{r.hash_algorithm}-{r.dh_group}"


def racoon_esp_proposal(r: RacoonProposal) -> str:
    """racoon's phase 2 (``sainfo``) proposal in strongSwan's words, PFS group included."""
    return f"{_SWAN_ENC[r.sa_encryption_algorithm]}-{_SWAN_AUTH[r.sa_authentication_algorithm]}-{r.pfs_group}"


def _tokens(text: str) -> set[str]:
    return {_SYNONYMS.get(t, t) for t in text.split("-")}


def accepts(proposal: str, wanted: str, *, ike: bool) -> bool:
    """Whether the strongSwan ``proposal`` allows every algorithm of the single ``wanted`` one
    (encryption, integrity, key exchange; in IKE the PRF, if listed, must match the hash)."""
    have = _tokens(proposal)
    enc, integ, ke = wanted.split("-")
    if enc not in have or integ not in have or ke not in have:
        return False
    prfs = {t for t in have if t.startswith("prf")}
    return not (ike and prfs and f"prf{integ}" not in prfs)


def common_proposal(offered: tuple[str, ...], wanted: str, *, ike: bool) -> bool:
    return any(accepts(p, wanted, ike=ike) for p in offered)
