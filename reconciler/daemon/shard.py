"""Sharding the daemon over the replicas of a Kubernetes StatefulSet (docs/DEPLOY.md, "Sharded").

Replica ``<base>-<k>`` of N (the pod name, ``shard.name``; N is ``shard.replicas``) reconciles
the hosts that rendezvous hashing over the replica names gives it: a host belongs to the replica
whose ``blake2b(replica NUL host)`` is highest. Every replica computes the same answer from the
same two inputs with no coordination; when N changes only the hosts of the replicas that came or
went move (a host never moves between two replicas that both stay). Every replica follows the
same source and renders every host of the same commit (pure, cheap); it applies only to its own.

Peers are the other replica names, reached at ``shard.peer_url`` with ``{name}``/``{ordinal}``
replaced (the headless Service gives each pod a stable DNS name). A replica sends a verified
webhook on to every peer (the same signed request: each peer checks the HMAC itself), and its
``/status`` asks the peers' ``/status?scope=local`` (with the read token) to show the whole
fleet with each host's owner; a peer that does not answer shows its hosts as ``Unknown`` with
``owner_reachable: false`` (stale) until it returns or N changes.

Applies are never concurrent on one host whatever the ownership says: the apply holds a lock on
the host itself (reconciler/engine/hostlock.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from reconciler.daemon.config import ConfigError, Secret, ShardConfig
from reconciler.log import get_logger

log = get_logger(__name__)

FORWARDED_HEADER = "X-Reconciler-Forwarded"  # a webhook a peer sent on: not sent on again
_NAME = re.compile(r"^([a-z0-9]([-a-z0-9]{0,60}[a-z0-9])?)-([0-9]{1,4})$")
# request headers a forwarded webhook keeps (the provider's signature, event and delivery id)
_FORWARD_KEEP = re.compile(
    r"^(content-type|x-hub-signature-256|x-github-.*|x-gitea-.*|x-gitlab-.*|idempotency-key)$"
)


def score(replica: str, host: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{replica}\0{host}".encode(), digest_size=8).digest(), "big")


def owner_of(host: str, replicas: Sequence[str]) -> str:
    """Rendezvous (highest random weight) hashing: the replica that owns ``host``."""
    return max(replicas, key=lambda r: (score(r, host), r))


@dataclass(frozen=True)
class Peer:
    name: str
    url: str  # base URL, no trailing slash


@dataclass(frozen=True)
class Shard:
    """This replica's place among N: its name, every replica's name, the peers' URLs."""

    name: str
    replicas: tuple[str, ...]
    peers: tuple[Peer, ...]
    timeout: float = 5.0

    @property
    def sharded(self) -> bool:
        return len(self.replicas) > 1

    @property
    def ordinal(self) -> int:
        m = _NAME.match(self.name)
        return int(m.group(3)) if m else 0

    def owner(self, host: str) -> str:
        return owner_of(host, self.replicas) if self.sharded else self.name

    def owns(self, host: str) -> bool:
        return self.owner(host) == self.name

    def owned(self, hosts: Iterable[str]) -> tuple[str, ...]:
        return tuple(h for h in hosts if self.owns(h))

    def describe(self) -> dict[str, Any]:
        return {"replica": self.name, "ordinal": self.ordinal, "replicas": list(self.replicas)}

    @classmethod
    def single(cls, name: str = "") -> Shard:
        return cls(name=name, replicas=(name,), peers=())

    @classmethod
    def from_config(cls, cfg: ShardConfig) -> Shard:
        """Checks the settings: a name ``<base>-<ordinal>`` with ordinal < N, a peer URL template."""
        if cfg.replicas == 1:
            return cls.single(cfg.name)
        m = _NAME.match(cfg.name)
        if m is None:
            raise ConfigError(
                "shard.name: expected the pod name <statefulset>-<ordinal> (e.g. reconciler-0), "
                f"got {cfg.name!r}"
            )
        base, ordinal = m.group(1), int(m.group(3))
        if ordinal >= cfg.replicas:
            raise ConfigError(f"shard.name: ordinal {ordinal} is not below shard.replicas ({cfg.replicas})")
        if not cfg.peer_url.startswith(("http://", "https://")) or "{" not in cfg.peer_url:
            raise ConfigError(
                "shard.peer_url: expected an http(s) URL with {name} or {ordinal}, "
                "e.g. http://{name}.reconciler:8080"
            )
        names = tuple(f"{base}-{k}" for k in range(cfg.replicas))
        peers = tuple(
            Peer(n, cfg.peer_url.replace("{name}", n).replace("{ordinal}", str(k)).rstrip("/"))
            for k, n in enumerate(names)
            if n != cfg.name
        )
        return cls(name=cfg.name, replicas=names, peers=peers, timeout=cfg.peer_timeout)


