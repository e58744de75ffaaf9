"""The host keys the reconciler trusts for one target, as asyncssh wants them.

The fleet's ``host_keys`` plus a known_hosts file given at run time (e.g. the lab's); with
neither, the host is refused before any packet is sent (never trust on first use). Nothing is
ever written to a known_hosts file.
"""

from __future__ import annotations

import os
from pathlib import Path

import asyncssh

from reconciler.errors import HostKeyRefused
from reconciler.host.targets import SshTarget


def _host_pattern(address: str, port: int) -> str:
    return address if port == 22 else f"[{address}]:{port}"


def known_hosts_for(target: SshTarget) -> asyncssh.SSHKnownHosts:
    """The trusted keys of one target as an asyncssh known-hosts object (never None).

    Raises HostKeyRefused when no key at all is known for the host (we never trust on first use).
    """
    if not target.host_keys and target.known_hosts is not None:
        return _matching(target, _known_hosts_file(target), str(target.known_hosts))
    lines: list[str] = []
    pattern = _host_pattern(target.address, target.port)
    for key in target.host_keys:
        key = key.strip()
        if not key or "\n" in key or "\r" in key or "\0" in key:
            raise HostKeyRefused(f"host {target.where()}: malformed host key in the fleet")
        lines.append(f"{pattern} {key}")
    if target.known_hosts is not None:
        try:
            lines.append(Path(target.known_hosts).read_text(encoding="utf-8"))
        except OSError as err:
            raise _unreadable(target, err) from None
    known = _import(target, "\n".join(lines) + "\n")
    return _matching(target, known, target.known_hosts or "any known_hosts file")


def _matching(target: SshTarget, known: asyncssh.SSHKnownHosts, searched: str) -> asyncssh.SSHKnownHosts:
    """``known`` if it holds a key (or CA key) for the target; else refused (no trust on first use)."""
    keys, ca_keys, *_ = known.match(target.address, target.address, target.port)
    if not keys and not ca_keys:
        raise HostKeyRefused(
            f"host {target.where()}: no trusted host key (none in the fleet, none in "
            f"{searched}); refusing to connect"
        )
    return known


def _import(target: SshTarget, text: str) -> asyncssh.SSHKnownHosts:
    try:
        return asyncssh.import_known_hosts(text)
    except (ValueError, asyncssh.KeyImportError) as err:
        raise HostKeyRefused(f"host {target.where()}: cannot parse trusted host keys: {err}") from None


def _unreadable(target: SshTarget, err: OSError) -> HostKeyRefused:
    return HostKeyRefused(
        f"host {target.where()}: cannot read known_hosts file {target.known_hosts}: {err.strerror}"
    )


_KNOWN_CACHE: dict[tuple[str, int, int, int], asyncssh.SSHKnownHosts] = {}


def _known_hosts_file(target: SshTarget) -> asyncssh.SSHKnownHosts:
    """A known_hosts file parsed once per content version (path, inode, size, mtime), not once
    per host: a 100-host fleet shares one lab known_hosts file."""
    assert target.known_hosts is not None
    try:
        st = os.stat(target.known_hosts)
        key = (target.known_hosts, st.st_ino, st.st_size, st.st_mtime_ns)
        known = _KNOWN_CACHE.get(key)
        if known is not None:
            return known
        text = Path(target.known_hosts).read_text(encoding="utf-8")
    except OSError as err:
        raise _unreadable(target, err) from None
    known = _import(target, text + "\n")
    if len(_KNOWN_CACHE) > 16:
        _KNOWN_CACHE.clear()
    _KNOWN_CACHE[key] = known
    return known
