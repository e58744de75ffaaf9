"""Domain `apparmor`: AppArmor profiles of a host's roles (Fleet x Host -> Fragment), purely.

For each ``AppArmorProfile``:
- ``/etc/apparmor.d/<name>``: the full profile, only when ``content`` is declared (otherwise the
  packaged profile stays as the package shipped it);
- ``/etc/apparmor.d/local/<name>``: the local override, always: the seed's moved-directory fix
  (``MovedDirectory(old=/var/lib/mysql, new=/data/var/mysql)`` gives ``/data/var/mysql/ r,``
  and ``/data/var/mysql/** rwk,``) followed by the declared extra ``rules``.

Both files belong to the handler ``apparmor:<name>``: the engine validates the whole staged
/etc/apparmor.d with ``apparmor_parser -Q -K`` (includes resolved inside the staged tree), then
replaces the profile in the kernel with ``apparmor_parser -r`` only where AppArmor is enabled
(``aa-enabled -q``; without the LSM the profile is rendered and parsed, never loaded).
"""

from __future__ import annotations

from reconciler.domains.role_items import items_of_roles
from reconciler.errors import RenderError
from reconciler.fleet.model import AppArmorProfile, Fleet, Host, MovedDirectory
from reconciler.kinds.resources import Domain, Expected, FileResource, Fragment, Handler, Validator

APPARMOR_DIR = "/etc/apparmor.d"
PACKAGE = "apparmor"


def profiles_of(fleet: Fleet, host: Host) -> tuple[AppArmorProfile, ...]:
    """The AppArmor profiles of the host's roles, each once, sorted by name."""
    return items_of_roles(fleet, host, lambda role: role.apparmor, fleet.apparmor, "AppArmor profiles")


def handler_name(profile: AppArmorProfile) -> str:
    return f"apparmor:{profile.name}"


def profile_path(profile: AppArmorProfile) -> str:
    return f"{APPARMOR_DIR}/{profile.name}"


def local_path(profile: AppArmorProfile) -> str:
    return f"{APPARMOR_DIR}/local/{profile.name}"


def _check(profile: AppArmorProfile, value: str, what: str) -> str:
    if any(c in value for c in "\n\r\0"):
        raise RenderError(f"{profile.source_file or profile.name}: {what} holds a newline or NUL")
    return value


def moved_directory_rules(moved: MovedDirectory) -> tuple[str, ...]:
    """The rules the packaged profile grants on ``old``, granted on ``new`` instead."""
    new = moved.new.rstrip("/") or "/"
    base = new if new.endswith("/") else new + "/"
    return (f"{base} r,", f"{base}** rwk,")


def render_local(profile: AppArmorProfile) -> str:
    where = profile.source_file or f"AppArmor profile {profile.name}"
    lines = [
        f"# Managed by reconciler from {where}: local changes are reverted.",
        f"# Site-specific additions to the {profile.name} profile (included by the profile).",
    ]
    for moved in profile.moved_directories:
        _check(profile, moved.old, "moved_directories.from")
        _check(profile, moved.new, "moved_directories.to")
        lines.append(f"# moved: {moved.old} -> {moved.new}")
        lines.extend(moved_directory_rules(moved))
    if profile.rules:
        lines.append("# declared rules")
        lines.extend(_check(profile, rule, "rules").strip() for rule in profile.rules)
    return "\n".join(lines) + "\n"


def handler_for(profile: AppArmorProfile) -> Handler:
    return Handler(
        name=handler_name(profile),
        validators=(
            Validator(
                # -b/-I: resolve <tunables/...>, <abstractions/...>, <local/...> in the staged
                # tree, so a broken local override fails here and not at reload.
                argv=(
                    "apparmor_parser",
                    "-Q",
                    "-K",
                    "-b",
                    "{tree}",
                    "-I",
                    "{tree}",
                    f"{{tree}}/{profile.name}",
                ),
                tree_root=APPARMOR_DIR,
                needs_command="apparmor_parser",
            ),
        ),
        reload=("apparmor_parser", "-r", profile_path(profile)),
        only_if_running=("aa-enabled", "-q"),
    )


def render(fleet: Fleet, host: Host) -> Fragment:
    files: list[FileResource] = []
    handlers: list[Handler] = []
    expects: list[Expected] = []
    for profile in profiles_of(fleet, host):
        name = handler_name(profile)
        if profile.content is None:
            where = profile.source_file or f"AppArmor profile {profile.name}"
            expects.append(
                Expected(
                    profile_path(profile),
                    f"{where}: a local override for {profile_path(profile)}, which no installed package "
                    "ships on this host: install the package that ships the profile (role packages), "
                    "or declare the full profile (content:)",
                )
            )
        if profile.content is not None:
            text = profile.content if profile.content.endswith("\n") else profile.content + "\n"
            files.append(
                FileResource(
                    path=profile_path(profile),
                    content=text.encode("utf-8"),
                    domain=Domain.APPARMOR,
                    handler=name,
                    needs_package=PACKAGE,
                )
            )
        files.append(
            FileResource(
                path=local_path(profile),
                content=render_local(profile).encode("utf-8"),
                domain=Domain.APPARMOR,
                handler=name,
                needs_package=PACKAGE,
            )
        )
        handlers.append(handler_for(profile))
    if not files:
        return Fragment()
    return Fragment(
        files=tuple(sorted(files, key=lambda f: f.path)),
        handlers=tuple(sorted(handlers, key=lambda h: h.name)),
        expects=tuple(expects),
    )
