"""The firewall dead-man switch: a new ruleset stays only if management SSH still works.

IPv4 (``iptables``) and, when the Desired manages it, IPv6 (``ip6tables``) change together:
both are tested, saved, loaded, rolled back and confirmed as one.

1. One round trip on the open connection: the new rules go to the host on stdin (IPv4, then
   IPv6; the script splits them by the IPv4 length), are checked with ``iptables-restore
   --test`` / ``ip6tables-restore --test``, the live rules are saved (``iptables-save``,
   ``ip6tables-save``), a detached rollback is armed (``setsid -f sh -c 'sleep N; claim the
   flag && restore both saved rulesets'``, its PID recorded), then the new rules are loaded
   (IPv4, then IPv6; if IPv6 fails to load, IPv4 is put back and the rollback cancelled).
2. A NEW SSH connection (``ConnectionPool.fresh``) is opened; only through it is the rollback
   cancelled, by atomically renaming the flag file the rollback claims (``mv`` is atomic: either
   the confirmation or the rollback wins, never both) and killing the rollback's process group.
3. Only after that confirmation are the persistent files (``/etc/iptables/rules.v4``,
   ``rules.v6``) written (staged dotfile + rename). If that fails (e.g. /etc read-only), the
   live rules stay (they are confirmed), and the outcome is a failure naming the file and the
   error: a reboot would load the old file.

If no new connection can be made within the window, the host restores the old rules by itself
and the result says "firewall change rolled back: management SSH was cut".
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from reconciler.errors import ReconcilerError
from reconciler.host.script import Pool, prelude, run_framed, said
from reconciler.host.state import FIREWALL_STATE_DIR
from reconciler.kinds.resources import FirewallRuleset
from reconciler.log import get_logger

log = get_logger(__name__)

STATE_DIR = FIREWALL_STATE_DIR
DEFAULT_WINDOW = 10.0  # seconds before the host restores the old rules (iptables-apply's default)


@dataclass(frozen=True)
class FirewallOutcome:
    ok: bool
    rolled_back: bool = False
    message: str = ""
    # the new rules are live and were confirmed over a new SSH connection (also when writing
    # the persistent files failed afterwards: ``persist_error`` says why)
    live_confirmed: bool = False
    persist_error: str = ""
    refused: bool = False  # the host's iptables-restore --test refused the rules (retrying cannot help)


# $1 token, $2 window seconds, $3 bytes of IPv4 rules on stdin, $4 "1" when IPv6 rules follow
# them. Exit 3: rules refused by --test; 4: a load failed (nothing changed).
ARM_AND_APPLY = (
    prelude(keep_stdin=True)
    + r"""
set -u
d=/var/lib/reconciler/firewall
tok=$1; win=$2; n4=$3; has6=$4
mkdir -p "$d" && chmod 700 "$d" || exit 10
find "$d" -type f -mmin +120 -exec rm -f {} + 2>/dev/null
new="$d/new.$tok"; new6="$d/new6.$tok"; saved="$d/saved.$tok"; saved6="$d/saved6.$tok"
armed="$d/armed.$tok"; pidf="$d/pid.$tok"
umask 077
cat > "$d/in.$tok" || exit 10
head -c "$n4" "$d/in.$tok" > "$new" || exit 10
if [ "$has6" = 1 ]; then tail -c +"$((n4 + 1))" "$d/in.$tok" > "$new6" || exit 10; else saved6=; fi
rm -f "$d/in.$tok"
if ! out=$(iptables-restore --test < "$new" 2>&1); then
  printf 'iptables-restore --test: %s\n' "$out" >&2; rm -f "$new" "$new6"; exit 3
fi
if [ -n "$saved6" ] && ! out=$(ip6tables-restore --test < "$new6" 2>&1); then
  printf 'ip6tables-restore --test: %s\n' "$out" >&2; rm -f "$new" "$new6"; exit 3
fi
iptables-save > "$saved" || { echo "iptables-save failed" >&2; exit 11; }
if [ -n "$saved6" ]; then ip6tables-save > "$saved6" || { echo "ip6tables-save failed" >&2; exit 11; }; fi
: > "$armed"
rollback='echo $$ > "$4"; sleep "$1"
if mv "$2" "$2.fired" 2>/dev/null; then
  iptables-restore < "$3"; if [ -n "$5" ]; then ip6tables-restore < "$5"; fi
