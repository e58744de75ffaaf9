"""Domain `files`: generic managed files of a host's roles (Fleet x Host -> Fragment), purely.

A ``ManagedFile`` becomes one of:
- a ``FileResource`` with inline ``content`` or the output of its Jinja2 ``template``
  (``reconciler.domains.templating``: sandboxed, StrictUndefined, fed only the fleet model);
- a ``LinkResource`` when it declares ``link_target``.

Its ``validate`` argv (with ``{path}`` = the staged copy) becomes the file's own validator, and
its ``reload`` becomes a ``Handler`` named after the service, so the engine validates before the
swap and reloads each service once per apply.
"""

from __future__ import annotations

from reconciler.domains.role_items import items_of_roles
from reconciler.domains.templating import render_template
from reconciler.errors import RenderError
from reconciler.fleet.model import Fleet, Host, ManagedFile
from reconciler.kinds.resources import Domain, FileResource, Fragment, Handler, LinkResource, Validator


def files_of(fleet: Fleet, host: Host) -> tuple[ManagedFile, ...]:
    """The managed files of the host's roles, each once, sorted by name."""
    return items_of_roles(fleet, host, lambda role: role.files, fleet.files, "managed files")


def _where(mf: ManagedFile) -> str:
    return mf.source_file or f"managed file {mf.name}"


def _content(fleet: Fleet, host: Host, mf: ManagedFile) -> bytes:
    if mf.template is not None:
        return render_template(fleet, host, mf.template, used_by=_where(mf)).encode("utf-8")
    if mf.content is not None:
        return mf.content.encode("utf-8")
    raise RenderError(f"{_where(mf)}: managed file {mf.name} has no content, template or link_target")


def render(fleet: Fleet, host: Host) -> Fragment:
    files: list[FileResource] = []
    links: list[LinkResource] = []
    handlers: dict[str, Handler] = {}
    for mf in files_of(fleet, host):
        handler_name: str | None = None
        if mf.reload is not None:
            handler = Handler(name=mf.reload.service, reload=tuple(mf.reload.command))
            known = handlers.get(handler.name)
            if known is not None and known != handler:
                raise RenderError(
                    f"{_where(mf)}: service {handler.name} is reloaded with {list(known.reload)} by "
                    f"another managed file and with {list(handler.reload)} here"
                )
            handlers[handler.name] = handler
            handler_name = handler.name
        if mf.link_target is not None:
            if mf.content is not None or mf.template is not None:
                raise RenderError(f"{_where(mf)}: {mf.name} has both link_target and content/template")
            links.append(
                LinkResource(
                    path=mf.path,
                    target=mf.link_target,
                    domain=Domain.FILES,
                    handler=handler_name,
                    needs_package=mf.package,
                    controlled_dir=mf.controlled_dir.path if mf.controlled_dir else None,
                    controlled_by=mf.controlled_by,
                )
            )
            continue
        # no needs_command: a declared validator that cannot run must fail the change, not skip
        validators = (Validator(argv=tuple(mf.validate)),) if mf.validate else ()
        files.append(
            FileResource(
                path=mf.path,
                content=_content(fleet, host, mf),
                domain=Domain.FILES,
                mode=mf.mode,
                owner=mf.owner,
                group=mf.group,
                secret=mf.secret,
                handler=handler_name,
                validators=validators,
                needs_package=mf.package,
                controlled_dir=mf.controlled_dir.path if mf.controlled_dir else None,
                controlled_by=mf.controlled_by,
            )
        )
    return Fragment(
        files=tuple(sorted(files, key=lambda f: f.path)),
        links=tuple(sorted(links, key=lambda lk: lk.path)),
        handlers=tuple(sorted(handlers.values(), key=lambda h: h.name)),
    )
