"""Observe a host in one round trip: one generated POSIX sh script, framed output, typed parse.

The script is assembled here from the registered kinds' probes (``reconciler.kinds.registry``:
each kind's shell functions, its lines for the sections it needs, its parser); this module adds
the host's own records (inventory, pending reloads, identity, init system), runs the script
once per host, hands each kind its sections and fetches diff contents in a second round trip.

The script is our own code; every value from the fleet (paths, package and service names,
status commands) travels as a positional argument referenced by number (``"${7}"``), see
``reconciler.host.script``. The script runs no mutating command: find, sha256sum,
iptables-save, ip ... show, swanctl --list-*, dpkg-query (the declared packages and every
package a resource needs), service status probes (``systemctl is-active/is-enabled`` where PID 1
is systemd, else the service's status command and its init script's runlevel links), /proc and
/sys reads, modinfo.

Lean by construction (every forked process costs: all lab hosts share 2 CPUs): only the
sections the Desired needs run (iptables-save only with a firewall, ``ip addr``/kernel facts only
with tunnels or addresses, charon/swanctl/xfrm only with an IPsec handler, dpkg-query only with
packages); ONE ``find -printf`` stats every declared path and the directories above them (kind,
mode, owner, group, link target, uid: ``reconciler.host.pathsafe.refusal`` judges the directories),
ONE ``sha256sum -z`` hashes every regular file whose directories pass shell-builtin checks, ONE
``find`` lists the owned directories; the inventory is read with the shell's ``read`` builtin.
A no-op observation of a host with only files forks 2 processes besides its ``sh``. Paths under
a directory a user controls (``controlled_dir``) are read only by the path-safety helper (one
``perl``, and ``sha256sum`` on the files it opened), never through a link.

Output framing (stdout), one section per probe, raw bytes (no encoding)::

    \n@@<nonce><<id>\n<the probe's stdout>\n@@<nonce>><id> <exit status>\n

The nonce (128 random bits, new for every run) reaches the script on stdin, never in argv (which
other users of the host can read in /proc), so a file name or command output cannot forge a
marker. On stderr each probe's messages follow a ``@@<nonce><<id>`` line. File records are
NUL-separated fields (``find -printf``, ``sha256sum -z``): any byte but NUL in a name is safe.

Secrets: file records carry kind, mode, owner, group, sha256 and link target, never content.
Key-pair private keys are not even hashed. A second round trip (only when something differs)
fetches the content of non-secret declared files whose hash differs, for diffs.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import replace
from types import MappingProxyType

from reconciler.engine.identity import IDENTITY_PATH, MAX_LINES, SeenIdentity, parse_section
from reconciler.errors import Reason, Transient
from reconciler.host.pathsafe import HELPER, PERL, STRICT, Batch, Rule, all_ancestors
from reconciler.host.script import Framed, Runner, ScriptBuilder, Section, prelude, run_framed
from reconciler.host.state import INVENTORY_PATH, PENDING_RELOADS_PATH
from reconciler.kinds.files import absolute, probe_for
from reconciler.kinds.filestate import file_states, judged, parse_find_records
from reconciler.kinds.kind import first_error
from reconciler.kinds.observed import FileState, Observed
from reconciler.kinds.registry import FILES, KINDS
from reconciler.kinds.resources import Desired
from reconciler.log import get_logger

log = get_logger(__name__)

CONTENT_LIMIT = 4 * 1024 * 1024  # larger files are compared by hash only (no diff)

# the host's own records: never follows a link, reads with builtins only
HOST_SHELL = r"""inv_cat() {
  [ -f "$1" ] || return 0
  while IFS= read -r l || [ -n "$l" ]; do printf '%s\n' "$l"; done < "$1"
}
# the host identity (reconciler.engine.identity): never follows a link, reads with builtins only
ident() {
  _d=${1%/*}
  if [ -L "$_d" ]; then echo 'state dirlink'; return 0; fi
  if [ ! -e "$_d" ]; then echo 'state absent'; return 0; fi
  if [ ! -d "$_d" ]; then echo 'state dirnotdir'; return 0; fi
  if [ -L "$1" ]; then echo 'state link'; return 0; fi
  if [ ! -e "$1" ]; then echo 'state absent'; return 0; fi
  if [ ! -f "$1" ]; then echo 'state notfile'; return 0; fi
  if [ ! -O "$1" ] || [ ! -O "$_d" ]; then echo 'state notowner'; return 0; fi
  echo 'state file'
  _n=0
  while [ "$_n" -lt @MAX_LINES@ ]; do
    IFS= read -r _l || { [ -n "$_l" ] && printf '%s\n' "$_l"; break; }
    printf '%s\n' "$_l"; _n=$((_n + 1))
  done < "$1"
}
PID1=unknown; read -r PID1 < /proc/1/comm 2>/dev/null || PID1=unknown
""".replace("@MAX_LINES@", str(MAX_LINES))

# the framing (reconciler.host.script), the kinds' shell functions, the host records' own
PRELUDE = prelude() + "".join(k.shell for k in KINDS) + HOST_SHELL


def build_script(
    desired: Desired,
    inventory_path: str = INVENTORY_PATH,
    pending_path: str = PENDING_RELOADS_PATH,
    identity_path: str = IDENTITY_PATH,
) -> tuple[str, list[str]]:
    """The observation script and its positional arguments (all user data is in the args).

    The script reads the framing nonce from the first line of its stdin (``new_nonce()``)."""
    b = ScriptBuilder()
    inv = b.ref(absolute(inventory_path))
    for kind in KINDS:
        if kind.wanted(desired):
            kind.probe(desired, b)
        if kind is FILES:
            b.add(f"frame inventory inv_cat {inv}")
            b.add(f"frame pending inv_cat {b.ref(absolute(pending_path))}")
            b.add(f"frame identity ident {b.ref(absolute(identity_path))}")
            b.add("frame pid1 printf '%s\\n' \"$PID1\"")
    return b.script(PRELUDE), b.args


# ---------------------------------------------------------------- parse


class _Reading:
    """The sections of one observation as a kind reads them (``reconciler.kinds.kind.SectionReader``)."""

    def __init__(self, sections: Mapping[str, Section]) -> None:
        self.sections = sections
        self.errors: list[str] = []

    def __call__(
        self, sid: str, what: str, *, required: bool = True, ok: tuple[int, ...] = (0,)
    ) -> str | None:
        sec = self.sections.get(sid)
        if sec is None or sec.exit_status is None:
            self.errors.append(f"{what}: no answer (observation cut short)")
            return None
        if sec.exit_status not in ok:
            if required:
                detail = f": {first_error(sec.stderr)}" if sec.stderr else ""
                self.errors.append(f"{what}: exit {sec.exit_status}{detail}")
            return None
        return sec.body.decode("utf-8", errors="replace")

    def section(self, sid: str) -> Section | None:
        return self.sections.get(sid)

    def error(self, message: str) -> None:
        self.errors.append(message)


def parse_observation(host: str, desired: Desired, sections: Mapping[str, Section]) -> Observed:
    """Turn the sections of one observation into an Observed (pure; unit-tested)."""
    read = _Reading(sections)
    observed = Observed(host=host)
    for kind in KINDS:
        if kind.wanted(desired):
            observed = kind.parse(desired, read, observed)
        if kind is FILES:
            observed = _host_records(read, observed)
    return replace(observed, errors=tuple(read.errors))


def _host_records(read: _Reading, observed: Observed) -> Observed:
    inventory: tuple[str, ...] = ()
    inv = read.section("inventory")
    if inv is not None and inv.exit_status == 0:
        inventory, problem = parse_inventory(inv.body)
        if problem:
            read.error(problem)
    pending: tuple[str, ...] = ()
    pend = read.section("pending")
    if pend is not None and pend.exit_status == 0:
        pending = parse_pending_reloads(pend.body)
    # None when the section did not finish: plan then refuses the host (reconciler.engine.identity.judge)
    identity: SeenIdentity | None = None
    ident = read.section("identity")
    if ident is not None and ident.exit_status == 0:
        identity = parse_section(ident.body)
    pid1 = (read("pid1", "init system", required=False) or "").strip()
    init_system = "systemd" if pid1 == "systemd" else ("sysv" if pid1 else "unknown")
    return replace(
        observed, inventory=inventory, pending_reloads=pending, identity=identity, init_system=init_system
    )


def parse_pending_reloads(body: bytes) -> tuple[str, ...]:
    """The journal apply writes before a swap: one handler name per line."""
    names = (ln.strip() for ln in body.decode("utf-8", errors="replace").splitlines())
    return tuple(dict.fromkeys(n for n in names if n))


def parse_inventory(body: bytes) -> tuple[tuple[str, ...], str | None]:
    if not body.strip():
        return (), None
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return (), f"inventory {INVENTORY_PATH} is not valid JSON: {err}"
    if not isinstance(data, list) or not all(isinstance(p, str) and p.startswith("/") for p in data):
        return (), f"inventory {INVENTORY_PATH} is not a JSON list of absolute paths"
    return tuple(sorted(set(data))), None


# ---------------------------------------------------------------- second round trip


def content_wanted(desired: Desired, observed: Observed) -> tuple[str, ...]:
    """Non-secret declared files that exist as regular files with a different hash."""
    secret = probe_for(desired).secret
    out = []
    for f in desired.files:
        if f.secret or f.path in secret:
            continue
        st = observed.files.get(f.path)
        if st is None or not st.exists or st.kind != "file" or st.sha256 is None:
            continue
        if st.sha256 != hashlib.sha256(f.content).hexdigest():
            out.append(f.path)
    return tuple(out)


def build_fetch_script(
    paths: Iterable[str], stat_paths: Iterable[str], rules: Mapping[str, Rule] | None = None
) -> tuple[str, list[str]]:
    """Contents for diffs (``content.<i>``; paths under a user-controlled directory through the
    helper, in one run) and a stat of odd paths with their directories (``files``)."""
    rules = rules or {}
    b = ScriptBuilder()
    safe = Batch()
    for i, p in enumerate(paths):
        rule = rules.get(p, STRICT)
        if rule.strict:
            b.add(f"frame content.{i} file_head {b.ref(p)} {CONTENT_LIMIT + 1}")
        else:
            safe.read(f"content.{i}", absolute(p), rule, CONTENT_LIMIT + 1)
    if safe:
        b.add(f"RCL_N=$N {PERL} -e {b.ref(HELPER)} -- args {b.refs(safe.args())}")
    stat = [absolute(p) for p in stat_paths]
    if stat:
        b.add(f"frame files st {b.refs([*all_ancestors(stat), *stat])}")
    return b.script(PRELUDE), b.args


# ---------------------------------------------------------------- entry point


async def observe_host(
    conn: Runner,
    desired: Desired,
    *,
    fetch_diffs: bool = True,
    stat_inventory: bool = True,
    timeout: float | None = None,
    inventory_path: str = INVENTORY_PATH,
    pending_path: str = PENDING_RELOADS_PATH,
    identity_path: str = IDENTITY_PATH,
) -> Observed:
    """Observe one host: one round trip, plus one more only for diff contents / odd paths.

    ``stat_inventory=False``: do not stat inventory entries the Desired does not declare (a
    partial observation, see reconciler.engine.apply.reobserve_scope).

    Raises Transient when the host cannot be reached or the script does not finish in time;
    a probe that fails inside the script is reported in ``Observed.errors``.
    """
    started = time.monotonic()
    script, args = build_script(desired, inventory_path, pending_path, identity_path)
    run = await run_framed(conn, script, args, timeout=timeout)
    _check(conn, run)
    observed = parse_observation(conn.host, desired, run.sections)
    # inventory entries the script could not stat (JSON escapes): stat them now
    missing = tuple(p for p in observed.inventory if p not in observed.files) if stat_inventory else ()
    fetch = content_wanted(desired, observed) if fetch_diffs else ()
    round_trips = 1
    if fetch or missing:
        round_trips = 2
        script2, args2 = build_fetch_script(fetch, missing, probe_for(desired).rules())
        run2 = await run_framed(conn, script2, args2, timeout=timeout)
        _check(conn, run2)
        observed = _merge_fetch(observed, fetch, missing, run2.sections)
    log.debug(
        "observe.done",
        host=conn.host,
        seconds=round(time.monotonic() - started, 3),
        round_trips=round_trips,
        errors=len(observed.errors),
    )
    return observed


def _check(conn: Runner, run: Framed) -> None:
    if not run.started:
        raise Transient(
            f"host {conn.host}: cannot run sh for observation: {run.result.stderr[-200:]!r}",
            reason=Reason.OBSERVE_INCOMPLETE,
        )


def _merge_fetch(
    observed: Observed, fetched: tuple[str, ...], stat_paths: tuple[str, ...], sections: Mapping[str, Section]
) -> Observed:
    files = dict(observed.files)
    errors = list(observed.errors)
    for i, p in enumerate(fetched):
        sec = sections.get(f"content.{i}")
        st = files.get(p)
        if st is None:
            continue
        if sec is not None and sec.exit_status == 3 and sec.stderr:
            # the helper would not read it (changed since the stat: now a link, hard-linked...)
            files[p] = FileState(path=p, exists=False, kind="other", refused=sec.stderr.strip()[:300])
            continue
        if sec is None or sec.exit_status != 0:
            errors.append(f"content of {p}: could not be read for the diff")
            continue
        if len(sec.body) > CONTENT_LIMIT:
            continue  # too big to diff: compared by hash only
        files[p] = replace(st, content=sec.body)
    extra = sections.get("files")
    if extra is not None and stat_paths and extra.exit_status is not None:
        records = parse_find_records(extra.body)
        for p, st in judged(file_states(stat_paths, records, {}), records).items():
            files.setdefault(p, st)
    return replace(observed, files=MappingProxyType(dict(sorted(files.items()))), errors=tuple(errors))
