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

from reconciler.host.script import Runner
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
# $1 pid file, $2 seconds to wait, then the reload argv.
APACHE_GRACEFUL = (
    "set -u\n"
    + _APACHE_PROCS
    + r"""
pidfile=$1; wait=$2; shift 2
read -r master < "$pidfile" 2>/dev/null || master=
before=" $( [ -n "$master" ] && kids "$master" | tr '\n' ' ') "
out=$("$@" 2>&1); rc=$?
printf '%s\n' "$out"
[ $rc -eq 0 ] || exit $rc
[ -n "$master" ] || { echo "@@PROBE no pid file $pidfile before the reload"; exit 0; }
i=0; max=$(( wait * 10 ))
while [ $i -lt $max ]; do
  if ! alive "$master"; then
    echo "@@PROBE-FAIL the master (pid $master) died after the reload"; exit 71
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
            echo "@@PROBE-FAIL the master (pid $master) died after the reload"; exit 71
          fi
        done
        echo "@@PROBE new worker generation (pid $k) under master $master"; exit 0;;
    esac
  done
  sleep 0.1; i=$((i+1))
done
echo "@@PROBE-FAIL no new worker generation under master $master within ${wait}s:" \
  "the old configuration keeps serving"
exit 72
"""
)
# After a START: the master of the pid file is alive with at least one child (a serving
# generation), and still alive a second later (a config it cannot take kills it at once).
# $1 pid file, $2 seconds to wait.
APACHE_SERVING = (
    "set -u\n"
    + _APACHE_PROCS
    + r"""
pidfile=$1; wait=$2
i=0; max=$(( wait * 10 ))
while [ $i -lt $max ]; do
  master=; read -r master < "$pidfile" 2>/dev/null
  if [ -n "$master" ] && alive "$master" && [ -n "$(kids "$master")" ]; then
    sleep 1
    if alive "$master" && [ -n "$(kids "$master")" ]; then
      echo "@@PROBE master $master serving with worker(s) $(kids "$master" | tr '\n' ' ')"; exit 0
    fi
  fi
  sleep 0.1; i=$((i+1))
done
echo "@@PROBE-FAIL no live master with workers from $pidfile within ${wait}s"
exit 72
"""
)
APACHE_PID_FILE = "/var/run/apache2/apache2.pid"


def is_graceful(argv: Sequence[str]) -> bool:
    return bool(argv) and posixpath.basename(argv[0]) == "apache2ctl" and "graceful" in argv[1:]


def _text(stdout: bytes, stderr: bytes) -> str:
    return (stderr + stdout).decode(errors="replace").strip()[-2000:]


class ApacheProbe:
    name = "apache"

    def handles(self, h: Handler) -> bool:
        return is_graceful(h.reload)

    async def reload_proven(self, conn: Runner, argv: Sequence[str], *, timeout: float) -> tuple[bool, str]:
        """Run the reload, then wait for a new worker generation under the same live master."""
        res = await conn.run_script(
            APACHE_GRACEFUL, args=(APACHE_PID_FILE, f"{PROBE_WAIT:g}", *argv), timeout=timeout + PROBE_WAIT
        )
        text = _text(res.stdout, res.stderr)
        if res.exit_status in (71, 72):
            detail = text.split("@@PROBE-FAIL", 1)[-1].strip()
            return False, f"{shlex.join(argv)} returned 0, but {detail}"
        return res.exit_status == 0, text.replace("@@PROBE ", "probe: ")

    async def prove_started(self, conn: Runner, *, timeout: float) -> tuple[bool, str]:
        """After a start: a live master with a serving worker generation that survives a second."""
        res = await conn.run_script(
            APACHE_SERVING, args=(APACHE_PID_FILE, f"{PROBE_WAIT:g}"), timeout=timeout + PROBE_WAIT
        )
        text = _text(res.stdout, res.stderr)
        if res.exit_status != 0:
            return False, text.split("@@PROBE-FAIL", 1)[-1].strip()
        return True, text.replace("@@PROBE ", "probe: ")


PROBE = ApacheProbe()
