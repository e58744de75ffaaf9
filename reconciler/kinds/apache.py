"""Kind ``apache``: the reload and start proofs of an Apache handler.

``apache2ctl graceful`` returning 0 proves nothing about the new configuration (see below); the
engine's reload step (``reconciler.engine.apply``) asks the registry for the handler's probe
(``reconciler.kinds.registry.probe_for``) and runs this one for a handler that reloads with
``apache2ctl graceful``: after a reload, a new worker generation under the same live master;
after a start, a live master with workers that survives a second. The scripts are our own
code; the pid file, the wait and the reload argv reach them as positional arguments.
"""

from __future__ import annotations

import posixpath
import shlex
from collections.abc import Sequence

from reconciler.host.script import Framed, Runner, prelude, run_framed, said
from reconciler.kinds.resources import Handler

PROBE_WAIT = 15.0  # seconds a post-reload probe waits for the new configuration to be live


# Apache: ``apache2ctl graceful`` returns 0 once it has SIGNALLED the master; the master then
# re-reads the configuration and replaces its children with a new generation. If the master
# cannot take the new configuration (a failure -t cannot see: a port it cannot bind, a file
# that vanished, a module that fails at init) it exits, or keeps the old generation serving.
# So after the command: the master of the pid file must still be alive (same PID) and at least
# one child it started AFTER the reload must exist. The children are read from
# /proc/PID/task/PID/children (or /proc/*/stat when the kernel lacks it).
_APACHE_PROCS = r"""
kids() {
  if [ -r "/proc/$1/task/$1/children" ]; then k=; read -r k < "/proc/$1/task/$1/children"; echo $k
  else
    for f in /proc/[0-9]*/stat; do
      read -r p c s pp rest < "$f" 2>/dev/null && [ "$pp" = "$1" ] && echo "$p"
    done
  fi
}
alive() {
  st=; read -r _p _c st _r < "/proc/$1/stat" 2>/dev/null
  kill -0 "$1" 2>/dev/null && [ -n "$st" ] && [ "$st" != Z ]
}
"""
# $1 pid file, $2 seconds to wait, then the reload argv. The reload's output is section
# "reload"; the verdict is the exit status (0, the reload's own, 71 died, 72 no new generation),
# said as "PROBE why" or "FAIL why".
APACHE_GRACEFUL = (
    prelude()
    + "set -u\n"
    + _APACHE_PROCS
    + r"""
pidfile=$1; wait=$2; shift 2
read -r master < "$pidfile" 2>/dev/null || master=
before=" $( [ -n "$master" ] && kids "$master" | tr '\n' ' ') "
out=$("$@" 2>&1); rc=$?
frame reload printf '%s\n' "$out"
[ $rc -eq 0 ] || exit $rc
[ -n "$master" ] || { say PROBE no pid file "$pidfile" before the reload; exit 0; }
i=0; max=$(( wait * 10 ))
while [ $i -lt $max ]; do
  if ! alive "$master"; then
    say FAIL "the master (pid $master) died after the reload"; exit 71
  fi
  for k in $(kids "$master"); do
    case $before in
      *" $k "*) ;;
      *)
        # a new child may also be idle-server maintenance racing the signal: the master must
        # still be alive a moment later (a config it cannot take kills it within milliseconds)
        j=0
        while [ $j -lt 10 ]; do
          sleep 0.1; j=$((j+1))
          if ! alive "$master"; then
            say FAIL "the master (pid $master) died after the reload"; exit 71
          fi
        done
        say PROBE "new worker generation (pid $k) under master $master"; exit 0;;
    esac
  done
  sleep 0.1; i=$((i+1))
done
say FAIL "no new worker generation under master $master within ${wait}s:" \
  "the old configuration keeps serving"
exit 72
"""
)
# After a START: the master of the pid file is alive with at least one child (a serving
# generation), and still alive a second later (a config it cannot take kills it at once).
# $1 pid file, $2 seconds to wait; says "PROBE why" (exit 0) or "FAIL why" (exit 72).
APACHE_SERVING = (
    prelude()
    + "set -u\n"
    + _APACHE_PROCS
    + r"""
pidfile=$1; wait=$2
i=0; max=$(( wait * 10 ))
while [ $i -lt $max ]; do
  master=; read -r master < "$pidfile" 2>/dev/null
  if [ -n "$master" ] && alive "$master" && [ -n "$(kids "$master")" ]; then
    sleep 1
    if alive "$master" && [ -n "$(kids "$master")" ]; then
      say PROBE "master $master serving with worker(s) $(kids "$master" | tr '\n' ' ')"; exit 0
    fi
  fi
  sleep 0.1; i=$((i+1))
done
say FAIL "no live master with workers from $pidfile within ${wait}s"
exit 72
"""
)
APACHE_PID_FILE = "/var/run/apache2/apache2.pid"


def is_graceful(argv: Sequence[str]) -> bool:
    return bool(argv) and posixpath.basename(argv[0]) == "apache2ctl" and "graceful" in argv[1:]


def probe_verdict(framed: Framed, argv: Sequence[str] = ()) -> tuple[bool, str]:
    """What a framed APACHE_GRACEFUL (``argv``: its reload) or APACHE_SERVING run proved: only
    the exit status decides; the message is what the script said (the reload's own output
    cannot forge it)."""
    rc = framed.result.exit_status
    lines = said(framed.sections)
    fail = next((line[5:] for line in lines if line.startswith("FAIL ")), "")
    reload = framed.sections.get("reload")
    text = "\n".join(
        t
        for t in (
            framed.stderr_text(),
            reload.text.strip() if reload is not None else "",
            *(f"probe: {line[6:]}" for line in lines if line.startswith("PROBE ")),
        )
        if t
    )
    if not framed.started:
        raw = (framed.result.stderr + framed.result.stdout).decode(errors="replace").strip()
        return False, f"the probe did not start (exit {rc}): {raw[-2000:]}"
    if rc in (71, 72):
        detail = fail or text[-2000:]
        return False, f"{shlex.join(argv)} returned 0, but {detail}" if argv else detail
    return rc == 0, text[-2000:]


class ApacheProbe:
    name = "apache"

    def handles(self, h: Handler) -> bool:
        return is_graceful(h.reload)

    async def reload_proven(self, conn: Runner, argv: Sequence[str], *, timeout: float) -> tuple[bool, str]:
        """Run the reload, then wait for a new worker generation under the same live master."""
        framed = await run_framed(
            conn, APACHE_GRACEFUL, (APACHE_PID_FILE, f"{PROBE_WAIT:g}", *argv), timeout=timeout + PROBE_WAIT
        )
        return probe_verdict(framed, argv)

    async def prove_started(self, conn: Runner, *, timeout: float) -> tuple[bool, str]:
        """After a start: a live master with a serving worker generation that survives a second."""
        framed = await run_framed(
            conn, APACHE_SERVING, (APACHE_PID_FILE, f"{PROBE_WAIT:g}"), timeout=timeout + PROBE_WAIT
        )
        return probe_verdict(framed)


PROBE = ApacheProbe()
