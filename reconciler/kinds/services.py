"""Kind ``service``: the observation and the diff of declared services (starting, stopping and
enabling them is the engine's services phase with ``reconciler.kinds.packaging``).

- observe: one probe per service: where PID 1 is systemd ``systemctl is-active/is-enabled``;
  else the service's status command (or ``service NAME status``) and its init script's runlevel
  links; a service with a pid file is judged by that file (``read`` and ``kill -0``: builtins),
  and one that must NOT run (the old stack of a host that switched) by its pid file only;
- plan: start, enable, or stop actions; a role service the host does not know at all is a plan
  error, not an action that could only fail.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from types import MappingProxyType

from reconciler.host.script import ScriptBuilder
from reconciler.kinds.actions import Action, ActionKind
from reconciler.kinds.kind import BaseKind, PlanStep, SectionReader
from reconciler.kinds.observed import Observed, ServiceState
from reconciler.kinds.resources import Desired, Service

SHELL = r"""svc_probe() {
  name=$1; shift
  if [ "$PID1" = systemd ]; then
    printf 'active %s\n' "$(timeout 10 systemctl is-active -- "$name" 2>/dev/null)"
    printf 'enabled %s\n' "$(timeout 10 systemctl is-enabled -- "$name" 2>/dev/null)"
  else
    if [ $# -gt 0 ]; then
      timeout 10 "$@" >/dev/null 2>&1; printf 'status %s\n' "$?"
    else
      timeout 10 service "$name" status >/dev/null 2>&1; printf 'status %s\n' "$?"
    fi
    svc_rc "$name"
  fi
}
# enabled at boot: an init script with a start link in a multi-user runlevel (builtins only)
svc_rc() {
  if [ -f "/etc/init.d/$1" ]; then
    rc=no
    for f in /etc/rc2.d/S*"$1" /etc/rc3.d/S*"$1" /etc/rc4.d/S*"$1" /etc/rc5.d/S*"$1"; do
      case ${f##*/} in S[0-9][0-9]"$1") [ -e "$f" ] && rc=yes ;; esac
    done
    printf 'rc %s\n' "$rc"
  else
    printf 'rc none\n'
  fi
}
# running = the pid file names a live process: read and kill -0 are builtins (no fork)
svc_pid() {
  if [ "$PID1" = systemd ]; then svc_probe "$1"; return; fi
  _st=1
  if [ -s "$2" ] && read -r _p < "$2"; then
    case $_p in ''|*[!0-9]*) ;; *) kill -0 "$_p" 2>/dev/null && _st=0 ;; esac
  fi
  printf 'status %s\n' "$_st"
  svc_rc "$1"
}
# a service that must NOT run (the old stack of a host that switched): its pid file only,
# with builtins (no systemctl process on every observation of every host)
svc_gone() {
  _st=1
  if [ -s "$1" ] && read -r _p < "$1"; then
    case $_p in ''|*[!0-9]*) ;; *) kill -0 "$_p" 2>/dev/null && _st=0 ;; esac
  fi
  printf 'status %s\n' "$_st"
}
"""


def parse_service(name: str, text: str) -> ServiceState:
    fields = dict((ln.split(" ", 1) + [""])[:2] for ln in text.splitlines() if ln.strip())
    if "active" in fields:
        en = fields.get("enabled", "").strip()
        enabled = None if not en else en in ("enabled", "enabled-runtime", "static", "alias", "indirect")
        return ServiceState(name=name, running=fields["active"].strip() == "active", enabled=enabled)
    rc = fields.get("rc", "").strip()  # init scripts: a start link in runlevels 2-5
    enabled = True if rc == "yes" else (False if rc == "no" else None)
    return ServiceState(name=name, running=fields.get("status", "").strip() == "0", enabled=enabled)


def known_services(
    services: tuple[Service, ...], observed: Observed, errors: list[str]
) -> tuple[Service, ...]:
    """Drop (as a plan error) a role service started through ``service NAME start`` that no
    package is tied to and that the host does not know (no init script, no unit): starting it
    could only fail ("NAME: unrecognized service"). A service tied to a package being installed
    is planned as if the package were there (``reconciler.engine.plan``)."""
    out: list[Service] = []
    for s in services:
        state = observed.services.get(s.name)
        unknown = (
            s.needs_package is None
            and s.start == ("service", s.name, "start")
            and observed.init_system in ("sysv", "systemd")
            and state is not None
            and not state.running
            and state.enabled is None
        )
        if unknown:
            errors.append(
                f"service {s.name}: the host has no init script or unit for it and no package is tied to "
                f"it; not planned (name the package that brings it: {{name: {s.name}, package: PACKAGE}})"
            )
            continue
        out.append(s)
    return tuple(out)


def plan_services(services: tuple[Service, ...], observed: Observed) -> list[Action]:
    out: list[Action] = []
    for s in services:
        if not s.running:
            live = observed.services.get(s.name)
            if live is not None and live.running:
                out.append(
                    Action(
                        ActionKind.STOP_SERVICE,
                        f"service {s.name}",
                        s.domain,
                        "running, but this host's configuration replaced it (stopped before the new "
                        "files go live)",
                        target=s,
                    )
                )
            continue
        state = observed.services.get(s.name)
        if state is not None and state.running:
            if s.enabled and state.enabled is False:
                out.append(
                    Action(
                        ActionKind.ENABLE_SERVICE,
                        f"service {s.name}",
                        s.domain,
                        "running, but not enabled at boot",
                        target=s,
                    )
                )
            continue
        reason = "not running" if state is not None else "not observed running"
        if s.enabled and state is not None and state.enabled is False:
            reason += ", not enabled at boot"
        out.append(Action(ActionKind.START_SERVICE, f"service {s.name}", s.domain, reason, target=s))
    return out


class ServicesKind(BaseKind):
    name = "services"
    shell = SHELL

    def wanted(self, desired: Desired) -> bool:
        return bool(desired.services)

    def probe(self, desired: Desired, b: ScriptBuilder) -> None:
        for i, s in enumerate(desired.services):
            if not s.running and s.pid_file:
                b.add(f"frame svc.{i} svc_gone {b.ref(s.pid_file)}")
            elif s.pid_file:
                b.add(f"frame svc.{i} svc_pid {b.ref(s.name)} {b.ref(s.pid_file)}")
            else:
                b.add(f"frame svc.{i} svc_probe {b.ref(s.name)} {b.refs(list(s.status))}".rstrip())

    def parse(self, desired: Desired, read: SectionReader, observed: Observed) -> Observed:
        services: dict[str, ServiceState] = {}
        for i, s in enumerate(desired.services):
            text = read(f"svc.{i}", f"service {s.name}")
            if text is not None:
                services[s.name] = parse_service(s.name, text)
        return replace(observed, services=MappingProxyType(services))

    def plan(self, step: PlanStep) -> Sequence[Action]:
        return plan_services(known_services(step.kept.services, step.observed, step.errors), step.observed)


KIND = ServicesKind()
