"""IPsec checks: charon runs, both sides declare mirrored connections for each other, each
holds the other's real public key, the IKE SA and the CHILD_SA with the peer are up (on both
sides, with matching SPIs), and charon's log has no new, unrecovered errors.

swanctl's output is parsed in ``reconciler.kinds.ipsec_state`` (shared with observe).
Everything here is pure: it works on recorded output.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from reconciler.kinds.ipsec_state import ChildSa, ConnConf, IkeSa, ViciParseError, parse_conns, parse_sas
from reconciler.verify.checks import Check, failed, passed, skipped
from reconciler.verify.facts import HostFacts, Section
from reconciler.verify.ipsec_log import LogRead, parse_key_hashes

T = TypeVar("T")

KERNEL_ESP_MISSING = (
    "child SA not installed: the kernel has no ESP (xfrm state add ... {error}); use datapath libipsec"
)


@dataclass(frozen=True)
class PairNames:
    """The names the strongSwan domain renders for a pair (see reconciler.domains.strongswan)."""

    conn_to_peer: str  # on the host: the connection to the peer, e.g. mesh-web2
    child_to_peer: str  # e.g. mesh-web2-net
    conn_to_host: str  # on the peer: the connection to the host
    child_to_host: str


@dataclass(frozen=True)
class Side:
    """One side of a pair as verify needs it."""

    name: str
    public: str
    internal: str
    facts: HostFacts


def charon_running(facts: HostFacts) -> tuple[bool, str]:
    """(running, evidence or cause)."""
    if facts.error is not None:
        return False, f"cannot read {facts.host}: {facts.error}"
    pid = facts.get("charon")
    stats = facts.get("stats")
    if pid is None or not pid.ok or not pid.out.strip():
        return False, f"charon is not running on {facts.host} (no live process in /run/charon.pid)"
    if stats is None or not stats.ok:
        why = (stats.err or stats.out).strip().splitlines()[-1:] if stats else ["no answer"]
        return (
            False,
            f"charon (pid {pid.out.strip()}) on {facts.host} does not answer vici: {why[0] if why else '?'}",
        )
    return True, f"charon pid {pid.out.strip()} runs and answers vici (swanctl --stats)"


def daemon_check(facts: HostFacts) -> Check:
    ok, text = charon_running(facts)
    if ok:
        return passed(facts.host, "", "ipsec.daemon", text)
    return failed(facts.host, "", "ipsec.daemon", text)


def _swanctl(facts: HostFacts, sid: str, parse: Callable[[str], T]) -> tuple[T | None, str]:
    """One swanctl view of a host, parsed (``reconciler.kinds.ipsec_state``), or why not."""
    sec = facts.get(sid)
    if facts.error is not None:
        return None, f"cannot read {facts.host}: {facts.error}"
    if sec is None or not sec.ok:
        return None, f"swanctl --list-{sid} failed on {facts.host}: {_last(sec)}"
    try:
        return parse(sec.out), ""
    except ViciParseError as err:
        return None, f"cannot parse swanctl --list-{sid} on {facts.host}: {err}"


def _conns(facts: HostFacts) -> tuple[dict[str, ConnConf] | None, str]:
    return _swanctl(facts, "conns", parse_conns)


def _sas(facts: HostFacts) -> tuple[tuple[IkeSa, ...] | None, str]:
    return _swanctl(facts, "sas", parse_sas)


def _last(sec: Section | None) -> str:
    if sec is None:
        return "not run"
    lines = (sec.err or sec.out).strip().splitlines()
    return lines[-1] if lines else f"exit {sec.rc}"


def config_check(a: Side, b: Side, names: PairNames) -> Check:
    """Both sides declare mirrored connections for each other."""
    name = "ipsec.config"
    ca, why = _conns(a.facts)
    if ca is None:
        return failed(a.name, b.name, name, why)
    cb, why = _conns(b.facts)
    if cb is None:
        return failed(a.name, b.name, name, why)
    mine, theirs = ca.get(names.conn_to_peer), cb.get(names.conn_to_host)
    if mine is None:
        return failed(
            a.name,
            b.name,
            name,
            f"{a.name} has no connection {names.conn_to_peer} loaded (swanctl --list-conns)",
        )
    if theirs is None:
        return failed(
            a.name,
            b.name,
            name,
            f"{b.name} has no connection {names.conn_to_host} loaded (swanctl --list-conns)",
        )
    problems: list[str] = []
    if mine.local_addrs != (a.public,) or theirs.remote_addrs != (a.public,):
        problems.append(
            f"{a.name} address: {a.name} local_addrs {list(mine.local_addrs)}, "
            f"{b.name} remote_addrs {list(theirs.remote_addrs)}, fleet {a.public}"
        )
    if mine.remote_addrs != (b.public,) or theirs.local_addrs != (b.public,):
        problems.append(
            f"{b.name} address: {a.name} remote_addrs {list(mine.remote_addrs)}, "
            f"{b.name} local_addrs {list(theirs.local_addrs)}, fleet {b.public}"
        )
    if mine.local_id != theirs.remote_id or mine.remote_id != theirs.local_id:
        problems.append(
            f"identities differ: {a.name} {mine.local_id} -> {mine.remote_id}, "
            f"{b.name} {theirs.local_id} -> {theirs.remote_id}"
        )
    cm, ct = mine.child(names.child_to_peer), theirs.child(names.child_to_host)
    if cm is None or ct is None:
        missing = names.child_to_peer if cm is None else names.child_to_host
        where = a.name if cm is None else b.name
        problems.append(f"{where} has no child {missing}")
    else:
        if cm.local_ts != ct.remote_ts or cm.remote_ts != ct.local_ts:
            problems.append(
                f"traffic selectors differ: {a.name} {list(cm.local_ts)} === {list(cm.remote_ts)}, "
                f"{b.name} {list(ct.local_ts)} === {list(ct.remote_ts)}"
            )
        if cm.mode != ct.mode:
            problems.append(f"modes differ: {a.name} {cm.mode}, {b.name} {ct.mode}")
    if problems:
        return failed(a.name, b.name, name, "; ".join(problems))
    assert cm is not None
    return passed(
        a.name,
        b.name,
        name,
        f"{a.name} {mine.name} {a.public} -> {b.public} ({mine.local_id} -> {mine.remote_id}), "
        f"{cm.name} {cm.mode} {','.join(cm.local_ts)} === {','.join(cm.remote_ts)}; "
        f"{b.name} {theirs.name} mirrors it",
    )


def keys_check(a: Side, b: Side, *, key_file_a: str, key_file_b: str, pubkey_dir: str) -> Check:
    """Each side holds the other's real public key (hash of the DER of the key derived from
    its private key vs the hash of the copy in the other's pubkey directory)."""
    name = "ipsec.keys"
    for f in (a.facts, b.facts):
        if f.error is not None:
            return failed(a.name, b.name, name, f"cannot read {f.host}: {f.error}")
    problems: list[str] = []
    evidence: list[str] = []
    for holder, owner, file in ((a, b, key_file_b), (b, a, key_file_a)):
        own = owner.facts.get("ownkey")
        if own is None or not own.ok or not own.out.split():
            problems.append(f"{owner.name} has no usable private key ({_last(own)})")
            continue
        real = own.out.split()[0]
        copies = parse_key_hashes(holder.facts.get("peerkeys").out if holder.facts.get("peerkeys") else "")  # type: ignore[union-attr]
        copy = copies.get(file)
        if copy is None:
            problems.append(f"{holder.name} has no public key for {owner.name} ({pubkey_dir}/{file})")
        elif copy != real:
            problems.append(
                f"{holder.name}'s public key for {owner.name} ({pubkey_dir}/{file}, sha256 {copy[:16]}) "
                f"is not {owner.name}'s key (sha256 {real[:16]})"
            )
        else:
            evidence.append(f"{holder.name} holds {owner.name}'s key (sha256 {real[:16]})")
    if problems:
        return failed(a.name, b.name, name, "; ".join(problems), "; ".join(evidence))
    return passed(a.name, b.name, name, "; ".join(evidence))


