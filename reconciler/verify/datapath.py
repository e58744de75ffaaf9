"""The datapath check: ping each peer's internal address over the mesh from the host's own
internal address while ``tcpdump`` captures on the public interface. The capture must show
ESP between the two public addresses (UDP-encapsulated on port 4500 with libipsec) and no
clear-text ICMP between the internal addresses, nor clear IP-IP (protocol 4) between the public
addresses (mode ipip: the tunnel packets must leave inside ESP).

One probe per host covers all its peers: one capture, the pings in parallel (fixed script,
addresses as arguments). The same probe makes the real TCP connects of the least-privilege
check (``reconciler.verify.reach``): one ``bash`` (``/dev/tcp``), every connect in parallel in
a forked subshell, those still waiting after the timeout killed (their SYN was dropped).
Parsing and the verdict are pure.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from reconciler.host.script import Runner
from reconciler.verify.checks import Check, failed, passed, skipped
from reconciler.verify.facts import PRELUDE, Section, run_sections

NAME = "datapath"

# TCP connects to "address port" pairs, all at once (one bash: /dev/tcp, a forked subshell
# per connect, so a connect still waiting at the timeout is killed with its subshell and nothing
# is left behind); $1 a scratch directory, $2 the timeout in microseconds. Each connect that
# ends says so on a FIFO; the helper waits on it with `read -t` (a builtin: no polling process)
# and returns as soon as every connect ended, or at the timeout. Prints
# "address port open|fail last-error-line" per connect that ended; one not listed got no answer.
REACH_FUNCTION = r"""
reach() {
  bash -c '
d=$1; t=$2; shift 2
mkfifo "$d/done" && exec 3<>"$d/done" || { echo "REACH-ERROR cannot make a FIFO in $d"; exit 0; }
n=0
while [ $# -ge 2 ]; do
  n=$((n + 1))
  ( exec 2>"$d/e$n"
    if : <>"/dev/tcp/$1/$2"; then echo "$1 $2 open"; else echo "$1 $2 fail"; fi >"$d/o$n"
    echo >&3 ) &
  shift 2
done
now=${EPOCHREALTIME/[.,]/}; end=$((now + t)); got=0
while [ "$got" -lt "$n" ]; do
  now=${EPOCHREALTIME/[.,]/}; left=$((end - now))
  [ "$left" -gt 0 ] || break
  read -r -t "$((left / 1000000)).$(printf %06d $((left % 1000000)))" _ <&3 || break
  got=$((got + 1))
done
kill $(jobs -rp) 2>/dev/null
wait 2>/dev/null
i=0
while [ "$i" -lt "$n" ]; do
  i=$((i + 1)); line=; err=
  [ -s "$d/o$i" ] && read -r line <"$d/o$i"
  [ -s "$d/e$i" ] && while IFS= read -r l; do err=${l##*: }; done <"$d/e$i"
  [ -n "$line" ] && printf "%s %s\n" "$line" "$err"
done
' reach "$@"
}
"""

PROBE_SCRIPT = (
    PRELUDE
    + REACH_FUNCTION
    + r"""
iface=$1; own=$2; cap=$3; count=$4; interval=$5; npeers=$6; ctimeout=$7; shift 7
command -v tcpdump >/dev/null 2>&1 || { frame notcpdump false; exit 0; }
# the connects first: their timeout runs while tcpdump starts and the pings go
connects=0
if [ "$#" -gt "$npeers" ] && command -v bash >/dev/null 2>&1; then
  mkdir "$d/reach" && (shift "$npeers"; reach "$d/reach" "$ctimeout" "$@" >"$d/reach.out") &
  rp=$!; connects=1
fi
filter='udp port 4500 or udp port 500 or esp or ah or icmp or ip proto 4'
tcpdump -n -l -i "$iface" -c "$cap" "$filter" >"$d/cap" 2>"$d/caperr" &
tp=$!
i=0
while ! grep -q 'listening on' "$d/caperr" 2>/dev/null; do
  kill -0 "$tp" 2>/dev/null || break
  i=$((i + 1)); [ "$i" -gt 100 ] && break
  sleep 0.05
done
pids=""
i=0
for peer in "$@"; do
  i=$((i + 1)); [ "$i" -gt "$npeers" ] && break
  ping -n -c "$count" -W 1 -i "$interval" -I "$own" "$peer" >"$d/ping-$peer" 2>&1 &
  pids="$pids $!"
done
for p in $pids; do wait "$p"; done
sleep 0.3
kill -INT "$tp" 2>/dev/null; wait "$tp"
[ "$connects" = 1 ] && wait "$rp"
frame capture cat "$d/cap"
frame caperr cat "$d/caperr"
i=0
for peer in "$@"; do
  i=$((i + 1)); [ "$i" -gt "$npeers" ] && break
  frame "ping:$peer" cat "$d/ping-$peer"
done
[ "$connects" = 1 ] && frame reach cat "$d/reach.out"
true
"""
)


@dataclass(frozen=True)
class ProbeRequest:
    interface: str
    own: str  # own internal address
    peers: tuple[str, ...]  # peer internal addresses
    count: int = 3
    interval: float = 0.2
    connects: tuple[tuple[str, int], ...] = ()  # (peer internal address, TCP port) to connect to
    connect_timeout: float = 1.5  # the kernel sends the SYN again at 1 s: two tries

    def args(self) -> list[str]:
        cap = str(max(64, 40 * len(self.peers) * self.count + 10 * len(self.connects)))
        targets = [w for address, port in self.connects for w in (address, str(port))]
        return [
            self.interface,
            self.own,
            cap,
            str(self.count),
            f"{self.interval:g}",
            str(len(self.peers)),
            str(round(self.connect_timeout * 1_000_000)),  # microseconds
            *self.peers,
            *targets,
        ]


async def run_probe(conn: Runner, request: ProbeRequest, *, timeout: float) -> dict[str, Section]:
    return await run_sections(conn, PROBE_SCRIPT, request.args(), timeout=timeout, what="datapath probe")


# ---------------------------------------------------------------- parsing (pure)

_PING = re.compile(r"(\d+) packets transmitted, (\d+) (?:packets )?received")
_LINE = re.compile(r"\bIP (\S+) > (\S+?):? (.*)$")


@dataclass(frozen=True)
class PingResult:
    transmitted: int
    received: int
    text: str

    @property
    def ok(self) -> bool:
        return self.received > 0


def parse_ping(text: str) -> PingResult:
    m = _PING.search(text)
    if not m:
        last = [line for line in text.strip().splitlines() if line.strip()]
        return PingResult(0, 0, last[-1] if last else "no output")
    return PingResult(int(m.group(1)), int(m.group(2)), m.group(0))


@dataclass(frozen=True)
class Packet:
    src: str  # address without port
    dst: str
    sport: int | None
    dport: int | None
    kind: str  # "esp-udp" (ESP in UDP 4500), "esp", "ah", "ike", "ipip" (clear IP-IP), "icmp", "other"
    line: str


def _split_addr(token: str) -> tuple[str, int | None]:
    parts = token.rstrip(":").split(".")
    if len(parts) == 5 and parts[4].isdigit():
        return ".".join(parts[:4]), int(parts[4])
    return ".".join(parts[:4]), None


def parse_capture(text: str) -> list[Packet]:
    """tcpdump -n lines (``IP a.b.c.d.port > e.f.g.h.port: ...``) as typed packets."""
    out: list[Packet] = []
    for line in text.splitlines():
        m = _LINE.search(line)
        if not m:
            continue
        src, sport = _split_addr(m.group(1))
        dst, dport = _split_addr(m.group(2))
        rest = m.group(3)
        if "ESP(" in rest and (sport == 4500 or dport == 4500 or "UDP-encap" in rest):
            kind = "esp-udp"
        elif "ESP(" in rest:
            kind = "esp"
        elif "AH(" in rest:
            kind = "ah"
        elif "isakmp" in rest or "NONESP-encap" in rest:
            kind = "ike"
        elif rest.startswith("IP ") or "ipip-proto-4" in rest:
            kind = "ipip"  # an IP packet inside a clear IP packet (protocol 4)
        elif "ICMP" in rest:
            kind = "icmp"
        else:
            kind = "other"
        out.append(Packet(src, dst, sport, dport, kind, line.strip()))
    return out


@dataclass(frozen=True)
class PairTraffic:
    esp_out: int  # ESP (any encapsulation) own public -> peer public
    esp_in: int
    esp_udp: int  # of which UDP-encapsulated (port 4500)
    clear_icmp: tuple[str, ...]  # clear-text ICMP lines between the internal addresses
    clear_ipip: tuple[str, ...] = ()  # clear IP-IP lines between the public addresses


def pair_traffic(
    packets: Sequence[Packet], *, own_public: str, peer_public: str, own_internal: str, peer_internal: str
) -> PairTraffic:
    esp_out = esp_in = esp_udp = 0
    clear: list[str] = []
    clear_ipip: list[str] = []
    internal = {own_internal, peer_internal}
    for p in packets:
        if p.kind in ("esp", "esp-udp"):
            if (p.src, p.dst) == (own_public, peer_public):
                esp_out += 1
            elif (p.src, p.dst) == (peer_public, own_public):
                esp_in += 1
            else:
                continue
            if p.kind == "esp-udp":
                esp_udp += 1
        elif p.kind == "icmp" and {p.src, p.dst} == internal:
            clear.append(p.line)
        elif p.kind == "ipip" and {p.src, p.dst} == {own_public, peer_public}:
            clear_ipip.append(p.line)
    return PairTraffic(esp_out, esp_in, esp_udp, tuple(clear), tuple(clear_ipip))


# ---------------------------------------------------------------- the check (pure)


def check(
    host: str,
    peer: str,
    *,
    probe: dict[str, Section] | None,
    probe_error: str | None,
    own_public: str,
    peer_public: str,
    own_internal: str,
    peer_internal: str,
    interface: str,
    skip_reason: str | None = None,
) -> Check:
    """Ping over the mesh and the capture on the public interface, for (host, peer)."""
    if skip_reason:
        return skipped(host, peer, NAME, skip_reason)
    if probe_error is not None or probe is None:
        return failed(host, peer, NAME, f"the datapath probe did not run: {probe_error or 'no result'}")
    if "notcpdump" in probe:
        return skipped(host, peer, NAME, f"tcpdump is not installed on {host}: cannot see the wire")
    ping_sec = probe.get(f"ping:{peer_internal}")
    ping = parse_ping(ping_sec.out if ping_sec else "")
    cap = probe.get("capture")
    caperr = probe.get("caperr")
    if cap is None or (caperr is not None and "listening on" not in caperr.out + caperr.err):
        why = (caperr.out + caperr.err).strip().splitlines()[-1:] if caperr else ["no capture"]
        return failed(host, peer, NAME, f"tcpdump could not capture on {interface}: {why[0] if why else '?'}")
    traffic = pair_traffic(
        parse_capture(cap.out),
        own_public=own_public,
        peer_public=peer_public,
        own_internal=own_internal,
        peer_internal=peer_internal,
    )
    details: dict[str, object] = {
        "ping_transmitted": ping.transmitted,
        "ping_received": ping.received,
        "esp_out": traffic.esp_out,
        "esp_in": traffic.esp_in,
        "esp_udp_encapsulated": traffic.esp_udp,
        "clear_icmp": len(traffic.clear_icmp),
        "clear_ipip": len(traffic.clear_ipip),
    }
    evidence = (
        f"ping {own_internal} -> {peer_internal}: {ping.received}/{ping.transmitted} replies; "
        f"{interface}: ESP {traffic.esp_out} out / {traffic.esp_in} in "
        f"({traffic.esp_udp} UDP-encapsulated, port 4500), clear-text ICMP {len(traffic.clear_icmp)}"
    )
    if traffic.clear_icmp:
        return failed(
            host,
            peer,
            NAME,
            f"clear-text ICMP between {own_internal} and {peer_internal} on {interface}: "
            f"{traffic.clear_icmp[0]}",
            evidence,
            details,
        )
    if traffic.clear_ipip:
        return failed(
            host,
            peer,
            NAME,
            f"clear IP-IP (not inside ESP) between {own_public} and {peer_public} on {interface}: "
            f"{traffic.clear_ipip[0]}",
            evidence,
            details,
        )
    if not ping.ok:
        cause = f"no reply from {peer} ({peer_internal}) over the mesh: {ping.text}"
        if traffic.esp_out and not traffic.esp_in:
            cause += f"; ESP left for {peer_public} but none came back"
        elif not traffic.esp_out:
            cause += f"; no ESP left {interface} for {peer_public}"
        return failed(host, peer, NAME, cause, evidence, details)
    if not (traffic.esp_out and traffic.esp_in):
        return failed(
            host,
            peer,
            NAME,
            f"ping answered but the capture on {interface} saw no ESP "
            f"{'from' if traffic.esp_out else 'to'} {peer_public}: traffic may not be protected",
            evidence,
            details,
        )
    return passed(host, peer, NAME, evidence, details)
