"""Observe a host in one round trip: one generated POSIX sh script, framed output, typed parse.

The script is our own code; every value from the fleet (paths, package and service names,
status commands) travels as a positional argument referenced by number (``"${7}"``), see
``reconciler.remote``. The script runs no mutating command: stat/readlink/sha256sum, find,
iptables-save, ip ... show, swanctl --list-*, dpkg-query (the declared packages and every
package a resource needs), service status probes (``systemctl is-active/is-enabled`` where PID 1
is systemd, else the service's status command and its init script's runlevel links), /proc and
/sys reads, modinfo.

Output framing (stdout), one section per probe::

    @@reconciler:begin <id>
    <base64 of the probe's stdout>
    @@reconciler:end <id> <exit status>

Base64 bodies cannot contain ``@``, so file names or command output can never forge a marker.
On stderr each probe's messages follow a ``@@reconciler:stderr <id>`` line.

Secrets: file records carry kind, mode, owner, group, sha256 and link target, never content.
Key-pair private keys are not even hashed. A second round trip (only when something differs)
fetches the content of non-secret declared files whose hash differs, for diffs.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from reconciler.connection import CommandResult, Connection
from reconciler.errors import Transient
from reconciler.iptables import IptablesParseError, canonical_iptables
from reconciler.log import get_logger
from reconciler.observed import (
    FileState,
    IpsecState,
    IptablesState,
    LinkState,
    Observed,
    PackageState,
    ServiceState,
    XfrmPolicy,
)
from reconciler.packaging import needed_packages
from reconciler.remote import ScriptBuilder, token
from reconciler.resources import Desired

log = get_logger(__name__)

INVENTORY_PATH = "/var/lib/reconciler/inventory.json"  # JSON list of absolute paths (plan writes it)
CONTENT_LIMIT = 4 * 1024 * 1024  # larger files are compared by hash only (no diff)
KERNEL_MODULES = ("ipip", "esp4", "ah4", "xfrm_user", "vxlan", "tun")
BEGIN = "@@reconciler:begin "
END = "@@reconciler:end "
ERR = "@@reconciler:stderr "

PRELUDE = r"""LC_ALL=C; export LC_ALL
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin; export PATH
exec 4>&1 </dev/null
frame() {
  id=$1; shift
  printf '@@reconciler:begin %s\n' "$id"
  printf '@@reconciler:stderr %s\n' "$id" >&2
  rc=$( { { "$@" 3>&- 4>&-; echo $? >&3; } | base64 >&4; } 3>&1 )
  printf '@@reconciler:end %s %s\n' "$id" "$rc"
}
ST='st() {
  p=$2
  b=$(printf %s "$p" | base64 -w0)
  if [ -L "$p" ]; then
    printf "%s l %s - %s\n" "$b" "$(stat -c "%a %U %G" -- "$p")" "$(readlink -- "$p" | base64 -w0)"
  elif [ -f "$p" ]; then
    h=-
    if [ "$1" = h ]; then h=$(sha256sum < "$p") && h=${h%% *} || h=-; fi
    printf "%s f %s %s -\n" "$b" "$(stat -c "%a %U %G" -- "$p")" "$h"
  elif [ -d "$p" ]; then
    printf "%s d %s - -\n" "$b" "$(stat -c "%a %U %G" -- "$p")"
  elif [ -e "$p" ]; then
    printf "%s o %s - -\n" "$b" "$(stat -c "%a %U %G" -- "$p")"
  else
    printf "%s m - - - - -\n" "$b"
  fi
}'
eval "$ST"
st_pairs() { while [ $# -ge 2 ]; do st "$1" "$2"; shift 2; done; }
dir_stat() {
  [ -d "$1" ] || return 0
  find "$1" -mindepth 1 ! -type d -exec sh -c "$ST"'
for p do st n "$p"; done' sh {} +
}
inv_cat() { [ -f "$1" ] || return 0; head -c 1048576 -- "$1"; }
inv_stat() {
  [ -f "$1" ] || return 0
  sed -n 's/^[[:space:]]*"\(.*\)",\{0,1\}[[:space:]]*$/\1/p' "$1" | while IFS= read -r p; do
    case $p in *\\*) ;; /*) st n "$p" ;; esac
  done
}
file_head() { if [ -f "$1" ] && [ ! -L "$1" ]; then head -c "$2" -- "$1"; else return 3; fi; }
charon_state() {
  if [ -r /run/charon.pid ]; then
    read -r pid < /run/charon.pid || pid=
    printf 'pidfile %s\n' "$pid"
    case $pid in
      *[!0-9]*|'') ;;
      *) if read -r c < "/proc/$pid/comm"; then printf 'pidcomm %s\n' "$c"; fi 2>/dev/null ;;
    esac
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
    # enabled at boot: an init script with a start link in a multi-user runlevel
    if [ -f "/etc/init.d/$name" ]; then
      rc=no
      for f in /etc/rc2.d/S*"$name" /etc/rc3.d/S*"$name" /etc/rc4.d/S*"$name" /etc/rc5.d/S*"$name"; do
        case ${f##*/} in S[0-9][0-9]"$name") [ -e "$f" ] && rc=yes ;; esac
      done
      printf 'rc %s\n' "$rc"
    else
      printf 'rc none\n'
    fi
  fi
}
PID1=unknown; read -r PID1 < /proc/1/comm 2>/dev/null || PID1=unknown
"""


# ---------------------------------------------------------------- what to look at


@dataclass(frozen=True)
class Probe:
    """The managed paths of a host: which to hash, which must never be read."""

    hashed: tuple[str, ...]  # regular files compared by sha256 (declared files, public keys)
    unhashed: tuple[str, ...]  # stat only (links, private keys)
    dirs: tuple[str, ...]  # owned directories to list
    secret: frozenset[str] = field(default_factory=frozenset)  # never fetch content


def probe_for(desired: Desired) -> Probe:
    hashed: dict[str, None] = {}
    unhashed: dict[str, None] = {}
    secret: set[str] = set()
    for f in desired.files:
        hashed[f.path] = None
        if f.secret:
            secret.add(f.path)
    if desired.firewall is not None:
        hashed[desired.firewall.persistent_path] = None
    for kp in desired.keypairs:
        unhashed[kp.private_path] = None
        secret.add(kp.private_path)
        hashed[kp.public_path] = None
    for lk in desired.links:
        unhashed[lk.path] = None
    for p in hashed:
        unhashed.pop(p, None)
    return Probe(
        hashed=tuple(hashed),
        unhashed=tuple(unhashed),
        dirs=tuple(desired.owned_dirs),
        secret=frozenset(secret),
    )


def build_script(desired: Desired, inventory_path: str = INVENTORY_PATH) -> tuple[str, list[str]]:
    """The observation script and its positional arguments (all user data is in the args)."""
    probe = probe_for(desired)
    b = ScriptBuilder()
    pairs = [f"h {b.ref(p)}" for p in probe.hashed] + [f"n {b.ref(p)}" for p in probe.unhashed]
    b.add("frame files st_pairs " + " ".join(pairs))
    for i, d in enumerate(probe.dirs):
        b.add(f"frame owned.{i} dir_stat {b.ref(d)}")
    inv = b.ref(inventory_path)
    b.add(f"frame inventory inv_cat {inv}")
    b.add(f"frame inventory.files inv_stat {inv}")
    b.add("frame pid1 printf '%s\\n' \"$PID1\"")
    b.add("frame iptables iptables-save")
    b.add("frame xfrm ip xfrm policy")
    b.add("frame addr ip -d -j addr show")
    b.add("frame charon charon_state")
    # swanctl only talks to a live charon (its vici socket); saves ~25 ms when there is none
    b.add("if [ -S /var/run/charon.vici ] || [ -S /run/charon.vici ]; then")
    b.add("  frame conns swanctl --list-conns")
    b.add("  frame sas swanctl --list-sas")
    b.add("fi")
    b.add(f"KMODS='{' '.join(token(m) for m in KERNEL_MODULES)}'")
    b.add("frame kernel kernel_facts")
    names = needed_packages(desired)
    if names:
        pkgs = b.refs(list(names))
        b.add(
            f"frame dpkg dpkg-query -W -f='${{Package}}\\t${{db:Status-Abbrev}}\\t${{Version}}\\n' -- {pkgs}"
        )
    for i, s in enumerate(desired.services):
        b.add(f"frame svc.{i} svc_probe {b.ref(s.name)} {b.refs(list(s.status))}".rstrip())
    return b.script(PRELUDE), b.args


# ---------------------------------------------------------------- framing


@dataclass(frozen=True)
class Section:
    id: str
    body: bytes
    exit_status: int | None  # None: the section never ended (script killed)
    stderr: str = ""


def split_sections(stdout: bytes, stderr: bytes = b"") -> dict[str, Section]:
    """Split the framed output into sections (bodies decoded from base64)."""
    errs = _split_stderr(stderr)
    out: dict[str, Section] = {}
    current: str | None = None
    chunks: list[bytes] = []
    for raw in stdout.split(b"\n"):
        line = raw.decode("ascii", errors="replace").rstrip("\r")
        if line.startswith(BEGIN):
            if current is not None:
                out[current] = Section(current, _b64(chunks), None, errs.get(current, ""))
            current, chunks = line[len(BEGIN) :].strip(), []
        elif line.startswith(END) and current is not None:
            parts = line[len(END) :].split()
            rc: int | None
            try:
                rc = int(parts[1]) if len(parts) > 1 else None
            except ValueError:
                rc = None
            out[current] = Section(current, _b64(chunks), rc, errs.get(current, ""))
            current, chunks = None, []
        elif current is not None:
            chunks.append(raw)
    if current is not None:
        out[current] = Section(current, _b64(chunks), None, errs.get(current, ""))
    return out


def _b64(chunks: list[bytes]) -> bytes:
    try:
        return base64.b64decode(b"".join(chunks))
    except (binascii.Error, ValueError):
        return b""


def _split_stderr(stderr: bytes) -> dict[str, str]:
    out: dict[str, list[str]] = {}
    current = ""
    for line in stderr.decode("utf-8", errors="replace").splitlines():
        if line.startswith(ERR):
            current = line[len(ERR) :].strip()
            continue
        out.setdefault(current, []).append(line)
    return {k: "\n".join(v).strip() for k, v in out.items()}


# ---------------------------------------------------------------- parsers


def parse_file_records(body: bytes) -> dict[str, FileState]:
    """``<b64 path> <kind> <mode> <owner> <group> <sha256|-> <b64 target|->`` per line."""
    kinds = {"f": "file", "l": "link", "d": "dir", "o": "other"}
    out: dict[str, FileState] = {}
    for line in body.decode("ascii", errors="replace").splitlines():
        parts = line.split()
        if len(parts) != 7:
            continue
        try:
            path = base64.b64decode(parts[0]).decode("utf-8", errors="surrogateescape")
        except (binascii.Error, ValueError):
            continue
        kind = parts[1]
        if kind == "m":
            out[path] = FileState(path=path, exists=False)
            continue
        target = None
        if kind == "l" and parts[6] != "-":
            try:
                target = base64.b64decode(parts[6]).decode("utf-8", errors="surrogateescape")
            except (binascii.Error, ValueError):
                target = None
            if target is not None and target.endswith("\n"):
                target = target[:-1]
        try:
            mode: int | None = int(parts[2], 8)
        except ValueError:
            mode = None
        sha = parts[5] if len(parts[5]) == 64 else None
        out[path] = FileState(
            path=path,
            exists=True,
            kind=kinds.get(kind, "other"),
            sha256=sha,
            mode=mode,
            owner=parts[3],
            group=parts[4],
            link_target=target,
        )
    return out


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


def parse_swanctl_conns(text: str) -> tuple[str, ...]:
    """Connection names from ``swanctl --list-conns`` (top-level ``name: IKEv2, ...`` lines)."""
    names = []
    for line in text.splitlines():
        if line and not line[0].isspace() and ": IKEv" in line:
            names.append(line.split(":", 1)[0])
    return tuple(names)


def parse_swanctl_sas(text: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(IKE_SA names ESTABLISHED, CHILD_SA names INSTALLED) from ``swanctl --list-sas``."""
    ike: list[str] = []
    children: list[str] = []
    for line in text.splitlines():
        if not line.strip() or ": #" not in line:
            continue
        name, rest = line.strip().split(": #", 1)
        states = [w.strip() for w in rest.split(",")]
        if not line[0].isspace():
            if "ESTABLISHED" in states:
                ike.append(name)
        elif "INSTALLED" in states:
            children.append(name)
    return tuple(dict.fromkeys(ike)), tuple(dict.fromkeys(children))


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

    files: dict[str, FileState] = {}
    for sid in sorted(sections):
        if sid.startswith("owned.") or sid == "inventory.files":
            for p, st in parse_file_records(sections[sid].body).items():
                files.setdefault(p, st)
    declared = sections.get("files")
    if declared is None or declared.exit_status is None:
        errors.append("files: no answer (observation cut short)")
    else:
        files.update(parse_file_records(declared.body))

    inventory: tuple[str, ...] = ()
    inv = sections.get("inventory")
    if inv is not None and inv.exit_status == 0:
        inventory, problem = parse_inventory(inv.body)
        if problem:
            errors.append(problem)

    pid1 = (body("pid1", "init system", required=False) or "").strip()
    init_system = "systemd" if pid1 == "systemd" else ("sysv" if pid1 else "unknown")

    iptables: IptablesState | None = None
    ipt = body("iptables", "iptables-save")
    if ipt is not None:
        try:
            iptables = canonical_iptables(ipt)
        except IptablesParseError as err:
            errors.append(f"iptables-save: unparsable output: {err}")

    policies: tuple[XfrmPolicy, ...] = ()
    xfrm = body("xfrm", "ip xfrm policy")
    if xfrm is not None:
        policies = parse_xfrm_policies(xfrm)

    links: tuple[LinkState, ...] = ()
    addr = body("addr", "ip addr")
    if addr is not None:
        try:
            links = parse_links(addr)
        except (json.JSONDecodeError, TypeError, AttributeError) as err:
            errors.append(f"ip addr: unparsable JSON: {err}")

    running = parse_charon(body("charon", "charon process", required=False) or "")
    conns: tuple[str, ...] = ()
    ike: tuple[str, ...] = ()
    children: tuple[str, ...] = ()
    if running and ("conns" in sections or "sas" in sections):
        conns = parse_swanctl_conns(body("conns", "swanctl --list-conns") or "")
        ike, children = parse_swanctl_sas(body("sas", "swanctl --list-sas") or "")
    elif running:
        errors.append("swanctl: charon runs but its vici socket (/var/run/charon.vici) is missing")
    ipsec = IpsecState(
        daemon_running=running,
        loaded_connections=conns,
        established_ike=ike,
        installed_children=children,
        policies=policies,
    )

    kernel = parse_kernel(body("kernel", "kernel facts", required=False) or "")

    packages: dict[str, PackageState] = {}
    names = needed_packages(desired)
    if names:
        dpkg = body("dpkg", "dpkg-query", ok=(0, 1))
        if dpkg is not None:
            packages = parse_dpkg(dpkg, names)

    services: dict[str, ServiceState] = {}
    for i, s in enumerate(desired.services):
        text = body(f"svc.{i}", f"service {s.name}")
        if text is not None:
            services[s.name] = parse_service(s.name, text)

    return Observed(
        host=host,
        files=MappingProxyType(dict(sorted(files.items()))),
        iptables=iptables,
        links=links,
        ipsec=ipsec,
        packages=MappingProxyType(packages),
        services=MappingProxyType(services),
        init_system=init_system,
        inventory=inventory,
        kernel=MappingProxyType(kernel),
        errors=tuple(errors),
    )


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