fi'
set -- "$win" "$armed" "$saved" "$pidf" "$saved6"
if command -v setsid >/dev/null 2>&1; then
  setsid -f sh -c "$rollback" rollback "$@" </dev/null >/dev/null 2>&1 || exit 12
else
  nohup sh -c "$rollback" rollback "$@" </dev/null >/dev/null 2>&1 &
fi
i=0
while [ ! -s "$pidf" ] && [ $i -lt 50 ]; do sleep 0.02; i=$((i+1)); done
cancel() {
  mv "$armed" "$armed.cancelled" 2>/dev/null || return 1
  pid=$(cat "$pidf" 2>/dev/null); [ -n "$pid" ] && kill -- "-$pid" 2>/dev/null
  return 0
}
if ! out=$(iptables-restore < "$new" 2>&1); then
  printf 'iptables-restore: %s\n' "$out" >&2; cancel; exit 4
fi
if [ -n "$saved6" ] && ! out=$(ip6tables-restore < "$new6" 2>&1); then
  printf 'ip6tables-restore: %s\n' "$out" >&2
  if cancel; then iptables-restore < "$saved"; fi  # both or neither
  exit 4
fi
: > "$d/applied.$tok"
say applied
"""
)

# $1 token, $2 IPv4 persistent path, $3 IPv6 persistent path ("" without IPv6). Run ONLY over
# a new connection. Exit 6 (after "live-confirmed"): a persistent file did not write.
CONFIRM = (
    prelude()
    + r"""
set -u
d=/var/lib/reconciler/firewall
tok=$1; persist=$2; persist6=$3
armed="$d/armed.$tok"
if ! mv "$armed" "$d/confirmed.$tok" 2>/dev/null; then
  if [ -e "$armed.fired" ]; then say rolled-back; else say no-such-change; fi
  exit 5
fi
pid=$(cat "$d/pid.$tok" 2>/dev/null)
if [ -n "$pid" ]; then kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null; fi
clean() {
  for f in new new6 saved saved6 pid confirmed applied; do rm -f "$d/$f.$tok"; done
}
if [ ! -e "$d/applied.$tok" ]; then
  clean; say not-applied; exit 7
fi
say live-confirmed
umask 077
persist() {
  dir=$(dirname "$2"); base=$(basename "$2"); tmp="$dir/.$base.reconciler-$tok"
  if mkdir -p "$dir" && cp "$1" "$tmp" && chmod 0640 "$tmp" && mv -f "$tmp" "$2"; then return 0; fi
  rm -f "$tmp" 2>/dev/null; return 1
}
failed=
persist "$d/new.$tok" "$persist" || failed=$persist
if [ -n "$persist6" ]; then persist "$d/new6.$tok" "$persist6" || failed="${failed:+$failed }$persist6"; fi
clean
if [ -n "$failed" ]; then say persist-failed "$failed"; exit 6; fi
say confirmed
"""
)

# $1 token: did the host restore the old rules by itself?
CHECK_FIRED = (
    prelude()
    + r"""
d=/var/lib/reconciler/firewall
if [ -e "$d/armed.$1.fired" ]; then say fired; else say not-fired; fi
"""
)


def _why(err: BaseException) -> str:
    """An error's text for a log line or message (never empty)."""
    return str(err) or type(err).__name__


