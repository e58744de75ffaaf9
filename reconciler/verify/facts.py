"""What verify reads from a host, in one SSH round trip: fixed shell scripts (no fleet data
in their text: every value is a positional argument) whose output is framed by
``reconciler.host.script`` (a random per-run nonce on stdin), so no log line or config can
forge a frame.

Read-only except for two things, both documented in docs/VERIFY.md: the charon log cursor
(``/var/lib/reconciler/verify/charon-log.cursor``, so the next run reads only new lines) and
the kernel-ESP probe, which runs ``ip xfrm state add`` in a throw-away network namespace
(``unshare --net``) and so never touches the host's own IPsec state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from reconciler.domains.strongswan import SWANCTL_CLIENT_CONF
from reconciler.host.script import Runner, prelude, run_framed
from reconciler.host.script import Section as Frame
from reconciler.host.script import split_sections as split_frames
from reconciler.host.state import VERIFY_CURSOR_PATH

CURSOR_PATH = VERIFY_CURSOR_PATH
LOG_TAIL_BYTES = 262144  # read at most this much new log per run
STDERR_BYTES = 4096


@dataclass(frozen=True)
class Section:
    name: str
    rc: int
    out: str
    err: str = ""

    @property
    def ok(self) -> bool:
        return self.rc == 0


Sections = Mapping[str, Section]


def empty_sections() -> Sections:
    return MappingProxyType({})


@dataclass(frozen=True)
class HostFacts:
    """The framed sections read from one host (facts), and its datapath probe if one ran.
    ``error`` is set when the host could not be read at all (unreachable, timeout)."""

    host: str
    sections: Sections = field(default_factory=empty_sections)
    probe: Sections = field(default_factory=empty_sections)
    error: str | None = None
    probe_error: str | None = None

    def get(self, name: str) -> Section | None:
        return self.sections.get(name)


# The framing (reconciler.host.script: ``frame ID CMD...``, nonce on stdin) and what the
# scripts share: a scratch directory, swanctl without its crypto plugins.
PRELUDE = (
    prelude()
    + r"""
set -u
d=$(mktemp -d /tmp/.reconciler-verify.XXXXXX) || exit 97
trap 'rm -rf "$d"' EXIT
# swanctl loads every crypto plugin at start (~10 ms a call); listing needs none: the rendered
# client settings load one tiny plugin (plain swanctl where they are not applied yet)
swanctl_q() {
  if [ -r SWANCTL_CLIENT_CONF ]; then STRONGSWAN_CONF=SWANCTL_CLIENT_CONF swanctl "$@"; else swanctl "$@"; fi
}
""".replace("SWANCTL_CLIENT_CONF", SWANCTL_CLIENT_CONF)
)

# Facts: charon, swanctl views, keys, firewall (IPv4, IPv6), listening sockets, links, charon log
# (from the cursor), kernel ESP probe, HTTP header probes of the sites, AppArmor parse of the
# profiles.
FACTS_SCRIPT = (
    PRELUDE
    + r"""
