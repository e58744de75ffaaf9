"""IPsec host keys: where they live, how a host makes its own pair, which peer keys are usable.

A host makes its key pair itself (``KeyPair``: argv lists run on the host, no shell); the
private key never leaves it and is never rendered. ``reconciler keys collect`` reads the public
half back into the fleet repo (``keys/<host>.pub``), from where ``Fleet.public_keys`` gives it to
the peers. A peer whose key is not known yet, or not in the form its stack makes, is
``Pending`` (not an error): the rest of the host still renders.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from reconciler.fleet.keys import KeyFileError, pem_to_racoon, racoon_to_pem
from reconciler.fleet.model import Fleet, Host, IpsecBackend
from reconciler.kinds.resources import Domain, KeyPair, Pending

SWANCTL_DIR = "/etc/swanctl"
SWANCTL_PRIVATE_DIR = f"{SWANCTL_DIR}/private"
SWANCTL_PUBKEY_DIR = f"{SWANCTL_DIR}/pubkey"

RACOON_DIR = "/etc/racoon"
RACOON_PRIVATE_KEY = f"{RACOON_DIR}/ipsec.key"  # the seed's path
RACOON_PUBLIC_KEY = f"{RACOON_DIR}/ipsec.pub"  # the ": PUB 0s..." line, what keys collect reads
RACOON_PEERS_DIR = f"{RACOON_DIR}/peers"
RACOON_KEY_BITS = 4096  # the seed's size; plainrsa-gen's default (1024, e=3) is far too weak

_PEM_PUBLIC = re.compile(
    r"\A-----BEGIN PUBLIC KEY-----\n(?:[A-Za-z0-9+/=]{1,76}\n){1,40}-----END PUBLIC KEY-----\n\Z"
)
_RACOON_PUBLIC = re.compile(r"\A: PUB 0s[A-Za-z0-9+/]+={0,2}\n\Z")


def swanctl_private_key(host: Host) -> str:
    return f"{SWANCTL_PRIVATE_DIR}/{host.name}.pem"


def swanctl_public_key(name: str) -> str:
    return f"{SWANCTL_PUBKEY_DIR}/{name}.pem"


def racoon_peer_key(name: str) -> str:
    return f"{RACOON_PEERS_DIR}/{name}.pub"


def strongswan_keypair(host: Host, *, rsa: bool = False) -> KeyPair:
    """EC P-384 key made with openssl on the host (RSA 4096 with ``rsa``: a host with racoon
    peers, which know only RSA keys). The private key is written to a temporary name first
    (openssl creates it 0600) and renamed last, so a crash never leaves a half key at the path
    whose existence means "this host has its key"."""
    private = swanctl_private_key(host)
    staged = f"{SWANCTL_DIR}/.{host.name}.key.new"
    algorithm = (
        ("RSA", "-pkeyopt", "rsa_keygen_bits:4096") if rsa else ("EC", "-pkeyopt", "ec_paramgen_curve:P-384")
    )
    return KeyPair(
        name="strongswan",
        private_path=private,
        public_path=swanctl_public_key(host.name),
        generate=(
            ("install", "-d", "-m", "0700", SWANCTL_PRIVATE_DIR),
            ("install", "-d", "-m", "0755", SWANCTL_PUBKEY_DIR),
            ("openssl", "genpkey", "-algorithm", *algorithm, "-out", staged),
            ("openssl", "pkey", "-in", staged, "-pubout", "-out", swanctl_public_key(host.name)),
            ("chmod", "0600", staged),
            ("mv", "-f", staged, private),
        ),
        domain=Domain.KEYS,
        handler="charon",
        needs_package="strongswan-swanctl",
    )


def racoon_keypair() -> KeyPair:
    """RSA key made with plainrsa-gen (4096 bits, e=65537); its ``# : PUB 0s...`` line is cut
    out without the leading ``#`` into the public file (sed's ``w`` flag: no shell needed)."""
    staged = f"{RACOON_DIR}/.ipsec.key.new"
    return KeyPair(
        name="racoon",
        private_path=RACOON_PRIVATE_KEY,
        public_path=RACOON_PUBLIC_KEY,
        generate=(
            ("install", "-d", "-m", "0755", RACOON_DIR),
            ("install", "-m", "0600", "/dev/null", staged),
            ("plainrsa-gen", "-b", str(RACOON_KEY_BITS), "-e", "65537", "-f", staged),
            ("sed", "-n", "-e", rf"s/^#[[:space:]]*\(: PUB 0s.*\)$/\1/w {RACOON_PUBLIC_KEY}", staged),
            ("mv", "-f", staged, RACOON_PRIVATE_KEY),
        ),
        domain=Domain.KEYS,
        handler="racoon",
        needs_package="racoon",
    )


def normalise_key(text: str) -> str:
    """Line endings and surrounding blank space do not matter; the content does."""
    return "\n".join(line.strip() for line in text.strip().splitlines()) + "\n"


def key_problem(backend: IpsecBackend, text: str) -> str | None:
    """Why this public key text cannot be used by the backend, or None if it can."""
    key = normalise_key(text)
    if backend is IpsecBackend.STRONGSWAN:
        if _PEM_PUBLIC.match(key):
            return None
        return "is not a PEM public key (-----BEGIN PUBLIC KEY-----), which backend strongswan needs"
    if _RACOON_PUBLIC.match(key):
        return None
    return "is not a plain RSA public key line (': PUB 0s...'), which backend racoon needs"


@dataclass(frozen=True)
class PeerKeys:
    """The peers a host can link with now (key known and usable), and the pending ones."""

    ready: tuple[tuple[Host, str], ...]  # (peer, normalised key text), sorted by peer name
    pending: tuple[Pending, ...]


def key_for(consumer: IpsecBackend, text: str) -> str:
    """The peer's key in the form the ``consumer`` stack reads: a racoon host's RSA key as PEM
    for swanctl, a strongSwan host's RSA PEM as a ': PUB 0s' line for racoon (KeyFileError when
    it has no such form: an EC key for racoon)."""
    key = normalise_key(text)
    if consumer is IpsecBackend.STRONGSWAN and _RACOON_PUBLIC.match(key):
        return racoon_to_pem(key)
    if consumer is IpsecBackend.RACOON and _PEM_PUBLIC.match(key):
        return pem_to_racoon(key)
    return key


def peer_keys(fleet: Fleet, host: Host) -> PeerKeys:
    ready: list[tuple[Host, str]] = []
    consumer = fleet.stack_of(host)
    pending: list[Pending] = []
    for peer in fleet.peers_of(host):
        text = fleet.public_keys.get(peer.name)
        subject = f"ipsec peer {peer.name}"
        if text is None:
            pending.append(
                Pending(
                    domain=Domain.IPSEC,
                    subject=subject,
                    reason=(
                        f"no public key yet: keys/{peer.name}.pub is missing ({peer.name} makes its "
                        "key pair on its first apply; then run `reconciler keys collect`)"
                    ),
                )
            )
            continue
        problem = key_problem(fleet.stack_of(peer), text)
        if problem is None:
            try:
                usable = key_for(consumer, text)
            except KeyFileError as exc:
                problem = (
                    f"{exc} ({host.name} runs racoon; {peer.name} makes an RSA key when it has racoon peers)"
                )
        if problem is not None:
            pending.append(
                Pending(domain=Domain.IPSEC, subject=subject, reason=f"keys/{peer.name}.pub {problem}")
            )
            continue
        ready.append((peer, usable))
    return PeerKeys(ready=tuple(ready), pending=tuple(pending))
