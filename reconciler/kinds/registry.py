"""The kinds of resource the engine knows beyond its built-in phases, in the order it runs them.

A kind (one module under ``reconciler/kinds/``) holds everything about one kind of resource:
its probe (lines added to the ONE observation script of a host, data only as arguments), the
parser of that probe's answer, its diff (actions with reasons), and what apply does for its
actions. The engine (``reconciler.engine``) keeps the phase order, the one-script-per-host
batching and the file transaction; it calls each registered kind at its place:

- observe: ``wanted`` (does this Desired need the probe at all: a lean observation) then
  ``probe`` (script lines) and, once the script ran, ``parse`` (into ``Observed``);
- plan: ``plan`` (actions; the engine sorts them by domain and kind order and inserts the
  handlers' reloads);
- apply: ``apply``, after the reloads phase (a kind whose change is a file plus its handler's
  reload only reports those outcomes).

Adding a kind: one module implementing ``Kind`` plus one line in ``KINDS`` (see
docs/ARCHITECTURE.md, "How to add a kind", with ``reconciler.kinds.sysctl`` as the example).
"""

from __future__ import annotations

from reconciler.kinds import apache, sysctl
from reconciler.kinds.kind import Kind, ReloadProbe
from reconciler.kinds.resources import Handler

# The registered kinds, in the order their probes run and their apply steps follow the reloads.
KINDS: tuple[Kind, ...] = (sysctl.KIND,)

# Handlers' own reload/start proofs (a handler without one: its reload command's exit status).
PROBES: tuple[ReloadProbe, ...] = (apache.PROBE,)


def probe_for(h: Handler) -> ReloadProbe | None:
    return next((p for p in PROBES if p.handles(h)), None)
