"""The apply's lock on the host itself: two reconcilers never change one host at once.

Replicas of a sharded daemon own disjoint hosts, but ownership moves (a replica added or lost, a
slow old replica still finishing its apply after a resharding) and an operator may run
``reconciler apply`` by hand. Whoever applies takes an exclusive ``flock`` on
``/run/reconciler/apply.lock`` ON THE HOST, held by a remote process for the whole apply: the
process prints ``LOCKED`` and waits on its stdin; the apply's end closes that stdin; a crashed
reconciler's dropped connection ends it too (sshd closes the session), and the host's
``timeout`` ends it after ``HOLD_LIMIT`` whatever happens. The kernel drops the lock with the
process: there is no stale lock file to clean.

Taken only when there is something to apply (the no-op path costs nothing); one more channel on
the host's already open connection. When another apply holds it, this apply changes nothing and
fails Transient (``host-locked``): the daemon retries with backoff and plans again from a fresh
observation, since the other apply may have changed the host.

/run is root's: the directory is created 0700, and refused when it is a link or not root's.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Protocol

from reconciler.errors import Reason, Terminal, Transient
from reconciler.log import get_logger

log = get_logger(__name__)

LOCK_DIR = "/run/reconciler"
LOCK_FILE = f"{LOCK_DIR}/apply.lock"
HOLD_LIMIT = 3600.0  # an apply longer than this loses its lock (the host ends the holder)
ANSWER_WITHIN = 30.0

# $1 lock dir, $2 lock file. Prints one line: LOCKED, BUSY <pid of a holder> or ERR <why>.
HOLD_SCRIPT = r"""
d=$1; f=$2
umask 077
[ -d "$d" ] || mkdir -m 700 -- "$d" 2>/dev/null || [ -d "$d" ] || { echo "ERR cannot create $d"; exit 1; }
if [ -L "$d" ] || [ ! -O "$d" ]; then echo "ERR $d is a link or not root's"; exit 1; fi
if [ -L "$f" ]; then echo "ERR $f is a link"; exit 1; fi
exec 9>>"$f" || { echo "ERR cannot open $f"; exit 1; }
if ! flock -n 9; then echo "BUSY"; exit 75; fi
echo LOCKED
exec cat >/dev/null
"""


class HostLocked(Transient):
    """Another apply holds the host's lock: nothing was changed; plan again later."""

    reason = Reason.HOST_LOCKED


class Holder(Protocol):
    def hold(
        self, argv: list[str], *, limit: float, first_line_within: float
    ) -> contextlib.AbstractAsyncContextManager[bytes]: ...


@contextlib.asynccontextmanager
async def host_lock(conn: Holder, host: str) -> AsyncIterator[None]:
    """Hold the host's apply lock for the ``async with`` block, or raise HostLocked."""
    argv = ["sh", "-c", HOLD_SCRIPT, "sh", LOCK_DIR, LOCK_FILE]
    async with conn.hold(argv, limit=HOLD_LIMIT, first_line_within=ANSWER_WITHIN) as first:
        answer = first.decode(errors="replace").strip()
        if answer == "BUSY":
            log.info("apply.host_locked", host=host)
            raise HostLocked(
                f"host {host}: another apply holds {LOCK_FILE}; nothing changed, planning again later"
            )
        if answer != "LOCKED":
            raise Terminal(
                f"host {host}: cannot take the apply lock: {answer or 'no answer'}", reason=Reason.REFUSED
            )
        yield
