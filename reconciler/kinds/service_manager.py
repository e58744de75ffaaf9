"""Services on a host: enable, start (with the service's own status probe) and stop, under
systemd or init scripts. Used by the engine's services and reloads phases
(``reconciler.engine.reloads``). Service names travel as argv elements or positional arguments,
never inside script text."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

from reconciler.host.script import Runner, prelude, result_text, run_framed, said
from reconciler.kinds.packaging import LOG_TAIL
from reconciler.kinds.resources import Service
from reconciler.log import get_logger

log = get_logger(__name__)

SERVICE_TIMEOUT = 60.0
_SERVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$")


def check_service_name(name: str) -> str:
    if not _SERVICE_NAME.match(name):
        raise ValueError(f"not a service name: {name!r}")
    return name


# says NOINIT, ALREADY, ENABLED or FAILED <update-rc.d's output>
SYSV_ENABLE = (
    prelude()
    + r"""
set -u
n=$1
[ -f "/etc/init.d/$n" ] || { say NOINIT; exit 0; }
for f in /etc/rc2.d/S*"$n" /etc/rc3.d/S*"$n" /etc/rc4.d/S*"$n" /etc/rc5.d/S*"$n"; do
  case ${f##*/} in S[0-9][0-9]"$n") [ -e "$f" ] && { say ALREADY; exit 0; } ;; esac
done
if out=$(update-rc.d "$n" defaults 2>&1); then say ENABLED; else say FAILED "$out"; fi
"""
)

WAIT_STATUS = r"""
i=0
while ! "$@" >/dev/null 2>&1; do
  i=$((i+1)); [ $i -ge 40 ] && exit 1; sleep 0.25
done
"""

# the verdict is the exit status; a unit that is not active says its state
WAIT_ACTIVE = (
    prelude()
    + r"""
i=0
while :; do
  s=$(systemctl is-active -- "$1" 2>/dev/null)
  case $s in active) exit 0 ;; activating|reloading) ;; *) say "$s"; exit 1 ;; esac
  i=$((i+1)); [ $i -ge 40 ] && { say "$s"; exit 1; }; sleep 0.25
