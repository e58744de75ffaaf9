"""Jinja2 templates of managed files, rendered in a sandbox. Pure: no I/O, no clock.

A template sees only the fleet model: ``host`` (the Host being rendered), ``fleet`` (the Fleet),
``peers`` (``fleet.peers_of(host)``) and ``roles`` (``fleet.roles_of(host)``). Templates are
looked up only in ``Fleet.templates`` (repo path -> text, read by the loader), so
``{% include %}``/``{% import %}`` reach other templates of the repo and nothing else.

Settings: ``SandboxedEnvironment`` (no attribute access to internals, no unsafe calls),
``StrictUndefined`` (a typo is an error, never an empty string), autoescape off (these are
config files, not HTML), trailing newline kept, and no ``lipsum`` global (it is random).

Any template problem becomes a ``RenderError`` naming the template file and line.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Mapping
from typing import Any

import jinja2
from jinja2.sandbox import SandboxedEnvironment

from reconciler.errors import RenderError
from reconciler.fleet.model import Fleet, Host


class _FleetLoader(jinja2.BaseLoader):
    """Serves templates from ``Fleet.templates`` only; the template's name is its repo path,
    which is also used as its "filename" so tracebacks point at ``templates/x.j2``."""

    def __init__(self, templates: Mapping[str, str]) -> None:
        self._templates = templates

    def get_source(
        self, environment: jinja2.Environment, template: str
    ) -> tuple[str, str | None, Callable[[], bool] | None]:
        try:
            source = self._templates[template]
        except KeyError:
            raise jinja2.TemplateNotFound(template) from None
        return source, template, lambda: True


def _environment(templates: Mapping[str, str]) -> SandboxedEnvironment:
    return _environment_for(tuple(sorted(templates.items())))


@functools.lru_cache(maxsize=16)
def _environment_for(templates: tuple[tuple[str, str], ...]) -> SandboxedEnvironment:
    """One environment per set of template texts, shared by every host of a fleet (and by
    the next commit when the templates did not change), so each template compiles once
    instead of once per host. Rendering keeps no state between calls."""
    env = SandboxedEnvironment(
        loader=_FleetLoader(dict(templates)),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        auto_reload=False,
        cache_size=64,
    )
    env.globals.pop("lipsum", None)  # random text: would make rendering non-deterministic
    return env


def _template_line(tb: types.TracebackType | None, names: set[str]) -> tuple[str, int] | None:
    """The innermost frame that belongs to a template (Jinja rewrites tracebacks so that
    template frames carry the template's file name and line)."""
    found: tuple[str, int] | None = None
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if filename in names:
            found = (filename, tb.tb_lineno)
        tb = tb.tb_next
    return found


def template_context(fleet: Fleet, host: Host) -> dict[str, Any]:
    """What a template may see: the fleet model, nothing else."""
    return {
        "host": host,
        "fleet": fleet,
        "peers": fleet.peers_of(host),
        "roles": fleet.roles_of(host),
    }


def render_template(fleet: Fleet, host: Host, template: str, *, used_by: str = "") -> str:
    """Render the repo template ``template`` for ``host``.

    ``used_by`` (e.g. ``files/motd.yaml``) is added to error messages. Raises RenderError
    naming the template file and line on a syntax error, an undefined variable, a sandbox
    violation, a missing template or any other exception raised while rendering.
    """
    suffix = f" (used by {used_by})" if used_by else ""
    if template not in fleet.templates:
        raise RenderError(f"{template}: template not found in the fleet repo{suffix}")
    env = _environment(fleet.templates)
    try:
        tmpl = env.get_template(template)
    except jinja2.TemplateSyntaxError as exc:
        where = exc.filename or exc.name or template
        raise RenderError(f"{where}:{exc.lineno}: template syntax error: {exc.message}{suffix}") from None
    except jinja2.TemplateNotFound as exc:
        raise RenderError(f"{template}: template not found: {exc.name}{suffix}") from None
    try:
        return tmpl.render(template_context(fleet, host))
    except jinja2.TemplateSyntaxError as exc:  # in an included template
        where = exc.filename or exc.name or template
        raise RenderError(f"{where}:{exc.lineno}: template syntax error: {exc.message}{suffix}") from None
    except jinja2.TemplateNotFound as exc:
        raise RenderError(f"{template}: included template not found: {exc.name}{suffix}") from None
    except Exception as exc:  # noqa: BLE001 - anything a template raises is a template error
        located = _template_line(exc.__traceback__, set(fleet.templates))
        where = f"{located[0]}:{located[1]}" if located else template
        kind = "sandbox violation" if isinstance(exc, jinja2.exceptions.SecurityError) else "error"
        detail = str(exc) if isinstance(exc, jinja2.TemplateError) else f"{type(exc).__name__}: {exc}"
        raise RenderError(f"{where}: template {kind}: {detail} (host {host.name}){suffix}") from None