async def apply_firewall(
    pool: Pool,
    host: str,
    fw: FirewallRuleset,
    *,
    token: str,
    window: float = DEFAULT_WINDOW,
) -> FirewallOutcome:
    """Load ``fw`` (IPv4 and, if given, IPv6) into the host's netfilter under a dead-man
    switch; see the module doc."""
    started = time.monotonic()
    conn = await pool.get(host)
    arm_timeout = max(2.0, window * 0.5)
    rules_v4 = fw.rules_v4.encode()
    rules_v6 = fw.rules_v6.encode() if fw.rules_v6 is not None else b""
    has6 = "1" if fw.rules_v6 is not None else "0"
    try:
        armed = await run_framed(
            conn,
            ARM_AND_APPLY,
            (token, f"{window:g}", str(len(rules_v4)), has6),
            stdin_after=rules_v4 + rules_v6,
            timeout=arm_timeout,
        )
    except ReconcilerError as err:
        # The new rules may have cut the connection before the answer came back; the
        # confirmation over a new connection below decides.
        log.warning("firewall.arm_no_answer", host=host, error=_why(err))
        armed = None
    if armed is not None and armed.result.exit_status != 0:
        status = armed.result.exit_status
        detail = armed.stderr_text().strip() or "\n".join(said(armed.sections))
        if status == 3:
            return FirewallOutcome(False, False, f"ruleset refused by {detail}", refused=True)
        return FirewallOutcome(False, False, f"firewall not changed (exit {status}): {detail}")

    remaining = window - (time.monotonic() - started) - 1.0
    try:
        fresh = await asyncio.wait_for(pool.fresh(host), timeout=max(1.0, remaining))
    except (ReconcilerError, TimeoutError, OSError) as err:
        log.warning("firewall.confirm_connect_failed", host=host, error=_why(err))
        return await _rolled_back(pool, host, token, started, window)
    persist6 = fw.persistent_path_v6 if fw.rules_v6 is not None else ""
    try:
        conf = await run_framed(
            fresh, CONFIRM, (token, fw.persistent_path, persist6), timeout=max(2.0, remaining)
        )
    except ReconcilerError as err:
        log.warning("firewall.confirm_failed", host=host, error=_why(err))
        return await _rolled_back(pool, host, token, started, window)
    finally:
        await fresh.close()
    return _confirm_outcome(host, conf.result.exit_status, "\n".join(said(conf.sections)), conf.stderr_text())


def _confirm_outcome(host: str, status: int, out: str, err: str) -> FirewallOutcome:
    """The outcome of the CONFIRM script (its exit status, the lines it said, its stderr)."""
    lines = out.splitlines()
    if status == 0 and lines and lines[-1] == "confirmed":
        return FirewallOutcome(
            True,
            False,
            "firewall ruleset applied and confirmed over a new SSH connection",
            live_confirmed=True,
        )
    if "live-confirmed" in lines:
        files = next((ln.split(" ", 1)[1] for ln in lines if ln.startswith("persist-failed ")), "")
        cause = err or f"exit {status}"
        log.error("firewall.persist_failed", host=host, files=files, error=cause)
        return FirewallOutcome(
            False,
            False,
            f"firewall ruleset applied and confirmed over a new SSH connection, but the persistent "
            f"file {files or '(unknown)'} could not be written: {cause}; the live rules are right, "
            "a reboot would load the old file",
            live_confirmed=True,
            persist_error=cause,
        )
    if "rolled-back" in lines:
        return FirewallOutcome(
            False, True, "firewall change rolled back: the confirmation came after the dead-man window"
        )
    if "not-applied" in lines:
        return FirewallOutcome(False, False, "firewall not changed: the new rules were never loaded")
    detail = err or out or "no output"
    log.warning("firewall.confirm_failed", host=host, error=f"exit {status}: {detail}")
    return FirewallOutcome(False, False, f"firewall confirmation failed (exit {status}): {detail}")


async def _rolled_back(pool: Pool, host: str, token: str, started: float, window: float) -> FirewallOutcome:
    """Wait until the host's rollback must have fired, then check it did (best effort)."""
    wait = window - (time.monotonic() - started) + 2.0
    if wait > 0:
        await asyncio.sleep(wait)
    msg = "firewall change rolled back: management SSH was cut"
    try:
        again = await asyncio.wait_for(pool.fresh(host), timeout=window)
        try:
            fired = await run_framed(again, CHECK_FIRED, (token,), timeout=10)
        finally:
            await again.close()
        if said(fired.sections) == ["not-fired"]:
            msg += " (but the rollback flag was not claimed: check the host's rules by hand)"
        else:
            msg += " (old rules restored by the host; SSH works again)"
    except (ReconcilerError, TimeoutError, OSError) as err:
        msg += f" (host still unreachable after the rollback window: {_why(err)})"
    return FirewallOutcome(False, True, msg)