def _log_hint(read: LogRead | None, conn: str) -> str:
    if read is None:
        return ""
    errs = [e for e in read.errors if e.connection == conn and not e.recovered]
    return f"; log: {errs[-1].line}" if errs else ""


def _child_up(ike: IkeSa, child: str) -> ChildSa | None:
    return next((c for c in ike.children if c.name == child and c.state == "INSTALLED"), None)


def _pick_pair(
    sas_a: Sequence[IkeSa], conn_a: str, sas_b: Sequence[IkeSa], conn_b: str, names: PairNames
) -> tuple[IkeSa | None, IkeSa | None]:
    """The IKE SA on each side to judge. When both sides initiated (trap policies woken by
    traffic from both ends) there may be two IKE SAs per side: prefer the pair whose SPIs
    match, with paired CHILD_SAs if any; else each side's first ESTABLISHED one."""
    up_a = [s for s in sas_a if s.name == conn_a and s.state == "ESTABLISHED"]
    up_b = [s for s in sas_b if s.name == conn_b and s.state == "ESTABLISHED"]
    matching = [
        (x, y)
        for x in up_a
        for y in up_b
        if (x.initiator_spi, x.responder_spi) == (y.initiator_spi, y.responder_spi)
    ]

    def score(pair: tuple[IkeSa, IkeSa]) -> int:
        ca, cb = _child_up(pair[0], names.child_to_peer), _child_up(pair[1], names.child_to_host)
        return 1 if ca and cb and ca.spi_in == cb.spi_out else 0

    if matching:
        return max(matching, key=score)
    return _find_ike(sas_a, conn_a), _find_ike(sas_b, conn_b)


