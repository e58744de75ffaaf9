"""Domain `ipsec`: the host's side of the IPsec mesh, for the host's own stack.

Each host runs one stack (``Fleet.stack_of``: its ``ipsec:``, else ``mesh.backend``):
strongSwan (IKEv2, swanctl, raw public keys) is the default; racoon (IKEv1) renders the seed's
legacy shape; a link between the two is IKEv1 on the strongSwan side. Peers whose public key is
not known yet are ``Pending``, not errors. The other stack's configuration is declared absent
and its daemon stopped (a host that switched stacks), and the stack's packages are a
``Requirement``: a host whose apt cannot install them is refused in the plan. Pure.
"""

from __future__ import annotations

from dataclasses import replace

from reconciler.domains import racoon, strongswan
from reconciler.domains.keys import RACOON_PEERS_DIR, peer_keys
from reconciler.errors import RenderError
from reconciler.fleet.model import Datapath, Fleet, Host, IpsecBackend, MeshMode
from reconciler.kinds.resources import Absent, Domain, Fragment, Requirement, Service

STACK_PACKAGES: dict[IpsecBackend, tuple[str, ...]] = {
    IpsecBackend.STRONGSWAN: ("strongswan-charon", "strongswan-swanctl"),
    IpsecBackend.RACOON: ("ipsec-tools", "racoon"),
}

# Stop racoon and drop the SAs and policies setkey loaded for it (before the new stack's files
# go live: both stacks never hold the kernel's policies at once). No PF_KEY, no setkey: nothing.
_STOP_RACOON = (
    "service racoon stop >/dev/null 2>&1; "
    f'[ -s {racoon.RACOON_PID} ] && kill "$(cat {racoon.RACOON_PID})" 2>/dev/null; '
    "if command -v setkey >/dev/null 2>&1; then setkey -F; setkey -FP; fi; exit 0"
)


def check_mesh(fleet: Fleet, host: Host | None = None) -> None:
    """Combinations the datapaths cannot do (the loader rejects them too; render must never
    write a config that cannot work)."""
    mesh = fleet.mesh
    stack = fleet.stack_of(host) if host is not None else mesh.backend
    if mesh.datapath is Datapath.LIBIPSEC and stack is not IpsecBackend.STRONGSWAN:
        raise RenderError("mesh.datapath: libipsec is a strongSwan datapath; racoon needs datapath kernel")
    if mesh.datapath is Datapath.LIBIPSEC and mesh.mode is not MeshMode.TUNNEL:
        raise RenderError(
            "mesh.datapath: libipsec has no transport mode, so it cannot protect IP-IP (mesh.mode ipip); "
            "use mesh.mode tunnel or mesh.datapath kernel"
        )


def retired(stack: IpsecBackend) -> Fragment:
    """The other stack's configuration (absent, its owned directory pruned) and its daemon
    (stopped): what a host that switched to ``stack`` still carries from the old one."""
    why = f"the host runs {stack.value} now (ipsec: {stack.value})"
    if stack is IpsecBackend.STRONGSWAN:
        return Fragment(
            absent=tuple(
                Absent(path, Domain.IPSEC, f"racoon configuration: {why}")
                for path in (racoon.SETKEY_CONF, racoon.RACOON_CONF)
            ),
            owned_dirs=(RACOON_PEERS_DIR,),
            services=(
                Service(
                    name="racoon",
                    running=False,
                    enabled=False,
                    stop=("sh", "-c", _STOP_RACOON),
                    status=racoon.racoon_service().status,
                    pid_file=racoon.RACOON_PID,
                ),
            ),
        )
    charon = strongswan.charon_service()
    return Fragment(
        owned_dirs=(strongswan.CONF_DIR,),
        services=(replace(charon, running=False, enabled=False, needs_package=None, post_start=()),),
    )


def render(fleet: Fleet, host: Host) -> Fragment:
    if not fleet.peers_of(host):
        return Fragment()
    stack = fleet.stack_of(host)
    check_mesh(fleet, host)
    keys = peer_keys(fleet, host)
    if stack is IpsecBackend.STRONGSWAN:
        frag = strongswan.render(fleet, host, keys.ready)
    else:
        frag = racoon.render(fleet, host, keys.ready)
    old = retired(stack)
    return replace(
        frag,
        pending=keys.pending,
        absent=old.absent,
        owned_dirs=frag.owned_dirs + old.owned_dirs,
        services=frag.services + old.services,
        requires=(Requirement(f"ipsec: {stack.value}", STACK_PACKAGES[stack]),),
    )
