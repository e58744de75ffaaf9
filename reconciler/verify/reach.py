"""The least-privilege check, for real: TCP connects over the mesh from a peer to the host.

For an ordered pair (host, peer), the peer's datapath probe connected from its own internal
address to the host's internal address on every TCP port the host declares (its roles' ports)
and on its management SSH port (sshd listens there on every host: a port a peer must usually
NOT reach). What the firewall must do is the fleet's answer (``domains.firewall_access``):
a port declared for the peer (or its role, or a network holding its internal address, or to
anyone, or ``mesh.trust: all``) must connect; any other must be dropped (no answer at all: the
policy is DROP).

Reading a result: ``open`` = connected; ``refused`` = the host's kernel answered with a reset,
so the firewall let the SYN in (nothing listens there, or only on another address);
``timeout`` = the SYN got no answer (dropped); ``unreachable`` = the peer has no route to the
host's internal address (the SA is down). A dropped connect proves the firewall only when the
mesh path between the two works: the same probe's ping (or another port that answered) is the
evidence; without it the port is inconclusive. Pure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from reconciler.verify.checks import Check, failed, passed, skipped
from reconciler.verify.datapath import parse_ping
from reconciler.verify.facts import Section

NAME = "firewall.reach"


@dataclass(frozen=True)
class Expect:
    """One TCP port of the host and whether the peer's mesh traffic must reach it."""

    port: int
    admit: bool
    label: str  # "80/tcp (http)", "management SSH"


@dataclass(frozen=True)
class Result:
    outcome: str  # open | refused | unreachable | timeout | error
    detail: str = ""


def parse_reach(text: str) -> dict[tuple[str, int], Result]:
    """The probe's ``reach`` section: ``address port open|fail last-error`` per line; a
    target that is not listed got no answer before the timeout."""
    out: dict[tuple[str, int], Result] = {}
    for line in text.splitlines():
        words = line.split(" ", 3)
        if len(words) < 3 or not words[1].isdigit():
            continue
        key = (words[0], int(words[1]))
        err = words[3].strip() if len(words) > 3 else ""
        if words[2] == "open":
            out[key] = Result("open")
        elif "refused" in err.lower():
            out[key] = Result("refused", err)
        elif "unreachable" in err.lower() or "no route" in err.lower():
            out[key] = Result("unreachable", err)
        else:
            out[key] = Result("error", err or "connect failed")
    return out


def parse_listening(text: str) -> set[int]:
    """TCP ports with a listening socket reachable from outside (bound to any address or a
    non-loopback one), from /proc/net/tcp and /proc/net/tcp6."""
    ports: set[int] = set()
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4 or fields[3] != "0A" or ":" not in fields[1]:
            continue
        addr, _, port = fields[1].rpartition(":")
        if addr in ("0100007F", "00000000000000000000000001000000"):  # 127.0.0.1, ::1
            continue
        try:
            ports.add(int(port, 16))
        except ValueError:
            continue
    return ports


def check(
    host: str,
    peer: str,
    *,
    expects: Sequence[Expect],
    host_internal: str,
    probe: Mapping[str, Section] | None,
    probe_error: str | None,
    listen: Section | None,
    skip_reason: str | None = None,
) -> Check:
    """``peer``'s connects to ``host``'s internal address against what the fleet declares."""
    if skip_reason:
        return skipped(host, peer, NAME, skip_reason)
    if not expects:
        return skipped(host, peer, NAME, f"{host} declares no TCP port to check")
    if probe_error is not None or probe is None:
        return failed(
            host, peer, NAME, f"the connect probe on {peer} did not run: {probe_error or 'no result'}"
        )
    sec = probe.get("reach")
    if sec is None:
        why = "tcpdump is not installed there" if "notcpdump" in probe else "no bash, or it was cut short"
        return skipped(host, peer, NAME, f"{peer}'s probe made no connects ({why})")
    if sec.out.startswith("REACH-ERROR"):
        return failed(host, peer, NAME, f"the connect probe on {peer} failed: {sec.out[12:].strip()}")
    results = parse_reach(sec.out)
    listening = parse_listening(listen.out) if listen is not None and listen.ok else None
    ping = probe.get(f"ping:{host_internal}")
    path_ok = parse_ping(ping.out).ok if ping is not None else False
    answered = any(
        results.get((host_internal, e.port), Result("timeout")).outcome in ("open", "refused")
        for e in expects
    )
    evidence_path = path_ok or answered
    bad: list[str] = []
    good: list[str] = []
    unsure: list[str] = []
    for e in expects:
        r = results.get((host_internal, e.port), Result("timeout"))
        where = f"{host}:{e.port} ({e.label}) from {peer}"
        listens = listening is not None and e.port in listening
        if r.outcome in ("unreachable", "error"):
            (bad if e.admit else unsure).append(f"{where}: {r.detail or r.outcome}")
        elif e.admit and r.outcome == "open":
            good.append(f"{where}: connected (declared)")
        elif e.admit and r.outcome == "refused":
            if listens:
                bad.append(f"{where}: refused ({r.detail}) although {host} listens there")
            else:
                good.append(f"{where}: admitted (nothing listens: {host}'s kernel reset it)")
        elif e.admit:
            bad.append(f"{where}: no answer: declared for {peer} but dropped (firewall or mesh)")
        elif r.outcome == "timeout":
            if evidence_path:
                good.append(f"{where}: dropped (not declared)")
            else:
                unsure.append(f"{where}: no answer, but the mesh path did not answer either (no ping reply)")
        else:
            how = "connected" if r.outcome == "open" else f"reached {host}'s kernel ({r.detail})"
            bad.append(f"{where}: {how} although not declared for {peer} (least privilege)")
    details: dict[str, object] = {"checked": len(good) + len(bad), "inconclusive": len(unsure)}
    evidence = "; ".join(good + [f"inconclusive: {u}" for u in unsure])
    if bad:
        return failed(host, peer, NAME, "; ".join(bad), evidence, details)
    if not good:
        return skipped(host, peer, NAME, "; ".join(unsure) or "no conclusive connect", evidence, details)
    return passed(host, peer, NAME, evidence, details)
