"""The firewall dead-man switch: a new ruleset stays only if management SSH still works.

1. One round trip on the open connection: the new rules go to the host on stdin, are checked
   with ``iptables-restore --test``, the live rules are saved (``iptables-save``), a detached
   rollback is armed (``setsid -f sh -c 'sleep N; claim the flag && iptables-restore < saved'``,
   its PID recorded), then the new rules are loaded.
2. A NEW SSH connection (``ConnectionPool.fresh``) is opened; only through it is the rollback
   cancelled, by atomically renaming the flag file the rollback claims (``mv`` is atomic: either
   the confirmation or the rollback wins, never both) and killing the rollback's process group.
3. Only after that confirmation is the persistent file (``/etc/iptables/rules.v4``) written
   (staged dotfile + rename).

If no new connection can be made within the window, the host restores the old rules by itself
and the result says "firewall change rolled back: management SSH was cut".
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from reconciler.errors import ReconcilerError
from reconciler.log import get_logger
from reconciler.remote import Pool
from reconciler.resources import FirewallRuleset

log = get_logger(__name__)

STATE_DIR = "/var/lib/reconciler/firewall"
DEFAULT_WINDOW = 10.0  # seconds before the host restores the old rules (iptables-apply's default)


@dataclass(frozen=True)
class FirewallOutcome:
    ok: bool
    rolled_back: bool = False
    message: str = ""


# $1 token, $2 window seconds; stdin: the new ruleset. Exit 3: rules refused by --test.
ARM_AND_APPLY = r"""
set -u
d=/var/lib/reconciler/firewall
tok=$1; win=$2
mkdir -p "$d" && chmod 700 "$d" || exit 10
find "$d" -type f -mmin +120 -exec rm -f {} + 2>/dev/null
new="$d/new.$tok"; saved="$d/saved.$tok"; armed="$d/armed.$tok"; pidf="$d/pid.$tok"
umask 077
cat > "$new" || exit 10
if ! out=$(iptables-restore --test < "$new" 2>&1); then
  printf '%s\n' "$out" >&2; rm -f "$new"; exit 3
fi
iptables-save > "$saved" || { echo "iptables-save failed" >&2; exit 11; }
: > "$armed"
rollback='echo $$ > "$4"; sleep "$1"; if mv "$2" "$2.fired" 2>/dev/null; then iptables-restore < "$3"; fi'
if command -v setsid >/dev/null 2>&1; then
  setsid -f sh -c "$rollback" rollback "$win" "$armed" "$saved" "$pidf" </dev/null >/dev/null 2>&1 || exit 12
else
  nohup sh -c "$rollback" rollback "$win" "$armed" "$saved" "$pidf" </dev/null >/dev/null 2>&1 &
fi
i=0
while [ ! -s "$pidf" ] && [ $i -lt 50 ]; do sleep 0.02; i=$((i+1)); done
if ! out=$(iptables-restore < "$new" 2>&1); then
  printf '%s\n' "$out" >&2
  if mv "$armed" "$armed.cancelled" 2>/dev/null; then
    pid=$(cat "$pidf" 2>/dev/null); [ -n "$pid" ] && kill -- "-$pid" 2>/dev/null
  fi
  exit 4
fi
: > "$d/applied.$tok"
echo applied
"""

# $1 token, $2 persistent path. Run ONLY over a new connection.
CONFIRM = r"""
set -u
d=/var/lib/reconciler/firewall
tok=$1; persist=$2
armed="$d/armed.$tok"
if ! mv "$armed" "$d/confirmed.$tok" 2>/dev/null; then
  if [ -e "$armed.fired" ]; then echo "rolled-back"; else echo "no-such-change"; fi
  exit 5
fi
pid=$(cat "$d/pid.$tok" 2>/dev/null)
if [ -n "$pid" ]; then kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null; fi
if [ ! -e "$d/applied.$tok" ]; then
  rm -f "$d/new.$tok" "$d/saved.$tok" "$d/pid.$tok" "$d/confirmed.$tok"
  echo "not-applied"; exit 7
