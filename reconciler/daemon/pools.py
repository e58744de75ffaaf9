"""SSH connection pools of the daemon, one per set of SSH targets."""

from __future__ import annotations

from dataclasses import dataclass

from reconciler.daemon.config import Config
from reconciler.daemon.step import Target
from reconciler.fleet.model import Fleet
from reconciler.host.connection import ConnectionPool, SshTarget, targets_for


@dataclass
class _PoolEntry:
    pool: ConnectionPool
    targets: dict[str, SshTarget]
    users: int = 0


class Pools:
    """SSH connection pools, reused across commits while the fleet's SSH targets (addresses,
    ports, users, host keys) stay the same, so a push costs no new SSH handshakes. When the
    targets change, a new pool is made and the old one closes once nothing uses it."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._current: _PoolEntry | None = None
        self._by_commit: dict[str, _PoolEntry] = {}

    def _targets(self, fleet: Fleet) -> dict[str, SshTarget]:
        ssh = self.config.ssh
        return targets_for(
            fleet,
            known_hosts=str(ssh.known_hosts) if ssh.known_hosts else None,
            client_keys=[str(p) for p in ssh.identity],
            netns=ssh.netns or None,
        )

    def _make(self, targets: dict[str, SshTarget]) -> ConnectionPool:
        ssh = self.config.ssh
        return ConnectionPool(
            targets,
            connect_timeout=ssh.connect_timeout,
            command_timeout=ssh.command_timeout,
            max_concurrency=max(1, self.config.concurrency) * 2,
        )

    async def acquire(self, target: Target) -> ConnectionPool:
        entry = self._by_commit.get(target.commit)
        if entry is None:
            targets = self._targets(target.fleet)
            current = self._current
            if current is not None and current.targets == targets:
                entry = current
            else:
                entry = _PoolEntry(self._make(targets), targets)
                self._current = entry
                if current is not None and current.users == 0:
                    await self._close(current)
            self._by_commit[target.commit] = entry
        entry.users += 1
        return entry.pool

    async def release(self, target: Target) -> None:
        entry = self._by_commit.get(target.commit)
        if entry is None:
            return
        entry.users -= 1
        if entry is not self._current and entry.users == 0:
            await self._close(entry)

    async def _close(self, entry: _PoolEntry) -> None:
        for commit in [c for c, e in self._by_commit.items() if e is entry]:
            del self._by_commit[commit]
        await entry.pool.close()

    async def close_all(self) -> None:
        entries = {id(e): e for e in self._by_commit.values()}
        if self._current is not None:
            entries[id(self._current)] = self._current
        self._by_commit.clear()
        self._current = None
        for entry in entries.values():
            await entry.pool.close()
