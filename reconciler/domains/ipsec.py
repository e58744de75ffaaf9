"""Domain `ipsec`: the host's side of the IPsec mesh, for the backend the fleet chose.

strongSwan (IKEv2, swanctl, raw public keys) is the default; racoon (IKEv1) renders the seed's
legacy shape. Peers whose public key is not known yet are ``Pending``, not errors. Pure.
"""

from __future__ import annotations

from dataclasses import replace

from reconciler.domains import racoon, strongswan
from reconciler.domains.keys import peer_keys
from reconciler.errors import RenderError
from reconciler.fleet.model import Datapath, Fleet, Host, IpsecBackend, MeshMode
from reconciler.kinds.resources import Fragment


def check_mesh(fleet: Fleet) -> None:
    """Combinations the datapaths cannot do (the loader rejects them too; render must never
    write a config that cannot work)."""
    mesh = fleet.mesh
    if mesh.datapath is Datapath.LIBIPSEC and mesh.backend is not IpsecBackend.STRONGSWAN:
        raise RenderError(
            "mesh.datapath: libipsec is a strongSwan datapath; it needs mesh.backend strongswan"
        )
    if mesh.datapath is Datapath.LIBIPSEC and mesh.mode is not MeshMode.TUNNEL:
        raise RenderError(
            "mesh.datapath: libipsec has no transport mode, so it cannot protect IP-IP (mesh.mode ipip); "
            "use mesh.mode tunnel or mesh.datapath kernel"
        )


def render(fleet: Fleet, host: Host) -> Fragment:
    if not fleet.peers_of(host):
        return Fragment()
    check_mesh(fleet)
    keys = peer_keys(fleet, host)
    if fleet.mesh.backend is IpsecBackend.STRONGSWAN:
        frag = strongswan.render(fleet, host, keys.ready)
    else:
        frag = racoon.render(fleet, host, keys.ready)
    return replace(frag, pending=keys.pending)