def _find_ike(sas: Sequence[IkeSa], conn: str) -> IkeSa | None:
    up = [s for s in sas if s.name == conn and s.state == "ESTABLISHED"]
    if up:
        return up[0]
    return next((s for s in sas if s.name == conn), None)


def sa_checks(
    a: Side,
    b: Side,
    names: PairNames,
    *,
    log_a: LogRead | None,
    log_b: LogRead | None,
    kernel_esp_error: str | None,
) -> list[Check]:
    """``ipsec.ike`` and ``ipsec.child`` for (a, b), from both sides' SA lists."""
    out: list[Check] = []
    ok_a, why_a = charon_running(a.facts)
    ok_b, why_b = charon_running(b.facts)
    if not (ok_a and ok_b):
        cause = why_a if not ok_a else f"peer {why_b}"
        return [failed(a.name, b.name, "ipsec.ike", cause), failed(a.name, b.name, "ipsec.child", cause)]
    sas_a, why = _sas(a.facts)
    sas_b, why2 = _sas(b.facts)
    if sas_a is None or sas_b is None:
        cause = why or why2
        return [failed(a.name, b.name, "ipsec.ike", cause), failed(a.name, b.name, "ipsec.child", cause)]
    ike_a, ike_b = _pick_pair(sas_a, names.conn_to_peer, sas_b, names.conn_to_host, names)
    # IKE
    ike_ok = False
    if ike_a is None or ike_a.state != "ESTABLISHED":
        state = f"state {ike_a.state}" if ike_a else "none"
        cause = f"no ESTABLISHED IKE SA {names.conn_to_peer} on {a.name} ({state})" + _log_hint(
            log_a, names.conn_to_peer
        )
        out.append(failed(a.name, b.name, "ipsec.ike", cause))
    elif ike_b is None or ike_b.state != "ESTABLISHED":
        state = f"state {ike_b.state}" if ike_b else "none"
        cause = (
            f"{a.name} shows IKE SA {names.conn_to_peer} ESTABLISHED but {b.name} has none "
            f"({names.conn_to_host}: {state}): stale on {a.name}" + _log_hint(log_b, names.conn_to_host)
        )
        out.append(failed(a.name, b.name, "ipsec.ike", cause))
    elif (ike_a.initiator_spi, ike_a.responder_spi) != (ike_b.initiator_spi, ike_b.responder_spi):
        out.append(
            failed(
                a.name,
                b.name,
                "ipsec.ike",
                f"IKE SA SPIs differ: {a.name} {ike_a.initiator_spi}/{ike_a.responder_spi}, "
                f"{b.name} {ike_b.initiator_spi}/{ike_b.responder_spi} (one side is stale)",
            )
        )
    elif ike_a.remote_host != b.public:
        out.append(
            failed(
                a.name,
                b.name,
                "ipsec.ike",
                f"IKE SA {names.conn_to_peer} on {a.name} goes to {ike_a.remote_host}, not {b.public}",
            )
        )
    else:
        ike_ok = True
        out.append(
            passed(
                a.name,
                b.name,
                "ipsec.ike",
                f"IKE SA {ike_a.name}#{ike_a.uniqueid} ESTABLISHED "
                f"{ike_a.local_host} <-> {ike_a.remote_host}, "
                f"SPIs {ike_a.initiator_spi}/{ike_a.responder_spi} on both sides",
            )
        )
    # CHILD
    name = "ipsec.child"
    if not ike_ok or ike_a is None or ike_b is None:
        out.append(failed(a.name, b.name, name, "no CHILD_SA without an established IKE SA (see ipsec.ike)"))
        return out
    ch_a, ch_b = _child_up(ike_a, names.child_to_peer), _child_up(ike_b, names.child_to_host)
    if ch_a is None or ch_b is None:
        where = a.name if ch_a is None else b.name
        sad = (log_a.sad_install_failures if log_a else ()) + (log_b.sad_install_failures if log_b else ())
        evidence = f"log: {sad[-1]}" if sad else ""
        if kernel_esp_error is not None:
            return out + [
                skipped(
                    a.name,
                    b.name,
                    name,
                    KERNEL_ESP_MISSING.format(error=kernel_esp_error),
                    evidence or f"no INSTALLED CHILD_SA on {where}",
                )
            ]
        child = names.child_to_peer if ch_a is None else names.child_to_host
        cause = f"CHILD_SA {child} not installed on {where}"
        if sad:
            cause += f" ({sad[-1]})"
        else:
            cause += _log_hint(
                log_a if ch_a is None else log_b, names.conn_to_peer if ch_a is None else names.conn_to_host
            )
        return out + [failed(a.name, b.name, name, cause, evidence)]
    if ch_a.spi_in != ch_b.spi_out or ch_a.spi_out != ch_b.spi_in:
        return out + [
            failed(
                a.name,
                b.name,
                name,
                f"CHILD_SA SPIs do not pair: {a.name} in {ch_a.spi_in}/out {ch_a.spi_out}, "
                f"{b.name} in {ch_b.spi_in}/out {ch_b.spi_out}",
            )
        ]
    encap = "ESP in UDP" if ch_a.encap else ch_a.protocol
    out.append(
        passed(
            a.name,
            b.name,
            name,
            f"CHILD_SA {ch_a.name} INSTALLED {ch_a.mode} {encap}, SPIs in {ch_a.spi_in} / out {ch_a.spi_out} "
            f"pair with {b.name}; {','.join(ch_a.local_ts)} === {','.join(ch_a.remote_ts)}",
            {"encap": ch_a.encap, "mode": ch_a.mode},
        )
    )
    return out