def build_fetch_script(paths: Iterable[str], stat_paths: Iterable[str]) -> tuple[str, list[str]]:
    b = ScriptBuilder()
    for i, p in enumerate(paths):
        b.add(f"frame content.{i} file_head {b.ref(p)} {CONTENT_LIMIT + 1}")
    stat = [f"n {b.ref(p)}" for p in stat_paths]
    if stat:
        b.add("frame files st_pairs " + " ".join(stat))
    return b.script(PRELUDE), b.args


# ---------------------------------------------------------------- entry point


async def observe_host(
    conn: Connection,
    desired: Desired,
    *,
    fetch_diffs: bool = True,
    timeout: float | None = None,
    inventory_path: str = INVENTORY_PATH,
) -> Observed:
    """Observe one host: one round trip, plus one more only for diff contents / odd paths.

    Raises Transient when the host cannot be reached or the script does not finish in time;
    a probe that fails inside the script is reported in ``Observed.errors``.
    """
    started = time.monotonic()
    script, args = build_script(desired, inventory_path)
    result = await conn.run_script(script, args=args, timeout=timeout)
    _check(conn, result)
    sections = split_sections(result.stdout, result.stderr)
    observed = parse_observation(conn.host, desired, sections)
    # inventory entries the script could not stat (JSON escapes): stat them now
    missing = tuple(p for p in observed.inventory if p not in observed.files)
    fetch = content_wanted(desired, observed) if fetch_diffs else ()
    round_trips = 1
    if fetch or missing:
        round_trips = 2
        script2, args2 = build_fetch_script(fetch, missing)
        result2 = await conn.run_script(script2, args=args2, timeout=timeout)
        _check(conn, result2)
        observed = _merge_fetch(observed, fetch, split_sections(result2.stdout, result2.stderr))
    log.debug(
        "observe.done",
        host=conn.host,
        seconds=round(time.monotonic() - started, 3),
        round_trips=round_trips,
        errors=len(observed.errors),
    )
    return observed


def _check(conn: Connection, result: CommandResult) -> None:
    if result.exit_status == 127 and b"@@reconciler:begin" not in result.stdout:
        raise Transient(f"host {conn.host}: cannot run sh for observation: {result.stderr[-200:]!r}")


def _merge_fetch(observed: Observed, fetched: tuple[str, ...], sections: Mapping[str, Section]) -> Observed:
    files = dict(observed.files)
    errors = list(observed.errors)
    for i, p in enumerate(fetched):
        sec = sections.get(f"content.{i}")
        st = files.get(p)
        if st is None:
            continue
        if sec is None or sec.exit_status != 0:
            errors.append(f"content of {p}: could not be read for the diff")
            continue
        if len(sec.body) > CONTENT_LIMIT:
            continue  # too big to diff: compared by hash only
        files[p] = replace(st, content=sec.body)
    extra = sections.get("files")
    if extra is not None:
        for p, st in parse_file_records(extra.body).items():
            files.setdefault(p, st)
    return replace(observed, files=MappingProxyType(dict(sorted(files.items()))), errors=tuple(errors))
