"""Domain `apparmor`: renders Fleet x Host -> Fragment, purely (placeholder, nothing yet)."""

from __future__ import annotations

from reconciler.fleet.model import Fleet, Host
from reconciler.resources import Fragment


def render(fleet: Fleet, host: Host) -> Fragment:
    return Fragment()