iface=$1; priv=$2; pubdir=$3; cursor=$4; log=$5; readlog=$6; espprobe=$7; ipsec=$8; nsites=$9
shift 9
ip6=$1; listen=$2
shift 2
charon_pid() { p=$(cat /run/charon.pid 2>/dev/null) && [ -n "$p" ] && kill -0 "$p" && echo "$p"; }
own_key() { openssl pkey -in "$1" -pubout -outform DER >"$d/own.der" && sha256sum <"$d/own.der"; }
# the peers' public keys as they are (public: safe to read); hashed by the caller
peer_keys() {
  set -- "$1"/*.pem
  [ -e "$1" ] || return 0
  tail -v -n +1 -- "$@"
}
read_log() {
  [ -f "$1" ] || { echo "NOLOG"; return 0; }
  ino=$(stat -c %i "$1"); size=$(stat -c %s "$1"); off=0
  if [ -r "$2" ] && read -r cino coff <"$2"; then
    if [ "$cino" = "$ino" ] && [ "$coff" -le "$size" ] 2>/dev/null; then off=$coff; fi
  fi
  start=$off
  if [ $((size - off)) -gt LOG_TAIL_BYTES ]; then start=$((size - LOG_TAIL_BYTES)); fi
  echo "CURSOR $ino $off $size $start"
  tail -c +$((start + 1)) "$1" | head -c $((size - start))
  if [ "$3" = 1 ]; then
    mkdir -p "${2%/*}" && printf '%s %s\n' "$ino" "$size" >"$2.tmp" && mv -f "$2.tmp" "$2"
  fi
}
esp_probe() {
  unshare --net ip xfrm state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x00000101 \
    mode tunnel enc 'cbc(aes)' 0x000102030405060708090a0b0c0d0e0f \
    auth-trunc 'hmac(sha256)' 0x000102030405060708090a0b0c0d0e0f000102030405060708090a0b0c0d0e0f 128
}
http_head() {
  command -v curl >/dev/null 2>&1 || { echo "NO-CURL"; return 0; }
  curl -sS -k -o /dev/null -D - --max-time 5 -H "Host: $2" "$1"
}
aa_state() {
  printf 'enabled=%s\n' "$(cat /sys/module/apparmor/parameters/enabled 2>/dev/null || echo absent)"
  if [ -r /sys/kernel/security/apparmor/profiles ]; then cat /sys/kernel/security/apparmor/profiles; fi
}
aa_parse() {
  command -v apparmor_parser >/dev/null 2>&1 || { echo "NO-PARSER"; return 0; }
  apparmor_parser -Q -K "$1"
}
if [ "$ipsec" = 1 ]; then
  frame charon charon_pid
  frame stats swanctl_q --stats
  frame conns swanctl_q --list-conns --pretty
  frame sas swanctl_q --list-sas --pretty
  frame ownkey own_key "$priv"
  frame peerkeys peer_keys "$pubdir"
  frame links ip -o link show
  advance=0; [ "$readlog" = 1 ] && advance=1
  [ "$readlog" != 0 ] && frame log read_log "$log" "$cursor" "$advance"
  [ "$espprobe" = 1 ] && frame kernel_esp esp_probe
fi
frame iptables iptables-save -t filter
if [ "$ip6" = 1 ] && [ -e /proc/net/if_inet6 ]; then frame ip6tables ip6tables-save -t filter
elif [ "$ip6" = 1 ]; then frame ip6tables echo NO-IPV6
fi
# listening TCP sockets (for the connect checks: what a refused connect means)
[ "$listen" = 1 ] && frame listen cat /proc/net/tcp /proc/net/tcp6
frame iface ip -o addr show dev "$iface"
i=0
while [ "$i" -lt "$nsites" ]; do
  frame "http:$1" http_head "$2" "$3"
  shift 3; i=$((i + 1))
done
if [ "$#" -gt 0 ]; then frame apparmor aa_state; fi
for p in "$@"; do frame "aa:$p" aa_parse "$p"; done
true
"""
).replace("LOG_TAIL_BYTES", str(LOG_TAIL_BYTES))


def view(sections: Mapping[str, Frame]) -> dict[str, Section]:
    """The framed sections (``reconciler.host.script.split_sections``) as verify reads them:
    text, exit status -1 for a section cut off, stderr capped."""
    return {
        k: Section(k, -1 if v.exit_status is None else v.exit_status, v.text, v.stderr[:STDERR_BYTES])
        for k, v in sections.items()
    }


def split_sections(stdout: bytes, nonce: str, stderr: bytes = b"") -> dict[str, Section]:
    return view(split_frames(stdout, stderr, nonce=nonce))


async def run_sections(
    conn: Runner, script: str, args: Sequence[str], *, timeout: float, what: str
) -> dict[str, Section]:
    """Run one of verify's framed scripts; its sections (RuntimeError if none came back)."""
    run = await run_framed(conn, script, args, timeout=timeout)
    if not run.sections:
        res = run.result
        err = res.stderr.decode(errors="replace").strip().splitlines()
        raise RuntimeError(f"{what} exited {res.exit_status}: {err[-1] if err else 'no output'}")
    return view(run.sections)


@dataclass(frozen=True)
class FactsRequest:
    """What to read on one host."""

    interface: str
    private_key: str = ""
    pubkey_dir: str = ""
    ipsec: bool = True
    read_log: bool = True
    advance_cursor: bool = True
    esp_probe: bool = False
    sites: tuple[tuple[str, str, str], ...] = ()  # (site name, URL, Host header)
    profiles: tuple[str, ...] = ()  # AppArmor profile paths
    ipv6: bool = True  # read ip6tables-save
    listen: bool = False  # read the listening TCP sockets
    log_path: str = "/var/log/charon.log"
    cursor_path: str = CURSOR_PATH

    def args(self) -> list[str]:
        readlog = "0" if not self.read_log else ("1" if self.advance_cursor else "2")
        out = [
            self.interface,
            self.private_key or "/nonexistent",
            self.pubkey_dir or "/nonexistent",
            self.cursor_path,
            self.log_path,
            readlog,
            "1" if self.esp_probe else "0",
            "1" if self.ipsec else "0",
            str(len(self.sites)),
            "1" if self.ipv6 else "0",
            "1" if self.listen else "0",
        ]
        for site in self.sites:
            out += list(site)
        out += list(self.profiles)
        return out


async def read_facts(conn: Runner, request: FactsRequest, *, timeout: float) -> dict[str, Section]:
    return await run_sections(conn, FACTS_SCRIPT, request.args(), timeout=timeout, what="facts script")
