"""Renders the status pages from the daemon's status data with Jinja2 (autoescape on)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jinja2

from reconciler.daemon.statuspage.mesh import LINK_STATES, layout

_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(Path(__file__).parent / "templates")),
    autoescape=True,
    undefined=jinja2.ChainableUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def _when(ts: object) -> str:
    if not isinstance(ts, int | float) or not ts:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def _short(commit: object) -> str:
    return str(commit or "")[:12]


_ENV.filters["when"] = _when
_ENV.filters["short"] = _short


def render_overview(status: dict[str, Any]) -> str:
    states = {str(h.get("name")): str(h.get("state")) for h in status.get("hosts", [])}
    picture = layout(status.get("mesh") or {}, states)
    return _ENV.get_template("overview.html").render(s=status, pic=picture, link_states=LINK_STATES)


def render_host(status: dict[str, Any], host: dict[str, Any]) -> str:
    return _ENV.get_template("host.html").render(s=status, h=host)


def render_commits(status: dict[str, Any], commits: dict[str, Any]) -> str:
    return _ENV.get_template("commits.html").render(s=status, c=commits)
