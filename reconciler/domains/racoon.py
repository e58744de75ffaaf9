"""racoon + ipsec-tools (IKEv1, legacy) rendering of the mesh, in the seed's shape.

- ``/etc/ipsec-tools.conf`` (read by ``setkey -f``; Debian's setkey init script loads it at
  boot): ``flush;`` and ``spdflush;`` first, then two SPD entries per peer, one per direction.
  Mode ``ipip`` protects everything between the two public addresses in transport mode
  (``esp/transport//require`` plus ``ah/transport//require`` when ``mesh.racoon.use_ah``), as
  the seed did; mode ``tunnel`` protects the internal /32s with ``esp/tunnel/<a>-<b>/require``.
- ``/etc/racoon/racoon.conf``: one ``remote <peer address>`` block per peer (not the seed's
  ``remote anonymous``: a single anonymous block can name only one ``peers_certfile``, so each
  peer's key is bound to its own address here), then one ``sainfo``.
- ``/etc/racoon/peers/<peer>.pub``: the peer's ``: PUB 0s...`` line.

racoon and ipsec-tools are not packaged in Debian 12: these files are rendered and checked by
tests only (ipsec-tools is not packaged in Debian 12: the plan refuses such a host, see
reconciler.domains.ipsec). Only peers with a usable key get SPD entries (a ``require`` policy without a key
would only black-hole the traffic).
"""

from __future__ import annotations

from reconciler.domains.keys import RACOON_PEERS_DIR, RACOON_PRIVATE_KEY, racoon_keypair, racoon_peer_key
from reconciler.fleet.model import Fleet, Host, IpsecBackend, MeshMode
from reconciler.kinds.resources import Domain, FileResource, Fragment, Handler, Service

SETKEY_CONF = "/etc/ipsec-tools.conf"
RACOON_CONF = "/etc/racoon/racoon.conf"
RACOON_PID = "/var/run/racoon.pid"

SETKEY_HANDLER = "setkey"
RACOON_HANDLER = "racoon"

_RUNNING = ("start-stop-daemon", "--status", "--pidfile", RACOON_PID)


def _header(fleet: Fleet, host: Host, what: str) -> str:
    return (
        f"# Rendered by reconciler (fleet {fleet.name}) for {host.name}: {what}.\n"
        "# Local changes are reverted: edit the fleet repository instead.\n"
    )


def spd_entries(fleet: Fleet, host: Host, peer: Host) -> tuple[str, str]:
    """The (out, in) SPD entries for one peer."""
    if fleet.mesh.mode is MeshMode.IPIP:
        local, remote = str(host.public_address), str(peer.public_address)
        out_rule = in_rule = "esp/transport//require"
        # AH only between racoon hosts: strongSwan has no ESP+AH bundles
        if fleet.mesh.racoon.use_ah and fleet.stack_of(peer) is IpsecBackend.RACOON:
            out_rule = in_rule = "esp/transport//require ah/transport//require"
    else:
        local, remote = f"{host.internal_address}/32", f"{peer.internal_address}/32"
        out_rule = f"esp/tunnel/{host.public_address}-{peer.public_address}/require"
        in_rule = f"esp/tunnel/{peer.public_address}-{host.public_address}/require"
    return (
        f"spdadd {local} {remote} any -P out ipsec {out_rule};",
        f"spdadd {remote} {local} any -P in ipsec {in_rule};",
    )


def setkey_conf(fleet: Fleet, host: Host, peers: tuple[Host, ...]) -> str:
    lines = ["#!/usr/sbin/setkey -f", _header(fleet, host, "IPsec security policies").rstrip("\n")]
    lines += ["flush;", "spdflush;"]
    for peer in peers:
        lines.append("")
        lines.append(f"# {peer.name}")
        lines += spd_entries(fleet, host, peer)
    return "\n".join(lines) + "\n"


def racoon_conf(fleet: Fleet, host: Host, peers: tuple[Host, ...]) -> str:
    rp = fleet.mesh.racoon
    out = [_header(fleet, host, "IKEv1 (racoon) peers").rstrip("\n")]
    for peer in peers:
        out += [
            "",
            f"remote {peer.public_address} {{",
            f"        exchange_mode {rp.exchange_mode};",
            f"        lifetime time {rp.lifetime_hours} hour;",
            f"        my_identifier address {host.public_address};",
            f"        peers_identifier address {peer.public_address};",
            "        verify_identifier on;",
            f'        certificate_type plain_rsa "{RACOON_PRIVATE_KEY}";',
            f'        peers_certfile plain_rsa "{racoon_peer_key(peer.name)}";',
            "        generate_policy off;",
            "        proposal {",
            f"                encryption_algorithm {rp.encryption_algorithm};",
            f"                hash_algorithm {rp.hash_algorithm};",
            "                authentication_method rsasig;",
            f"                dh_group {rp.dh_group};",
            "        }",
            "}",
        ]
    if fleet.mesh.mode is MeshMode.IPIP:
        out += ["", "sainfo anonymous {"]
        out += _sainfo_body(fleet)
        out += ["}"]
    else:
        for peer in peers:
            out += [
                "",
                f"sainfo address {host.internal_address}/32 any address {peer.internal_address}/32 any {{",
            ]
            out += _sainfo_body(fleet)
            out += ["}"]
    return "\n".join(out) + "\n"


def _sainfo_body(fleet: Fleet) -> list[str]:
    rp = fleet.mesh.racoon
    return [
        f"        pfs_group {rp.pfs_group};",
        f"        lifetime time {fleet.mesh.lifetimes.child_rekey_seconds} sec;",
        f"        encryption_algorithm {rp.sa_encryption_algorithm};",
        f"        authentication_algorithm {rp.sa_authentication_algorithm};",
        f"        compression_algorithm {rp.compression_algorithm};",
    ]


def racoon_service() -> Service:
    return Service(
        name="racoon",
        start=("service", "racoon", "start"),
        stop=("service", "racoon", "stop"),
        status=_RUNNING,
        pid_file=RACOON_PID,
        log_path=None,
        needs_package="racoon",
    )


def handlers() -> tuple[Handler, ...]:
    return (
        Handler(name=SETKEY_HANDLER, reload=("setkey", "-f", SETKEY_CONF)),
        Handler(name=RACOON_HANDLER, reload=("racoonctl", "reload-config"), only_if_running=_RUNNING),
    )


def render(fleet: Fleet, host: Host, ready: tuple[tuple[Host, str], ...]) -> Fragment:
    peers = tuple(p for p, _ in ready)
    files = [
        FileResource(
            path=SETKEY_CONF,
            content=setkey_conf(fleet, host, peers).encode(),
            domain=Domain.IPSEC,
            mode=0o755,  # Debian ships it executable (#!/usr/sbin/setkey -f)
            handler=SETKEY_HANDLER,
            needs_package="ipsec-tools",
        ),
        FileResource(
            path=RACOON_CONF,
            content=racoon_conf(fleet, host, peers).encode(),
            domain=Domain.IPSEC,
            handler=RACOON_HANDLER,
            needs_package="racoon",
        ),
    ]
    for peer, key in ready:
        files.append(
            FileResource(
                path=racoon_peer_key(peer.name),
                content=key.encode(),
                domain=Domain.IPSEC,
                handler=RACOON_HANDLER,
                needs_package="racoon",
            )
        )
    return Fragment(
        files=tuple(sorted(files, key=lambda f: f.path)),
        keypairs=(racoon_keypair(),),
        handlers=handlers(),
        services=(racoon_service(),),
        owned_dirs=(RACOON_PEERS_DIR,),
    )
