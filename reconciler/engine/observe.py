"""Observe a host in one round trip: one generated POSIX sh script, framed output, typed parse.

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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from reconciler.domains.strongswan import SWANCTL_CLIENT_CONF
from reconciler.engine.identity import IDENTITY_PATH, MAX_LINES, SeenIdentity, parse_section
from reconciler.errors import Reason, Transient
from reconciler.host.pathsafe import HELPER, PERL, STRICT, Batch, Rule, all_ancestors, refusal, rule_of
from reconciler.host.script import (
    Framed,
    Runner,
    ScriptBuilder,
    Section,
    prelude,
    run_framed,
    split_sections,
    token,
)
from reconciler.host.state import INVENTORY_PATH, PENDING_RELOADS_PATH
from reconciler.kinds.ipsec import runs_ipsec
from reconciler.kinds.ipsec_state import ViciParseError, loaded_conns, up_names
from reconciler.kinds.observed import (
    FileState,
    IpsecState,
    IptablesState,
    LinkState,
    Observed,
    PackageState,
    ServiceState,
    XfrmPolicy,
)
from reconciler.kinds.packaging import needed_packages
from reconciler.kinds.registry import KINDS
from reconciler.kinds.resources import Desired
from reconciler.log import get_logger
from reconciler.netfilter.iptables import IptablesParseError, canonical_iptables

log = get_logger(__name__)

CONTENT_LIMIT = 4 * 1024 * 1024  # larger files are compared by hash only (no diff)
KERNEL_MODULES = ("ipip", "esp4", "ah4", "xfrm_user", "vxlan", "tun")
NO_IPV6 = "reconciler-no-ipv6"  # the ip6tables section's answer on a kernel without IPv6

# the observation's file record: find -printf, 7 NUL-terminated fields (parse_find_records); the
# path-safety helper prints the same records (kind "R": refused, the reason in the 6th field)
FIND_FMT = r"%p\0%y\0%m\0%u\0%g\0%l\0%U\0"

# the framing (reconciler.host.script) and the observation's shell functions
PRELUDE = (
    prelude()
    + r"""FMT='@FIND_FMT@'
