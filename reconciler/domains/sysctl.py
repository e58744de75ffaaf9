"""Domain `sysctl`: the kernel parameters of a host's roles (Fleet x Host -> Fragment), purely.

The settings (``SysctlSetting``, compared live by ``reconciler.kinds.sysctl``), the drop-in
that holds them (a file of the file transaction) and the handler that loads it. Two roles of
one host setting a key differently is a fleet error (``reconciler.fleet.semantic``).
"""

from __future__ import annotations

from reconciler.errors import RenderError
from reconciler.fleet.model import Fleet, Host
from reconciler.kinds import sysctl
from reconciler.kinds.resources import Domain, FileResource, Fragment, SysctlSetting


def render(fleet: Fleet, host: Host) -> Fragment:
    values: dict[str, str] = {}
    for role in fleet.roles_of(host):
        for key, value in role.sysctl:
            problem = sysctl.check(key, value)
            if problem is not None:
                raise RenderError(f"host {host.name}: role {role.name}: {problem}")
            values.setdefault(key, value)
    if not values:
        return Fragment()
    settings = tuple(
        SysctlSetting(key, value, handler=sysctl.HANDLER) for key, value in sorted(values.items())
    )
    dropin = FileResource(sysctl.DROPIN, sysctl.dropin(settings), Domain.SYSCTL, handler=sysctl.HANDLER)
    return Fragment(files=(dropin,), handlers=(sysctl.handler(),), sysctl=settings)