# what charon logs when the kernel refuses the CHILD_SA's SAs/policies (no ESP in the kernel)
_KERNEL_INSTALL = re.compile(
    r"\(SAD\)|\(SPD\)|SAD entry|SPD entry|in kernel|netlink|failed to establish CHILD_SA|"
    r"TS_UNACCEPTABLE|NO_PROPOSAL_CHOSEN|CHILD_SA .*failed",
    re.IGNORECASE,
)


def log_checks(
    facts: HostFacts,
    read: LogRead | None,
    conn_to_peer: Mapping[str, str],
    *,
    kernel_esp_error: str | None = None,
) -> list[Check]:
    """``ipsec.log`` for the host (untagged errors) and per peer (errors of its connection).
    With ``kernel_esp_error`` set (kernel datapath, no ESP in the kernel), errors that are the
    kernel refusing the CHILD_SA are explained by that, and the check is skipped with it."""
    host = facts.host
    if read is None:
        sec = facts.get("log")
        why = f"cannot read {host}: {facts.error}" if facts.error else f"log not read ({_last(sec)})"
        return [failed(host, "", "ipsec.log", why)]
    if not read.present:
        return [skipped(host, "", "ipsec.log", "charon writes no log file (/var/log/charon.log is missing)")]
    out: list[Check] = []
    trunc = " (only the newest 256 KiB read)" if read.truncated else ""
    known = set(conn_to_peer)
    untagged = [e for e in read.errors if e.connection not in known and not e.recovered]
    recovered_all = [e for e in read.errors if e.recovered]
    if untagged:
        out.append(
            failed(
                host,
                "",
                "ipsec.log",
                f"{len(untagged)} new error line(s): {untagged[-1].line}",
                f"{read.lines_read} new lines{trunc}",
            )
        )
    else:
        note = (
            f"; {len(recovered_all)} error(s) recovered since (connection re-established)"
            if recovered_all
            else ""
        )
        out.append(
            passed(
                host,
                "",
                "ipsec.log",
                f"{read.lines_read} new lines since the last verify, no new errors{trunc}{note}",
            )
        )
    for conn, peer in sorted(conn_to_peer.items(), key=lambda kv: kv[1]):
        errs = [e for e in read.errors if e.connection == conn]
        bad = [e for e in errs if not e.recovered]
        if kernel_esp_error is not None and bad and all(_KERNEL_INSTALL.search(e.line) for e in bad):
            out.append(
                skipped(
                    host,
                    peer,
                    "ipsec.log",
                    KERNEL_ESP_MISSING.format(error=kernel_esp_error),
                    f"{len(bad)} error(s) for {conn}, all the kernel refusing the CHILD_SA: {bad[-1].line}",
                )
            )
        elif bad:
            out.append(failed(host, peer, "ipsec.log", f"{len(bad)} new error(s) for {conn}: {bad[-1].line}"))
        else:
            extra = f" ({len(errs)} recovered)" if errs else ""
            out.append(passed(host, peer, "ipsec.log", f"no new errors for {conn}{extra}"))
    return out


def kernel_esp_error(facts: HostFacts) -> str | None:
    """The error of the kernel-ESP probe (None when the probe did not run or succeeded)."""
    sec = facts.get("kernel_esp")
    if sec is None or sec.ok:
        return None
    lines = (sec.err or sec.out).strip().splitlines()
    text = lines[-1] if lines else f"exit {sec.rc}"
    return text.removeprefix("Error: ").rstrip(".") + ""


def skip_all(host: str, peer: str, reason: str) -> list[Check]:
    return [
        skipped(host, peer, n, reason) for n in ("ipsec.config", "ipsec.keys", "ipsec.ike", "ipsec.child")
    ]