fi
dir=$(dirname "$persist"); base=$(basename "$persist")
mkdir -p "$dir" || exit 6
tmp="$dir/.$base.reconciler-$tok"
umask 077
cp "$d/new.$tok" "$tmp" && chmod 0640 "$tmp" && mv -f "$tmp" "$persist" || { rm -f "$tmp"; exit 6; }
rm -f "$d/new.$tok" "$d/saved.$tok" "$d/pid.$tok" "$d/confirmed.$tok" "$d/applied.$tok"
echo confirmed
"""

# $1 token: did the host restore the old rules by itself?
CHECK_FIRED = r"""
d=/var/lib/reconciler/firewall
if [ -e "$d/armed.$1.fired" ]; then echo fired; else echo not-fired; fi
"""


async def apply_firewall(
    pool: Pool,
    host: str,
    fw: FirewallRuleset,
    *,
    token: str,
    window: float = DEFAULT_WINDOW,
) -> FirewallOutcome:
    """Load ``fw`` into the host's netfilter under a dead-man switch; see the module doc."""
    started = time.monotonic()
    conn = await pool.get(host)
    arm_timeout = max(2.0, window * 0.5)
    try:
        res = await conn.run_script(
            ARM_AND_APPLY, args=(token, f"{window:g}"), stdin_after=fw.rules_v4.encode(), timeout=arm_timeout
        )
    except ReconcilerError as err:
        # The new rules may have cut the connection before the answer came back; the
        # confirmation over a new connection below decides.
        log.warning("firewall.arm_no_answer", host=host, error=str(err))
        res = None
    if res is not None and res.exit_status != 0:
        detail = (res.stderr or res.stdout).decode(errors="replace").strip()
        if res.exit_status == 3:
            return FirewallOutcome(False, False, f"ruleset refused by iptables-restore --test: {detail}")
        return FirewallOutcome(False, False, f"firewall not changed (exit {res.exit_status}): {detail}")

    remaining = window - (time.monotonic() - started) - 1.0
    try:
        fresh = await asyncio.wait_for(pool.fresh(host), timeout=max(1.0, remaining))
    except (ReconcilerError, TimeoutError, OSError) as err:
        log.warning("firewall.confirm_connect_failed", host=host, error=str(err))
        return await _rolled_back(pool, host, token, started, window)
    try:
        conf = await fresh.run_script(CONFIRM, args=(token, fw.persistent_path), timeout=max(2.0, remaining))
    except ReconcilerError as err:
        log.warning("firewall.confirm_failed", host=host, error=str(err))
        return await _rolled_back(pool, host, token, started, window)
    finally:
        await fresh.close()
    out = conf.stdout.decode(errors="replace").strip()
    if conf.exit_status == 0 and out.endswith("confirmed"):
        return FirewallOutcome(
            True, False, "firewall ruleset applied and confirmed over a new SSH connection"
        )
    if "rolled-back" in out:
        return FirewallOutcome(
            False, True, "firewall change rolled back: the confirmation came after the dead-man window"
        )
    if "not-applied" in out:
        return FirewallOutcome(False, False, "firewall not changed: the new rules were never loaded")
    detail = (conf.stderr or conf.stdout).decode(errors="replace").strip()
    return FirewallOutcome(False, False, f"firewall confirmation failed (exit {conf.exit_status}): {detail}")


async def _rolled_back(pool: Pool, host: str, token: str, started: float, window: float) -> FirewallOutcome:
    """Wait until the host's rollback must have fired, then check it did (best effort)."""
    wait = window - (time.monotonic() - started) + 2.0
    if wait > 0:
        await asyncio.sleep(wait)
    msg = "firewall change rolled back: management SSH was cut"
    try:
        again = await asyncio.wait_for(pool.fresh(host), timeout=window)
        try:
            res = await again.run_script(CHECK_FIRED, args=(token,), timeout=10)
        finally:
            await again.close()
        if b"not-fired" in res.stdout:
            msg += " (but the rollback flag was not claimed: check the host's rules by hand)"
        else:
            msg += " (old rules restored by the host; SSH works again)"
    except (ReconcilerError, TimeoutError, OSError) as err:
        msg += f" (host still unreachable after the rollback window: {err})"
    return FirewallOutcome(False, True, msg)