st() { [ $# -eq 0 ] || find "$@" -maxdepth 0 -printf "$FMT"; }
# every directory above $1 is not a link and is owned by root (shell builtins: no process;
# the answer for the last directory asked is kept: files share directories); whatever else
# the policy refuses (group/other-writable) is judged from st's records
anc_ok() {
  _d=${1%/*}
  if [ "$_d" = "${_ok_d-/}" ]; then return "$_ok_rc"; fi
  _a=$_d; _ok_rc=0
  while [ -n "$_a" ]; do
    if [ -L "$_a" ] || [ ! -O "$_a" ]; then _ok_rc=1; break; fi
    _a=${_a%/*}
  done
  _ok_d=$_d
  return "$_ok_rc"
}
hs() {
  n=$#
  for p do if anc_ok "$p" && [ -f "$p" ] && [ ! -L "$p" ]; then set -- "$@" "$p"; fi; done
  shift "$n"
  [ $# -eq 0 ] || sha256sum -z -- "$@"
}
own() {
  n=$#
  for p do if anc_ok "$p" && [ -d "$p" ] && [ ! -L "$p" ]; then set -- "$@" "$p"; fi; done
  shift "$n"
  [ $# -eq 0 ] || find "$@" -mindepth 1 ! -type d -printf "$FMT"
}
# "u:NAME" / "g:NAME": does the user/group exist? /etc/passwd|group with builtins, else NSS
ids() {
  for a do
    k=${a%%:*}; n=${a#*:}; f=0
    if [ "$k" = u ]; then db=/etc/passwd; ns=passwd; else db=/etc/group; ns=group; fi
    if [ -r "$db" ]; then
      while IFS=: read -r e _r; do if [ "$e" = "$n" ]; then f=1; break; fi; done < "$db"
    fi
    if [ $f = 0 ] && getent "$ns" "$n" >/dev/null 2>&1; then f=1; fi
    printf '%s %s %s\n' "$k" "$n" "$f"
  done
}
inv_cat() {
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
file_head() {
  if anc_ok "$1" && [ -f "$1" ] && [ ! -L "$1" ]; then head -c "$2" -- "$1"; return; fi
  echo "$1 changed since it was observed (no longer a regular file under root-only directories)" >&2
  return 3
}
charon_state() {
  if [ -r /run/charon.pid ]; then
    read -r pid < /run/charon.pid || pid=
    printf 'pidfile %s\n' "$pid"
    case $pid in
      *[!0-9]*|'') ;;
      *) if read -r c < "/proc/$pid/comm"; then printf 'pidcomm %s\n' "$c"; fi 2>/dev/null ;;
    esac
    return 0  # the pid file decides (parse_charon); no process scan needed
  fi
  grep -lxs charon /proc/[0-9]*/comm | sed -n 's|^/proc/\([0-9]*\)/comm$|proc \1|p'
  return 0
}
kernel_facts() {
  for m in $KMODS; do
    if [ -d "/sys/module/$m" ]; then echo "$m loaded"
    elif modinfo -n "$m" >/dev/null 2>&1; then echo "$m module"
    else echo "$m absent"; fi
  done
  if [ -c /dev/net/tun ]; then echo "devtun present"; else echo "devtun absent"; fi
}
svc_probe() {
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
# dpkg-query, its answer kept in $_DPKG for apt_cand
dpkg_q() {
  _DPKG=$(dpkg-query -W -f='${Package}\t${db:Status-Abbrev}\t${Version}\n' -- "$@"); _rc=$?
  printf '%s\n' "$_DPKG"
  return "$_rc"
}
# the install candidate of each package that dpkg_q did not find installed ("" = none)
apt_cand() {
  for _p do
    case "
$_DPKG" in *"
$_p	ii"*) continue ;; esac
    _c=$(apt-cache policy -- "$_p" 2>/dev/null | sed -n 's/^ *Candidate: *//p' | head -n 1)
    [ "$_c" = "(none)" ] && _c=
    printf '%s\t%s\n' "$_p" "$_c"
  done
}
swanctl_q() { if [ -n "${SW:-}" ]; then STRONGSWAN_CONF=$SW swanctl "$@"; else swanctl "$@"; fi; }
PID1=unknown; read -r PID1 < /proc/1/comm 2>/dev/null || PID1=unknown
""".replace("@FIND_FMT@", FIND_FMT).replace("@MAX_LINES@", str(MAX_LINES))
)


# ---------------------------------------------------------------- what to look at


@dataclass(frozen=True)
class Probe:
    """The managed paths of a host: which to hash, which must never be read."""

    hashed: tuple[str, ...]  # regular files compared by sha256 (declared files, public keys)
    unhashed: tuple[str, ...]  # stat only (links, private keys)
    dirs: tuple[str, ...]  # owned directories to list
    secret: frozenset[str] = field(default_factory=frozenset)  # never fetch content
    # paths under a directory a non-root user controls (the fleet says so): observed only
    # through the path-safety helper, never by find/sha256sum; (path, rule, hash it)
    guarded: tuple[tuple[str, Rule, bool], ...] = ()
    users: tuple[str, ...] = ()  # non-root owners the files declare (do they exist?)
    groups: tuple[str, ...] = ()

    def ancestors(self) -> tuple[str, ...]:
        """The directories above every path find stats (and the owned directories): their
        records decide whether the paths are root's alone (``reconciler.host.pathsafe.refusal``)."""
        return all_ancestors((*self.hashed, *self.unhashed, *(f"{d}/x" for d in self.dirs)))

    def rules(self) -> dict[str, Rule]:
        return {p: r for p, r, _ in self.guarded}


def probe_for(desired: Desired) -> Probe:
    hashed: dict[str, None] = {}
    unhashed: dict[str, None] = {}
    guarded: dict[str, tuple[Rule, bool]] = {}
    secret: set[str] = set()
    users: dict[str, None] = {}
    groups: dict[str, None] = {}
    for f in desired.files:
        rule = rule_of(f)
        if rule.strict:
            hashed[f.path] = None
        else:
            guarded[f.path] = (rule, True)
            users[rule.user] = None
        if f.secret:
            secret.add(f.path)
        users[f.owner] = None
        groups[f.group] = None
    if desired.firewall is not None:
        hashed[desired.firewall.persistent_path] = None
        if desired.firewall.rules_v6 is not None:
            hashed[desired.firewall.persistent_path_v6] = None
    for kp in desired.keypairs:
        unhashed[kp.private_path] = None
        secret.add(kp.private_path)
        hashed[kp.public_path] = None
    for lk in desired.links:
        rule = rule_of(lk)
        if rule.strict:
            unhashed[lk.path] = None
        else:
            guarded.setdefault(lk.path, (rule, False))
            users[rule.user] = None
    for path in (*(a.path for a in desired.absent), *(e.path for e in desired.expects)):
        if path not in hashed and path not in guarded:
            unhashed[path] = None
    for p in hashed:
        unhashed.pop(p, None)
    for p in guarded:
        hashed.pop(p, None)
        unhashed.pop(p, None)
    return Probe(
        hashed=tuple(hashed),
        unhashed=tuple(unhashed),
        dirs=tuple(desired.owned_dirs),
        secret=frozenset(secret),
        guarded=tuple((p, r, h) for p, (r, h) in guarded.items()),
        users=tuple(u for u in users if u != "root"),
        groups=tuple(g for g in groups if g != "root"),
    )


@dataclass(frozen=True)
class Wanted:
    """Which optional sections an observation runs (the Desired decides; plan reads the same)."""

    iptables: bool
    ip6tables: bool  # the firewall manages IPv6 too (rules.v6)
    links: bool  # ip addr (tunnels, addresses)
    kernel: bool  # kernel module facts (tunnels)
    ipsec: bool  # charon, swanctl, ip xfrm policy
    packages: tuple[str, ...]


def wanted_for(desired: Desired) -> Wanted:
    return Wanted(
        iptables=desired.firewall is not None,
        ip6tables=desired.firewall is not None and desired.firewall.rules_v6 is not None,
        links=bool(desired.tunnels or desired.addresses),
        kernel=bool(desired.tunnels),
        ipsec=runs_ipsec(desired),
        packages=tuple(
            sorted({*needed_packages(desired), *(p for r in desired.requires for p in r.packages)})
        ),
    )


def build_script(
    desired: Desired,
    inventory_path: str = INVENTORY_PATH,
    pending_path: str = PENDING_RELOADS_PATH,
    identity_path: str = IDENTITY_PATH,
) -> tuple[str, list[str]]:
    """The observation script and its positional arguments (all user data is in the args).

    The script reads the framing nonce from the first line of its stdin (``new_nonce()``)."""
    probe = probe_for(desired)
    want = wanted_for(desired)
    b = ScriptBuilder()
    inv = b.ref(_absolute(inventory_path))
    # the paths' directories first: one find call judges them all (few, and shared)
    stat_list = [*probe.ancestors(), *probe.hashed, *probe.unhashed]
    stat_paths = b.refs([_absolute(p) for p in stat_list])
    b.add(f"frame files st {stat_paths}".rstrip())
    hashed = b.refs([_absolute(p) for p in probe.hashed])
    b.add(f"frame hashes hs {hashed}".rstrip())
    if probe.dirs:
        b.add(f"frame owned own {b.refs([_absolute(d) for d in probe.dirs])}")
    if probe.guarded:
        safe = Batch()
        for p, rule, hash_it in probe.guarded:
            safe.stat(_absolute(p), rule, hash_it=hash_it)
        safe.flush("safe")
        b.add("printf '@@%s<safe\\n' \"$N\" >&2")
        b.add(f"RCL_N=$N {PERL} -e {b.ref(HELPER)} -- args {b.refs(safe.args())}")
    if probe.users or probe.groups:
        names = [f"u:{u}" for u in probe.users] + [f"g:{g}" for g in probe.groups]
        b.add(f"frame ids ids {b.refs(names)}")
    b.add(f"frame inventory inv_cat {inv}")
    b.add(f"frame pending inv_cat {b.ref(_absolute(pending_path))}")
    b.add(f"frame identity ident {b.ref(_absolute(identity_path))}")
    b.add("frame pid1 printf '%s\\n' \"$PID1\"")
    if want.iptables:
        b.add("frame iptables iptables-save")
    if want.ip6tables:  # a kernel without IPv6 (ipv6.disable=1) has no /proc/net/if_inet6
        b.add(
            "if [ -e /proc/net/if_inet6 ]; then frame ip6tables ip6tables-save; "
            f"else frame ip6tables echo {NO_IPV6}; fi"
        )
    if want.links:
        b.add("frame addr ip -d -j addr show")
    if want.ipsec:
        b.add("frame xfrm ip xfrm policy")
        b.add("frame charon charon_state")
        # swanctl only talks to a live charon (its vici socket); saves ~25 ms when there is none
        b.add("if [ -S /var/run/charon.vici ] || [ -S /run/charon.vici ]; then")
        # swanctl loads every crypto plugin at start (~10 ms a call); listing needs none: the
        # rendered client settings load one tiny plugin (plain swanctl until they are applied)
        b.add(f'  SW={SWANCTL_CLIENT_CONF}; [ -r "$SW" ] || SW=')
        b.add("  frame conns swanctl_q --list-conns --pretty")
        b.add("  frame sas swanctl_q --list-sas --pretty")
        b.add("fi")
    if want.kernel:
        b.add(f"KMODS='{' '.join(token(m) for m in KERNEL_MODULES)}'")
        b.add("frame kernel kernel_facts")
    if want.packages:
        pkgs = b.refs(list(want.packages))
        b.add(f"frame dpkg dpkg_q {pkgs}")
        required = sorted({p for r in desired.requires for p in r.packages})
        if required:
            b.add(f"frame aptcand apt_cand {b.refs(required)}")
    for i, s in enumerate(desired.services):
        if not s.running and s.pid_file:
            b.add(f"frame svc.{i} svc_gone {b.ref(s.pid_file)}")
        elif s.pid_file:
            b.add(f"frame svc.{i} svc_pid {b.ref(s.name)} {b.ref(s.pid_file)}")
        else:
            b.add(f"frame svc.{i} svc_probe {b.ref(s.name)} {b.refs(list(s.status))}".rstrip())
    for kind in KINDS:
        if kind.wanted(desired):
            kind.probe(desired, b)
    return b.script(PRELUDE), b.args


def _absolute(path: str) -> str:
    """Paths reach ``find`` as starting points: only absolute ones (never an option or ``!``)."""
    if not path.startswith("/"):
        raise ValueError(f"not an absolute path: {path!r}")
    return path


# ---------------------------------------------------------------- parsers

_KINDS = {"f": "file", "l": "link", "d": "dir"}


def parse_find_records(body: bytes) -> dict[str, FileState]:
    """``find -printf '%p\\0%y\\0%m\\0%u\\0%g\\0%l\\0%U\\0'`` records (7 NUL-separated fields
    each), or the helper's (``reconciler.host.pathsafe``: kind ``R`` = refused, the reason in place
    of the link target)."""
    fields = body.split(b"\0")
    out: dict[str, FileState] = {}
    for i in range(0, len(fields) - 6, 7):
        raw_path, kind, mode_s, owner, group, target, uid_s = fields[i : i + 7]
        path = raw_path.decode("utf-8", errors="surrogateescape")
        if kind == b"R":
            why = target.decode("utf-8", errors="replace")
            out[path] = FileState(path=path, exists=False, kind="other", refused=why)
            continue
        try:
            mode: int | None = int(mode_s, 8)
        except ValueError:
            mode = None
        k = _KINDS.get(kind.decode("ascii", errors="replace"), "other")
        out[path] = FileState(
            path=path,
            exists=True,
            kind=k,
            mode=mode,
            owner=owner.decode("utf-8", errors="replace"),
            group=group.decode("utf-8", errors="replace"),
            link_target=target.decode("utf-8", errors="surrogateescape") if k == "link" else None,
            uid=int(uid_s) if uid_s.isdigit() else None,
        )
    return out


def parse_sha256(body: bytes) -> dict[str, str]:
    """``sha256sum -z`` output: ``<64 hex>  <path>\\0`` (names unescaped with -z)."""
    out: dict[str, str] = {}
    for rec in body.split(b"\0"):
        if len(rec) < 67 or rec[64:65] != b" ":
            continue
        digest = rec[:64].decode("ascii", errors="replace")
        path = rec[66:].decode("utf-8", errors="surrogateescape")
        out[path] = digest.lower()
    return out


def file_states(
    asked: Iterable[str], records: Mapping[str, FileState], hashes: Mapping[str, str]
) -> dict[str, FileState]:
    """One FileState per asked path: found by find (with its hash, if hashed) or missing."""
    out: dict[str, FileState] = {}
    for p in asked:
        st = records.get(p)
        if st is None:
            out[p] = FileState(path=p, exists=False)
        elif st.kind == "file" and p in hashes:
            out[p] = replace(st, sha256=hashes[p])
        else:
            out[p] = st
    return out


# ---------------------------------------------------------------- read-back after a change


def read_back(batch: Batch, paths: Mapping[str, Rule]) -> None:
    """Add to a helper run (after the operations that changed ``paths``) a read of what they
    are now: the observation's file record and sha256 (sections ``rb.st``/``rb.hs``), so the
    change is proven without another round trip. Never through a link."""
    for p, rule in paths.items():
        batch.stat(p, rule, hash_it=True)
    batch.flush("rb")


def parse_read_back(stdout: bytes, paths: Sequence[str], marker: str) -> dict[str, FileState] | None:
    """The file states ``read_back`` printed; None if the output is not all there."""
    secs = split_sections(stdout, nonce=marker)
    st, hs = secs.get("rb.st"), secs.get("rb.hs")
    if st is None or hs is None or st.exit_status is None or hs.exit_status != 0:
        return None
    return file_states(paths, parse_find_records(st.body), parse_sha256(hs.body))


def parse_xfrm_policies(text: str) -> tuple[XfrmPolicy, ...]:
    """``ip xfrm policy`` text (iproute2 prints no JSON for xfrm). Socket policies (charon's
    IKE bypass) are skipped."""
    blocks: list[list[str]] = []
    for line in text.splitlines():
        if line.startswith("src "):
            blocks.append([line])
        elif blocks and line.strip():
            blocks[-1].append(line)
    out: list[XfrmPolicy] = []
    for block in blocks:
        head = block[0].split()
        fields = dict(zip(head[0::2], head[1::2], strict=False))
        direction = None
        tmpls: list[str] = []
        for line in block[1:]:
            words = line.split()
            if words and words[0] == "dir" and len(words) > 1:
                direction = words[1]
            elif words and words[0] == "proto" and "mode" in words:
                tmpls.append(f"{words[1]}/{words[words.index('mode') + 1]}")
        if direction is None:
            continue  # "socket in/out" policies
        out.append(
            XfrmPolicy(
                src=fields.get("src", ""),
                dst=fields.get("dst", ""),
                dir=direction,
                proto=fields.get("proto"),
                tmpl=tuple(tmpls),
            )
        )
    return tuple(out)


def parse_links(data: str) -> tuple[LinkState, ...]:
    """``ip -d -j addr show``: every interface with kind, tunnel endpoints, IPv4 addresses."""
    items: list[Any] = json.loads(data) if data.strip() else []
    out: list[LinkState] = []
    for item in items:
        if not isinstance(item, dict) or "ifname" not in item:
            continue
        info = item.get("linkinfo") or {}
        kind = str(info.get("info_kind") or item.get("link_type") or "unknown")
        idata = info.get("info_data") or {}
        addrs = []
        for a in item.get("addr_info") or []:
            if a.get("family") != "inet" or "local" not in a:
                continue
            plen = a.get("prefixlen", 32)
            if a.get("address") and a.get("address") != a["local"]:
                addrs.append(f"{a['local']}/32 peer {a['address']}/{plen}")
            else:
                addrs.append(f"{a['local']}/{plen}")
        local = idata.get("local")
        remote = idata.get("remote")
        out.append(
            LinkState(
                name=str(item["ifname"]),
                kind=kind,
                local=str(local) if local and local != "any" else None,
                remote=str(remote) if remote and remote != "any" else None,
                addresses=tuple(sorted(addrs)),
                up="UP" in (item.get("flags") or []),
            )
        )
    return tuple(out)


def parse_charon(text: str) -> bool:
    """charon runs if its pid file names a live charon process; without a pid file, if any
    charon process is visible (``/proc/*/comm``)."""
    has_pidfile = False
    for line in text.splitlines():
        words = line.split()
        if not words:
            continue
        if words[0] == "pidfile":
            has_pidfile = True
        elif words[0] == "pidcomm" and words[1:] == ["charon"]:
            return True
    if has_pidfile:
        return False
    return any(line.startswith("proc ") for line in text.splitlines())


def parse_dpkg(text: str, names: Iterable[str]) -> dict[str, PackageState]:
    found: dict[str, PackageState] = {}
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        name, abbrev, version = parts[0], parts[1], parts[2]
        installed = len(abbrev) >= 2 and abbrev[1] == "i"
        found[name] = PackageState(name=name, installed=installed, version=version if installed else None)
    out: dict[str, PackageState] = {}
    for n in names:
        base = n.split(":", 1)[0]
        out[n] = found.get(n) or found.get(base) or PackageState(name=n, installed=False)
    return out


def parse_service(name: str, text: str) -> ServiceState:
    fields = dict((ln.split(" ", 1) + [""])[:2] for ln in text.splitlines() if ln.strip())
    if "active" in fields:
        en = fields.get("enabled", "").strip()
        enabled = None if not en else en in ("enabled", "enabled-runtime", "static", "alias", "indirect")
        return ServiceState(name=name, running=fields["active"].strip() == "active", enabled=enabled)
    rc = fields.get("rc", "").strip()  # init scripts: a start link in runlevels 2-5
    enabled = True if rc == "yes" else (False if rc == "no" else None)
    return ServiceState(name=name, running=fields.get("status", "").strip() == "0", enabled=enabled)


def parse_kernel(text: str) -> dict[str, bool]:
    out: dict[str, bool] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            out[parts[0]] = parts[1] in ("loaded", "module", "present")
    # the names the plan asks for
    facts = {"ipip": out.get("ipip", False), "esp": out.get("esp4", False), "ah": out.get("ah4", False)}
    facts.update({"xfrm": out.get("xfrm_user", False), "vxlan": out.get("vxlan", False)})
    facts["tun"] = out.get("tun", False) or out.get("devtun", False)
    return facts


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


# ---------------------------------------------------------------- assemble


def parse_observation(host: str, desired: Desired, sections: Mapping[str, Section]) -> Observed:
    """Turn the sections of one observation into an Observed (pure; unit-tested)."""
    errors: list[str] = []

    def body(sid: str, what: str, *, required: bool = True, ok: tuple[int, ...] = (0,)) -> str | None:
        sec = sections.get(sid)
        if sec is None or sec.exit_status is None:
            errors.append(f"{what}: no answer (observation cut short)")
            return None
        if sec.exit_status not in ok:
            if required:
                detail = f": {_first_error(sec.stderr)}" if sec.stderr else ""
                errors.append(f"{what}: exit {sec.exit_status}{detail}")
            return None
        return sec.body.decode("utf-8", errors="replace")

    want = wanted_for(desired)
    probe = probe_for(desired)
    files: dict[str, FileState] = {}
    records: dict[str, FileState] = {}
    declared, hashed = sections.get("files"), sections.get("hashes")
    if declared is None or hashed is None:
        errors.append("files: no answer (observation cut short)")
    elif _files_ok(declared, "files", errors) and _files_ok(hashed, "file hashes", errors):
        records = parse_find_records(declared.body)
    owned = sections.get("owned")
    if owned is not None:
        if _files_ok(owned, "owned directories", errors) and records:
            files.update(owned_states(parse_find_records(owned.body), desired.owned_dirs, records))
    elif desired.owned_dirs:
        errors.append("owned directories: no answer (observation cut short)")
    if records and hashed is not None:
        asked = (*probe.hashed, *probe.unhashed)
        files.update(judged(file_states(asked, records, parse_sha256(hashed.body)), records))
    if probe.guarded:
        st, hs = sections.get("safe.st"), sections.get("safe.hs")
        if st is None or hs is None or st.exit_status is None or hs.exit_status is None:
            detail = f": {_first_error(st.stderr)}" if st is not None and st.stderr else ""
            errors.append(f"files under user-controlled directories: no answer (perl ran?){detail}")
        else:
            if hs.exit_status != 0:
                errors.append(f"files under user-controlled directories: sha256sum exit {hs.exit_status}")
            asked = tuple(p for p, _, _ in probe.guarded)
            files.update(file_states(asked, parse_find_records(st.body), parse_sha256(hs.body)))
    unknown_users, unknown_groups = parse_ids(sections.get("ids"), probe, errors)

    inventory: tuple[str, ...] = ()
    inv = sections.get("inventory")
    if inv is not None and inv.exit_status == 0:
        inventory, problem = parse_inventory(inv.body)
        if problem:
            errors.append(problem)
    pending: tuple[str, ...] = ()
    pend = sections.get("pending")
    if pend is not None and pend.exit_status == 0:
        pending = parse_pending_reloads(pend.body)

    # None when the section did not finish: plan then refuses the host (reconciler.engine.identity.judge)
    identity: SeenIdentity | None = None
    ident = sections.get("identity")
    if ident is not None and ident.exit_status == 0:
        identity = parse_section(ident.body)

    pid1 = (body("pid1", "init system", required=False) or "").strip()
    init_system = "systemd" if pid1 == "systemd" else ("sysv" if pid1 else "unknown")

    iptables: IptablesState | None = None
    ipt = body("iptables", "iptables-save") if want.iptables else None
    if ipt is not None:
        try:
            iptables = canonical_iptables(ipt)
        except IptablesParseError as err:
            errors.append(f"iptables-save: unparsable output: {err}")

    ip6tables: IptablesState | None = None
    ip6t = body("ip6tables", "ip6tables-save") if want.ip6tables else None
    ipv6: dict[str, bool] = {}
    if ip6t is not None and ip6t.strip() == NO_IPV6:
        ipv6["ipv6"] = False
    elif ip6t is not None:
        ipv6["ipv6"] = True
        try:
            ip6tables = canonical_iptables(ip6t)
        except IptablesParseError as err:
            errors.append(f"ip6tables-save: unparsable output: {err}")

    policies: tuple[XfrmPolicy, ...] = ()
    xfrm = body("xfrm", "ip xfrm policy") if want.ipsec else None
    if xfrm is not None:
        policies = parse_xfrm_policies(xfrm)

    links: tuple[LinkState, ...] = ()
    addr = body("addr", "ip addr") if want.links else None
    if addr is not None:
        try:
            links = parse_links(addr)
        except (json.JSONDecodeError, TypeError, AttributeError) as err:
            errors.append(f"ip addr: unparsable JSON: {err}")

    running = want.ipsec and parse_charon(body("charon", "charon process", required=False) or "")
    conns: tuple[str, ...] = ()
    ike: tuple[str, ...] = ()
    children: tuple[str, ...] = ()
    if running and ("conns" in sections or "sas" in sections):
        try:
            conns = loaded_conns(body("conns", "swanctl --list-conns") or "")
            ike, children = up_names(body("sas", "swanctl --list-sas") or "")
        except ViciParseError as err:
            errors.append(f"swanctl: cannot parse its output: {err}")
    elif running:
        errors.append("swanctl: charon runs but its vici socket (/var/run/charon.vici) is missing")
    ipsec = IpsecState(
        daemon_running=running,
        loaded_connections=conns,
        established_ike=ike,
        installed_children=children,
        policies=policies,
    )

    kernel: dict[str, bool] = {}
    if want.kernel:
        kernel = parse_kernel(body("kernel", "kernel facts", required=False) or "")
    kernel.update(ipv6)

    packages: dict[str, PackageState] = {}
    names = want.packages
    if names:
        dpkg = body("dpkg", "dpkg-query", ok=(0, 1))
        if dpkg is not None:
            packages = parse_dpkg(dpkg, names)
    candidates: dict[str, str] = {}
    if names and any(r.packages for r in desired.requires):
        cand = body("aptcand", "apt-cache policy", required=False)
        for line in (cand or "").splitlines():
            name, _, version = line.partition("\t")
            if name:
                candidates[name] = version.strip()

    services: dict[str, ServiceState] = {}
    for i, s in enumerate(desired.services):
        text = body(f"svc.{i}", f"service {s.name}")
        if text is not None:
            services[s.name] = parse_service(s.name, text)

    observed = Observed(
        host=host,
        files=MappingProxyType(dict(sorted(files.items()))),
        iptables=iptables,
        ip6tables=ip6tables,
        links=links,
        ipsec=ipsec,
        packages=MappingProxyType(packages),
        candidates=MappingProxyType(candidates),
        services=MappingProxyType(services),
        init_system=init_system,
        inventory=inventory,
        kernel=MappingProxyType(kernel),
        pending_reloads=pending,
        identity=identity,
        unknown_users=unknown_users,
        unknown_groups=unknown_groups,
    )
    for kind in KINDS:
        if kind.wanted(desired):
            observed = kind.parse(desired, body, observed)
    return replace(observed, errors=tuple(errors))


# the only messages find/sha256sum give for a path that is not there
_MISSING = ("No such file or directory", "Not a directory")


def _files_ok(sec: Section, what: str, errors: list[str]) -> bool:
    """find/sha256sum exit 1 when a path is missing (expected); anything else is an error."""
    if sec.exit_status is None:
        errors.append(f"{what}: no answer (observation cut short)")
        return False
    odd = [ln for ln in sec.stderr.splitlines() if ln.strip() and not any(m in ln for m in _MISSING)]
    if sec.exit_status not in (0, 1) or (sec.exit_status == 1 and odd):
        detail = f": {odd[0][:300]}" if odd else ""
        errors.append(f"{what}: exit {sec.exit_status}{detail}")
        return False
    return True


def judged(states: Mapping[str, FileState], records: Mapping[str, FileState]) -> dict[str, FileState]:
    """``states`` with every path whose directories are not root's alone replaced by a refused
    state (the reason; nothing read through it): ``records`` holds their ``find`` records."""
    out = dict(states)
    by_dir: dict[str, str | None] = {}  # files share directories: judge each chain once
    for p in states:
        d = p.rpartition("/")[0]
        if d not in by_dir:
            by_dir[d] = refusal(p, records)
        why = by_dir[d]
        if why:
            out[p] = FileState(path=p, exists=False, kind="other", refused=why)
    return out


def owned_states(
    found: Mapping[str, FileState], owned_dirs: Iterable[str], records: Mapping[str, FileState]
) -> dict[str, FileState]:
    """Files found under the owned directories, refused when the directories above (and the
    owned directory itself) are not root's alone."""
    dirs = sorted(owned_dirs, key=len, reverse=True)
    out: dict[str, FileState] = {}
    for p, st in found.items():
        d = next((d for d in dirs if p.startswith(d.rstrip("/") + "/")), None)
        why = refusal(p, records, upto=d) if d is not None else None
        out[p] = FileState(path=p, exists=False, kind="other", refused=why) if why else st
    return out


def parse_ids(sec: Section | None, probe: Probe, errors: list[str]) -> tuple[frozenset[str], frozenset[str]]:
    """The declared non-root owners and groups the host does not know (``ids`` lines)."""
    if not probe.users and not probe.groups:
        return frozenset(), frozenset()
    if sec is None or sec.exit_status is None:
        errors.append("users and groups: no answer (observation cut short)")
        return frozenset(), frozenset()
    users: set[str] = set()
    groups: set[str] = set()
    for line in sec.body.decode("utf-8", errors="replace").splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] == "0":
            (users if parts[0] == "u" else groups).add(parts[1])
    return frozenset(users), frozenset(groups)


def parse_pending_reloads(body: bytes) -> tuple[str, ...]:
    """The journal apply writes before a swap: one handler name per line."""
    names = (ln.strip() for ln in body.decode("utf-8", errors="replace").splitlines())
    return tuple(dict.fromkeys(n for n in names if n))


def _first_error(stderr: str) -> str:
    """The first line of a probe's stderr that is not strongSwan's plugin noise."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    useful = [ln for ln in lines if "plugin" not in ln]
    return (useful or lines or [""])[0][:300]


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
            safe.read(f"content.{i}", _absolute(p), rule, CONTENT_LIMIT + 1)
    if safe:
        b.add(f"RCL_N=$N {PERL} -e {b.ref(HELPER)} -- args {b.refs(safe.args())}")
    stat = [_absolute(p) for p in stat_paths]
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