done
"""
)


@dataclass(frozen=True)
class ServiceRun:
    ok: bool
    message: str = ""


def _tail(text: str, lines: int = LOG_TAIL) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


async def enable_service(conn: Runner, s: Service, init_system: str) -> ServiceRun:
    """Make the service start at boot: ``systemctl enable`` or ``update-rc.d NAME defaults``
    (when an init script exists; a daemon without one has nothing to enable)."""
    name = check_service_name(s.name)
    if init_system == "systemd":
        res = await conn.run(["systemctl", "enable", "--", name], timeout=SERVICE_TIMEOUT)
        if res.exit_status != 0:
            return ServiceRun(False, f"systemctl enable {name} failed: {_tail(result_text(res))}")
        return ServiceRun(True, f"enabled {name} (systemd)")
    framed = await run_framed(conn, SYSV_ENABLE, (name,), timeout=SERVICE_TIMEOUT)
    verdict, _, out = (said(framed.sections) or [""])[-1].partition(" ")
    if verdict == "NOINIT":
        return ServiceRun(True, f"{name} has no init script: started by its own control command")
    if verdict == "ALREADY":
        return ServiceRun(True, f"{name} already enabled in the runlevels")
    if verdict == "ENABLED":
        return ServiceRun(True, f"enabled {name} (update-rc.d {name} defaults)")
    detail = out if verdict == "FAILED" else result_text(framed.result)
    return ServiceRun(False, f"update-rc.d {name} defaults failed: {_tail(detail)}")


async def start_service(conn: Runner, s: Service, init_system: str) -> ServiceRun:
    """Enable (when wanted) and start a service, then check it runs. On failure the message
    holds the start command's output and the last lines of the service's log (journalctl on
    systemd, ``Service.log_path`` otherwise)."""
    name = check_service_name(s.name)
    if init_system == "systemd":
        argv = (
            ["systemctl", "enable", "--now", "--", name] if s.enabled else ["systemctl", "start", "--", name]
        )
        res = await conn.run(argv, timeout=SERVICE_TIMEOUT)
        probe = await run_framed(conn, WAIT_ACTIVE, (name,), timeout=SERVICE_TIMEOUT)
        if res.exit_status == 0 and probe.result.exit_status == 0:
            if s.post_start:
                post = await conn.run(list(s.post_start), timeout=SERVICE_TIMEOUT)
                if post.exit_status != 0:
                    return ServiceRun(
                        False,
                        f"{name} is active but its post-start step failed "
                        f"({shlex.join(s.post_start)}: exit {post.exit_status})\n{_tail(result_text(post))}",
                    )
            return ServiceRun(True, f"{' '.join(argv[:3])} {name}: active")
        journal = await conn.run(
            ["journalctl", "-u", name, "-n", "20", "--no-pager", "-o", "short"], timeout=30
        )
        state = " ".join(said(probe.sections)).strip() or "not active"
        msg = f"{name} failed to start ({' '.join(argv)}: exit {res.exit_status}; is-active: {state})"
        if result_text(res):
            msg += f"\n{_tail(result_text(res))}"
        msg += f"\njournalctl -u {name} -n 20:\n{_tail(journal.stdout.decode(errors='replace'), 20)}"
        return ServiceRun(False, msg)

    notes: list[str] = []
    if s.status:
        pre = await conn.run(list(s.status), timeout=30)
        if pre.exit_status == 0:
            notes.append("already running (started by its package)")
    if s.enabled:
        en = await enable_service(conn, s, init_system)
        if not en.ok:
            return en
        if "enabled" in en.message and "already" not in en.message:
            notes.append(en.message)
    if notes and notes[0].startswith("already running"):
        return ServiceRun(True, "; ".join(notes))
    start = list(s.start) if s.start else ["service", name, "start"]
    res = await conn.run(start, timeout=SERVICE_TIMEOUT)
    if res.exit_status == 0 and s.status:
        waited = await conn.run_script(WAIT_STATUS, args=tuple(s.status), timeout=SERVICE_TIMEOUT)
        if waited.exit_status == 0:
            return ServiceRun(True, "; ".join([*notes, f"started ({shlex.join(start)})"]))
        why = f"{name} started ({shlex.join(start)} exit 0) but its status probe still fails"
    elif res.exit_status == 0:
        return ServiceRun(True, "; ".join([*notes, f"started ({shlex.join(start)})"]))
    else:
        why = f"{name} failed to start ({shlex.join(start)}: exit {res.exit_status})"
    msg = why
    if result_text(res):
        msg += f"\n{_tail(result_text(res))}"
    if s.log_path:
        tail = await conn.run(["tail", "-n", "20", "--", s.log_path], timeout=30)
        body = tail.stdout.decode(errors="replace").strip() or "(empty or missing)"
        msg += f"\nlast lines of {s.log_path}:\n{body}"
    return ServiceRun(False, msg)


async def stop_service(conn: Runner, s: Service, init_system: str) -> ServiceRun:
    """Stop a service this host no longer runs (the old IPsec stack): ``systemctl disable
    --now`` under systemd (a unit that does not exist is fine), then ``Service.stop``; stopped
    means its status probe fails afterwards."""
    name = check_service_name(s.name)
    notes: list[str] = []
    if init_system == "systemd":
        res = await conn.run(["systemctl", "disable", "--now", "--", name], timeout=SERVICE_TIMEOUT)
        notes.append(f"systemctl disable --now {name}: exit {res.exit_status}")
    if s.stop:
        res = await conn.run(list(s.stop), timeout=SERVICE_TIMEOUT)
        notes.append(f"stopped ({shlex.join(s.stop)}: exit {res.exit_status})")
    if s.status:
        probe = await conn.run(list(s.status), timeout=30)
        if probe.exit_status == 0:
            return ServiceRun(False, f"{name} still runs after the stop; " + "; ".join(notes))
    return ServiceRun(True, "; ".join(notes) or f"{name} stopped")
