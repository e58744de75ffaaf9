"""The status page: Jinja2 templates (autoescaped), a server-side SVG of the mesh, no script."""

from reconciler.daemon.statuspage.render import render_commits, render_host, render_overview

__all__ = ["render_commits", "render_host", "render_overview"]