class PeerClient:
    """HTTP to the other replicas: webhooks sent on, local status read."""

    def __init__(self, shard: Shard, read_token: Secret) -> None:
        self.shard = shard
        self._read_token = read_token
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.shard.timeout), trust_env=False
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def forward_hook(
        self, provider: str, headers: Mapping[str, str], body: bytes
    ) -> dict[str, int | str]:
        """Send a verified webhook on to every peer, as received (they check its signature)."""
        keep = {k: v for k, v in headers.items() if _FORWARD_KEEP.match(k.lower())}
        keep[FORWARDED_HEADER] = self.shard.name

        async def one(peer: Peer) -> tuple[str, int | str]:
            try:
                async with self._client().post(f"{peer.url}/hooks/{provider}", data=body, headers=keep) as r:
                    return peer.name, r.status
            except (aiohttp.ClientError, TimeoutError, OSError) as err:
                log.warning("shard.forward_failed", peer=peer.name, error=str(err) or type(err).__name__)
                return peer.name, f"unreachable: {str(err) or type(err).__name__}"

        return dict(await asyncio.gather(*(one(p) for p in self.shard.peers)))

    async def statuses(self) -> dict[str, dict[str, Any] | str]:
        """Each peer's local status, or why it could not be read."""
        headers = {"Authorization": f"Bearer {self._read_token.reveal()}"} if self._read_token else {}

        async def one(peer: Peer) -> tuple[str, dict[str, Any] | str]:
            try:
                async with self._client().get(f"{peer.url}/status?scope=local", headers=headers) as r:
                    if r.status != 200:
                        return peer.name, f"HTTP {r.status}"
                    data = await r.json()
                    return peer.name, data if isinstance(data, dict) else "not a status object"
            except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as err:
                return peer.name, f"unreachable: {str(err) or type(err).__name__}"

        return dict(await asyncio.gather(*(one(p) for p in self.shard.peers)))


def merge_status(
    shard: Shard, local: dict[str, Any], peers: Mapping[str, dict[str, Any] | str], fleet_hosts: Sequence[str]
) -> dict[str, Any]:
    """The whole fleet's status from this replica's and its peers' local statuses (pure).

    Adds ``owner`` and ``owner_reachable`` to every host row and a ``shard`` object; a host whose
    owner did not answer is ``Unknown`` with the reason."""
    rows: dict[str, dict[str, Any]] = {}
    sources: dict[str, dict[str, Any] | str] = {shard.name: local, **peers}
    for replica, st in sources.items():
        if isinstance(st, dict):
            for row in st.get("hosts", []):
                if isinstance(row, dict) and shard.owner(str(row.get("name", ""))) == replica:
                    rows[str(row["name"])] = {**row, "owner": replica, "owner_reachable": True}
    hosts = []
    for name in fleet_hosts:
        owner = shard.owner(name)
        row = rows.pop(name, None)
        if row is None:
            why = sources.get(owner)
            reachable = isinstance(why, dict)
            reason = "" if reachable else f"owner {owner} did not answer: {why}"
            row = {"name": name, "state": "Unknown", "reason": reason, "code": "", "applied_commit": "",
                   "attempted_commit": "", "owner": owner, "owner_reachable": reachable}  # fmt: skip
        hosts.append(row)
    hosts += [r for r in rows.values() if r.get("state") == "Removed"]
    replicas = []
    for replica in shard.replicas:
        st = sources.get(replica, "no status")
        ok = isinstance(st, dict)
        replicas.append({
            "name": replica,
            "reachable": ok,
            "error": "" if ok else str(st),
            "good": (st.get("source") or {}).get("good") if isinstance(st, dict) else None,
            "hosts": sum(1 for h in fleet_hosts if shard.owner(h) == replica),
        })  # fmt: skip
    return {**local, "scope": "fleet", "hosts": hosts, "shard": {**shard.describe(), "peers": replicas}}
