"""Kind ``ipsec child``: CHILD_SAs this host starts actively (libipsec has no trap policies), an
established mesh being observed state: a child that is not up while charon runs is planned to
be initiated again, and apply asks charon to start it without waiting (it settles once the
peer answers). Whether a host runs IPsec at all is read from its desired resources
(``runs_ipsec``), not from handler names. The observation of charon, swanctl and xfrm is still
part of ``reconciler.engine.observe`` (its framing and swanctl parser are being unified)."""

from __future__ import annotations

from reconciler.kinds.actions import Action, ActionKind
from reconciler.kinds.kind import ApplyRun
from reconciler.kinds.observed import Observed
from reconciler.kinds.resources import Desired, Domain


def runs_ipsec(desired: Desired) -> bool:
    """The host has an IPsec configuration to observe: files or links of the IPsec domain
    (strongSwan's swanctl.conf, racoon's), or children it starts."""
    return (
        bool(desired.initiate)
        or any(f.domain is Domain.IPSEC for f in desired.files)
        or any(lk.domain is Domain.IPSEC for lk in desired.links)
    )


def plan_initiate(desired: Desired, observed: Observed) -> list[Action]:
    """Children this host starts that are not up: start them again. Without trap policies
    (libipsec) a child whose first attempt failed (e.g. the peer had not loaded its config
    yet and answered NO_PROPOSAL_CHOSEN) is never retried by charon itself. Only when charon
    runs: a charon started by this apply initiates them on its own."""
    if not desired.initiate or not observed.ipsec.daemon_running:
        return []
    up = set(observed.ipsec.installed_children)
    return [
        Action(
            ActionKind.INITIATE_CHILD,
            f"ipsec child {name}",
            Domain.SERVICES,
            "not established; this host is the pair's initiator (no trap policies with libipsec)",
        )
        for name in desired.initiate
        if name not in up
    ]


# Start each named CHILD_SA without waiting for it: a negative timeout makes the vici
# `initiate` asynchronous (charon queues the exchange and answers at once), so a host with 49
# peers costs 49 short vici round trips, not 49 waits on peers that may be busy themselves.
INITIATE = r"""
for c in "$@"; do swanctl --initiate --child "$c" --timeout -1 >/dev/null 2>&1 || true; done
"""


async def apply_initiate(run: ApplyRun) -> None:
    idx = run.indices({ActionKind.INITIATE_CHILD})
    if not idx:
        return
    names = [run.plan.actions[i].resource.removeprefix("ipsec child ") for i in idx]
    conn = await run.conn()
    await conn.run_script(INITIATE, args=names, timeout=30)
    for i in idx:
        # the pair's other side may not be ready yet: the next reconcile looks again
        run.mark(i, "done", "initiated (settles once the peer answers)")
