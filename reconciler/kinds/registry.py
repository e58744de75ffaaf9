"""The kinds of resource the engine knows, in the order it runs them.

A kind (one module under ``reconciler/kinds/``) holds everything about one kind of resource:
its probe (lines added to the ONE observation script of a host, data only as arguments), the
parser of that probe's answer, its diff (actions with reasons), and what apply does for its
actions. The engine (``reconciler.engine``) keeps the phase order, the one-script-per-host
batching and the file transaction; it calls each registered kind at its place:

- observe: ``shell`` (its functions, in the script's prelude), ``wanted`` (does this Desired
  need the probe at all: a lean observation) then ``probe`` (script lines) and, once the script
  ran, ``parse`` (into ``Observed``); the host's own records (inventory, pending reloads,
  identity, init system) are the engine's, read right after ``FILES``;
- plan: ``PACKAGES`` first (the engine's simulated post-install state decides which resources
  depending on a package are planned), then every other kind's ``plan`` in this order (actions;
  the engine sorts them by domain and kind order, prunes, and inserts the handlers' reloads);
- apply: ``apply``, after the reloads phase (a kind whose change is a file plus its handler's
  reload only reports those outcomes; the others' changes are still engine phases).

Adding a kind: one module implementing ``Kind`` plus one line in ``KINDS`` (see
docs/ARCHITECTURE.md, "How to add a kind", with ``reconciler.kinds.sysctl`` as the example).
"""

from __future__ import annotations

from reconciler.kinds import apache, files, firewall, ipsec, keypairs, packages, services, sysctl, tunnels
from reconciler.kinds.kind import Kind, ReloadProbe
from reconciler.kinds.resources import Handler

FILES: Kind = files.KIND  # always wanted: first, the host's records follow it
PACKAGES: Kind = packages.KIND  # planned first, by the engine

# The registered kinds, in the order their probes run, their diffs are computed and their apply
# steps follow the reloads.
KINDS: tuple[Kind, ...] = (
    FILES,
    firewall.KIND,
    keypairs.KIND,
    tunnels.LINKS,
    ipsec.KIND,
    tunnels.KERNEL,
    PACKAGES,
    services.KIND,
    sysctl.KIND,
)

# Handlers' own reload/start proofs (a handler without one: its reload command's exit status).
PROBES: tuple[ReloadProbe, ...] = (apache.PROBE,)


def probe_for(h: Handler) -> ReloadProbe | None:
    return next((p for p in PROBES if p.handles(h)), None)
