"""What a plan is made of: ``Action`` (one change, with its reason and diff), ``ActionKind``
(each kind's traits on the enum) and ``HostPlan`` (the ordered actions of one host).

Shared by the engine (plan, apply, planview, fleet), the kinds (``reconciler.kinds.registry``)
and the daemon. Plain data: nothing here does I/O.

Traits of a kind (``ActionKind.<X>.<trait>``):
  ``bucket``   how the plan summary counts it: "add", "change", "destroy" or "reload";
  ``order``    its place inside one ``Domain`` (packages first, deletes after writes, ...);
  ``is_file``  handled by the file transaction of apply (stage, validate, swap, journal,
               restore: ``reconciler.engine.transaction``);
  ``settles``  its effect settles after apply returns (a peer must answer): it does not count
               against "converged" when the host is observed right after the apply;
  ``files_only`` its whole effect is the content, mode or owner of declared files: an apply
               of only such actions re-observes only those files.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple

from reconciler.host.identity import HostIdentity
from reconciler.kinds.observed import Observed
from reconciler.kinds.resources import (
    Address,
    Domain,
    FileResource,
    FirewallRuleset,
    KeyPair,
    LinkResource,
    Package,
    Pending,
    Service,
    SysctlSetting,
    Tunnel,
)


class _Traits(NamedTuple):
    bucket: str
    order: int
    is_file: bool = False
    settles: bool = False
    files_only: bool = False


class ActionKind(StrEnum):
    INSTALL_PACKAGE = "install-package"
    PURGE_PACKAGE = "purge-package"
    RESTORE_FIREWALL = "restore-firewall"
    GENERATE_KEYPAIR = "generate-keypair"
    CREATE = "create"
    UPDATE = "update"
    CHMOD = "chmod"
    CHOWN = "chown"
    RELINK = "relink"
    DELETE = "delete"
    CREATE_TUNNEL = "create-tunnel"
    RECREATE_TUNNEL = "recreate-tunnel"
    ADD_ADDRESS = "add-address"
    RELOAD = "reload"
    START_SERVICE = "start-service"
    STOP_SERVICE = "stop-service"  # the daemon of a retired IPsec stack, before the swap
    ENABLE_SERVICE = "enable-service"
    RECORD_INVENTORY = "record-inventory"
    INITIATE_CHILD = "initiate-child"
    RECORD_IDENTITY = "record-identity"
    # a kernel parameter whose live value differs (reconciler.kinds.sysctl): set by its handler
    SET_SYSCTL = "set-sysctl"
    # a change the reconciler will not make: the path's directories are not safe (a link,
    # another user's), or its owner is unknown; apply reports it as failed, does nothing
    REFUSED = "refused"

    @property
    def traits(self) -> _Traits:
        return _TRAITS[self]

    @property
    def bucket(self) -> str:
        return _TRAITS[self].bucket

    @property
    def order(self) -> int:
        return _TRAITS[self].order

    @property
    def is_file(self) -> bool:
        return _TRAITS[self].is_file

    @property
    def settles(self) -> bool:
        return _TRAITS[self].settles

    @property
    def files_only(self) -> bool:
        return _TRAITS[self].files_only


_K = ActionKind
_TRAITS: dict[ActionKind, _Traits] = {
    _K.INSTALL_PACKAGE: _Traits("add", 0),
    _K.PURGE_PACKAGE: _Traits("destroy", 1),
    _K.RESTORE_FIREWALL: _Traits("change", 2),
    _K.GENERATE_KEYPAIR: _Traits("add", 3),
    _K.CREATE: _Traits("add", 4, is_file=True, files_only=True),
    _K.UPDATE: _Traits("change", 4, is_file=True, files_only=True),
    _K.RELINK: _Traits("change", 4, is_file=True),
    _K.SET_SYSCTL: _Traits("change", 4),
    _K.CHMOD: _Traits("change", 5, is_file=True, files_only=True),
    _K.CHOWN: _Traits("change", 5, is_file=True, files_only=True),
    _K.REFUSED: _Traits("change", 5),
    _K.DELETE: _Traits("destroy", 6, is_file=True),
    _K.CREATE_TUNNEL: _Traits("add", 7),
    _K.RECREATE_TUNNEL: _Traits("change", 7),
    _K.ADD_ADDRESS: _Traits("add", 7),
    _K.RELOAD: _Traits("reload", 9),
    _K.STOP_SERVICE: _Traits("destroy", 7),
    _K.START_SERVICE: _Traits("change", 8),
    _K.ENABLE_SERVICE: _Traits("change", 8),
    _K.RECORD_INVENTORY: _Traits("change", 9, files_only=True),
    _K.INITIATE_CHILD: _Traits("change", 9, settles=True),
    _K.RECORD_IDENTITY: _Traits("change", 10),
}
assert set(_TRAITS) == set(ActionKind), "every ActionKind has its traits"

# the kinds with a trait, as sets (for ``run.indices`` and membership tests)
FILE_KINDS = frozenset(k for k in ActionKind if k.is_file)
SETTLING_KINDS = frozenset(k for k in ActionKind if k.settles)
FILES_ONLY_KINDS = frozenset(k for k in ActionKind if k.files_only)

Resource = (
    FileResource
    | LinkResource
    | KeyPair
    | FirewallRuleset
    | Tunnel
    | Address
    | Package
    | Service
    | SysctlSetting
    | None
)


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    resource: str  # "file /etc/motd", "firewall", "tunnel tun-web2", "handler apache2", ...
    domain: Domain
    reason: str
    diff: str = ""  # unified diff; SECRET_DIFF for secret files; "" when nothing to show
    path: str | None = None  # for file-like actions
    handler: str | None = None  # the handler reloaded because of this action
    target: Resource = field(default=None, compare=False, repr=False)  # what apply needs
    # planned as if this package were installed: it is installed first, in the same apply
    after_package: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "kind": str(self.kind),
            "resource": self.resource,
            "domain": self.domain.name.lower(),
            "reason": self.reason,
            "diff": self.diff,
            "path": self.path,
            "handler": self.handler,
            "after_package": self.after_package,
        }


@dataclass(frozen=True)
class HostPlan:
    host: str
    actions: tuple[Action, ...] = ()
    pending: tuple[Pending, ...] = ()  # cannot be done yet (e.g. a peer key unknown): listed, not errors
    skipped: tuple[Pending, ...] = ()  # cannot be done on this host (e.g. no ipip in the kernel)
    warnings: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()  # parts of the observation that failed
    inventory: tuple[str, ...] = ()  # managed paths to record after a successful apply
    noop_reason: str = ""  # why there is nothing to do (when ``actions`` is empty)
    init_system: str = "unknown"  # from the observation: how apply starts services
    # the observation this plan was made from (apply re-observes only what it touched, see
    # reconciler.engine.apply.reobserve_scope); not part of the plan's value
    observed: Observed | None = field(default=None, compare=False, repr=False)
    # the identity this fleet claims on the host (None: not checked) and, when the host claims
    # another one, why nothing is planned (the plan then has no action)
    identity: HostIdentity | None = None
    refusal: str = ""
    # the refusal is a Requirement the host cannot meet (not an identity mismatch)
    refused_requirement: bool = False

    @property
    def changed(self) -> bool:
        return bool(self.actions)

    def counts(self) -> dict[str, int]:
        out = {"add": 0, "change": 0, "destroy": 0, "reload": 0}
        for a in self.actions:
            out[bucket(a.kind)] += 1
        return out

    def reloads(self) -> tuple[str, ...]:
        return tuple(a.handler for a in self.actions if a.kind is ActionKind.RELOAD and a.handler)

    def as_dict(self) -> dict[str, object]:
        return {
            "host": self.host,
            "changed": self.changed,
            "counts": self.counts(),
            "actions": [a.as_dict() for a in self.actions],
            "pending": [_pending_dict(p) for p in self.pending],
            "skipped": [_pending_dict(p) for p in self.skipped],
            "warnings": list(self.warnings),
            "errors": list(self.errors),
            "noop_reason": self.noop_reason,
            "refusal": self.refusal,
        }


def bucket(kind: ActionKind) -> str:
    return kind.bucket


def _pending_dict(p: Pending) -> dict[str, str]:
    return {"domain": p.domain.name.lower(), "subject": p.subject, "reason": p.reason}


def summary_counts(plans: Iterable[HostPlan]) -> dict[str, int]:
    total = {"add": 0, "change": 0, "destroy": 0, "reload": 0, "hosts": 0}
    for p in plans:
        c = p.counts()
        for k in ("add", "change", "destroy", "reload"):
            total[k] += c[k]
        total["hosts"] += 1
    return total


def summary_line(plans: Iterable[HostPlan]) -> str:
    """ "Plan: 3 to add, 2 to change, 1 to destroy, 1 reload on 4 hosts"."""
    t = summary_counts(plans)
    reloads = f"{t['reload']} reload" + ("s" if t["reload"] != 1 else "")
    hosts = f"{t['hosts']} host" + ("s" if t["hosts"] != 1 else "")
    return (
        f"Plan: {t['add']} to add, {t['change']} to change, {t['destroy']} to destroy, {reloads} on {hosts}"
    )
