"""Run every check for every selected host and each of its peers, concurrently over the
connection pool, each host under a timeout; one unreachable host fails only its own checks
and those of the pairs it is part of.

Per host, at most two SSH round trips: the datapath probe (pings to every peer while tcpdump
captures; it also wakes trap-based SAs on the kernel datapath), then the facts script. Peers
that are not selected are read too (without their log cursor or probes) because every pair
check compares both sides. The evaluation is pure (``evaluate``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv6Address, IPv6Network

from reconciler.domains import apparmor as apparmor_domain
from reconciler.domains.firewall_access import port_access
from reconciler.domains.keys import SWANCTL_PUBKEY_DIR, strongswan_keypair
from reconciler.domains.strongswan import child_name, connection_name
from reconciler.domains.tunnels import tunnel_name
from reconciler.errors import ReconcilerError
from reconciler.fleet.model import Datapath, Fleet, Host, IpsecBackend, MeshMode, MeshTrust
from reconciler.host.script import Pool
from reconciler.log import get_logger
from reconciler.verify import apache, apparmor, datapath, firewall, firewall6, ipsec, ipsec_log, reach
from reconciler.verify.checks import Check, VerifyReport, failed, skipped
from reconciler.verify.facts import FactsRequest, HostFacts, Sections, read_facts

log = get_logger(__name__)


NO_PROBE_REASON = "the datapath probe was not asked for (--no-datapath)"


@dataclass(frozen=True)
class VerifyOptions:
    host_timeout: float = 60.0  # per host, both round trips
    ping_count: int = 3
    ping_interval: float = 0.2
    datapath: bool = True  # run the ping + capture probe
    datapath_skip_reason: str = NO_PROBE_REASON  # shown on the datapath check when not run
    connect_timeout: float = 1.5  # a least-privilege connect with no answer by then was dropped
    advance_cursor: bool = True  # remember how far the charon log was read
    max_concurrency: int = 64


def select_hosts(fleet: Fleet, hosts: Iterable[str] | None) -> list[str]:
    names = list(fleet.host_names())
    wanted = list(dict.fromkeys(hosts or ()))
    if not wanted:
        return names
    unknown = [h for h in wanted if h not in names]
    if unknown:
        raise ReconcilerError(f"unknown host(s): {', '.join(unknown)} (fleet has: {', '.join(names)})")
    return wanted


def runs_ipsec(fleet: Fleet, host: Host) -> bool:
    return bool(fleet.peers_of(host)) and fleet.mesh.backend is IpsecBackend.STRONGSWAN


def facts_request(fleet: Fleet, host: Host, *, selected: bool, options: VerifyOptions) -> FactsRequest:
    ipsec_on = runs_ipsec(fleet, host)
    sites: tuple[tuple[str, str, str], ...] = ()
    profiles: tuple[str, ...] = ()
    if selected:
        sites = tuple((r.key, r.url, r.host_header) for r in apache.requests_for(fleet, host))
        profiles = tuple(apparmor_domain.profile_path(p) for p in apparmor_domain.profiles_of(fleet, host))
    return FactsRequest(
        interface=host.public_interface,
        private_key=strongswan_keypair(host).private_path if ipsec_on else "",
        pubkey_dir=SWANCTL_PUBKEY_DIR,
        ipsec=ipsec_on,
        read_log=selected and ipsec_on,
        advance_cursor=options.advance_cursor,
        esp_probe=selected and ipsec_on and fleet.mesh.datapath is Datapath.KERNEL,
        sites=sites,
        profiles=profiles,
        listen=options.datapath and ipsec_on,
    )


def reach_expects(fleet: Fleet, target: Host, source: Host) -> list[reach.Expect]:
    """The TCP ports of ``target`` that ``source`` connects to over the mesh, and whether each
    must connect."""
    return [
        reach.Expect(p.port, p.admit, p.label)
        for p in firewall.port_probes(fleet, target, source)
        if p.protocol == "tcp"
    ]


async def gather_host(
    fleet: Fleet, host: Host, pool: Pool, *, selected: bool, options: VerifyOptions
) -> HostFacts:
    """Probe (if selected) then read facts; never raises: errors land in the HostFacts."""
    probe: Sections = {}
    probe_error: str | None = None
    started = time.monotonic()
    try:
        conn = await asyncio.wait_for(pool.get(host.name), options.host_timeout)
    except (ReconcilerError, OSError, TimeoutError) as err:
        return HostFacts(host.name, error=_why(err, options.host_timeout))
    if selected and options.datapath and runs_ipsec(fleet, host):
        peers = fleet.peers_of(host)
        req = datapath.ProbeRequest(
            interface=host.public_interface,
            own=str(host.internal_address),
            peers=tuple(str(p.internal_address) for p in peers),
            count=options.ping_count,
            interval=options.ping_interval,
            connects=tuple(
                (str(p.internal_address), e.port) for p in peers for e in reach_expects(fleet, p, host)
            ),
            connect_timeout=options.connect_timeout,
        )
        try:
            probe = await datapath.run_probe(conn, req, timeout=options.host_timeout)
        except (ReconcilerError, OSError, RuntimeError, TimeoutError) as err:
            probe_error = _why(err, options.host_timeout)
    left = max(5.0, options.host_timeout - (time.monotonic() - started))
    try:
        request = facts_request(fleet, host, selected=selected, options=options)
        sections = await read_facts(conn, request, timeout=left)
    except (ReconcilerError, OSError, RuntimeError, TimeoutError) as err:
        return HostFacts(host.name, probe=probe, error=_why(err, left), probe_error=probe_error)
    return HostFacts(host.name, sections=sections, probe=probe, probe_error=probe_error)


def _why(err: BaseException, timeout: float) -> str:
    if isinstance(err, TimeoutError):
        return f"timed out after {timeout:g} s"
    return str(err) or type(err).__name__


def evaluate(
    fleet: Fleet,
    selected: Iterable[str],
    facts: Mapping[str, HostFacts],
    *,
    datapath_probe: bool = True,
    skip_reason: str = NO_PROBE_REASON,
) -> list[Check]:
    """Every check for the selected hosts, from the facts read. Pure."""
    checks: list[Check] = []
    for name in selected:
        host = fleet.host(name)
        f = facts[name]
        if f.error is not None:
            # one failure per host and per pair, not one per check
            checks.append(failed(name, "", "ssh", f"cannot read {name}: {f.error}"))
            checks += [
                failed(name, p.name, "ssh", f"cannot read {name}: {f.error}") for p in fleet.peers_of(host)
            ]
            continue
        checks += _host_checks(fleet, host, f)
        for peer in fleet.peers_of(host):
            checks += _pair_checks(fleet, host, peer, f, facts[peer.name], datapath_probe, skip_reason)
    return checks


def v6_probes(fleet: Fleet, host: Host) -> list[firewall6.Probe6]:
    fw = fleet.firewall
    return firewall6.probes(
        own=host.public_address_v6 or IPv6Address("2001:db8::1"),
        interface=host.public_interface,
        allow_icmp=fw.allow_icmp,
        management_port=fw.management_port,
        management_sources=[n for n in fw.management_sources if isinstance(n, IPv6Network)],
        ports=[
            (a, [v6 for v6 in (fleet.host(h).public_address_v6 for h in a.hosts) if v6 is not None])
            for a in port_access(fleet, host)
        ],
    )


def _host_checks(fleet: Fleet, host: Host, f: HostFacts) -> list[Check]:
    out: list[Check] = [firewall6.check(host.name, f, v6_probes(fleet, host))]
    if runs_ipsec(fleet, host):
        out.append(ipsec.daemon_check(f))
        read = _log_of(fleet, host, f)
        conns = {connection_name(p): p.name for p in fleet.peers_of(host)}
        esp_error = ipsec.kernel_esp_error(f) if fleet.mesh.datapath is Datapath.KERNEL else None
        out += ipsec.log_checks(f, read, conns, kernel_esp_error=esp_error)
    reqs = apache.requests_for(fleet, host)
    for site in {r.site: None for r in reqs}:
        out.append(apache.check_site(host.name, fleet.sites[site], [r for r in reqs if r.site == site], f))
    profiles = apparmor_domain.profiles_of(fleet, host)
    if profiles:
        out += apparmor.parse_checks(
            host.name, [(p.name, apparmor_domain.profile_path(p)) for p in profiles], f
        )
        out.append(apparmor.loaded_check(host.name, [p.name for p in profiles], f))
    return out


def _log_of(fleet: Fleet, host: Host, f: HostFacts) -> ipsec_log.LogRead | None:
    sec = f.get("log")
    if sec is None or not sec.ok:
        return None
    addrs = {str(p.public_address): connection_name(p) for p in fleet.peers_of(host)}
    return ipsec_log.parse_log_section(sec.out, addrs)


def _pair_checks(
    fleet: Fleet,
    host: Host,
    peer: Host,
    fa: HostFacts,
    fb: HostFacts,
    datapath_probe: bool = True,
    skip_reason: str = NO_PROBE_REASON,
) -> list[Check]:
    a, b = host.name, peer.name
    mesh = fleet.mesh
    out = [
        firewall.check(
            a,
            b,
            fa,
            own_public=host.public_address,
            peer_public=peer.public_address,
            own_internal=host.internal_address,
            peer_internal=peer.internal_address,
            interface=host.public_interface,
            mode=mesh.mode,
            datapath=mesh.datapath,
            ports=firewall.port_probes(fleet, host, peer),
            trust_all=mesh.trust is MeshTrust.ALL,
            peer_tunnel=tunnel_name(peer.name) if mesh.mode is MeshMode.IPIP else "",
        )
    ]
    if mesh.backend is not IpsecBackend.STRONGSWAN:
        reason = "verify checks strongSwan meshes only; racoon (IKEv1) needs PF_KEY, which this kernel lacks"
        return (
            out
            + ipsec.skip_all(a, b, reason)
            + [skipped(a, b, datapath.NAME, reason), skipped(a, b, reach.NAME, reason)]
        )
    side_a = ipsec.Side(a, str(host.public_address), str(host.internal_address), fa)
    side_b = ipsec.Side(b, str(peer.public_address), str(peer.internal_address), fb)
    names = ipsec.PairNames(
        connection_name(peer), child_name(fleet, peer), connection_name(host), child_name(fleet, host)
    )
    out.append(ipsec.config_check(side_a, side_b, names))
    out.append(
        ipsec.keys_check(
            side_a,
            side_b,
            key_file_a=f"{a}.pem",
            key_file_b=f"{b}.pem",
            pubkey_dir=SWANCTL_PUBKEY_DIR,
        )
    )
    esp_error = None
    if mesh.datapath is Datapath.KERNEL:
        esp_error = ipsec.kernel_esp_error(fa) or ipsec.kernel_esp_error(fb)
    out += ipsec.sa_checks(
        side_a,
        side_b,
        names,
        log_a=_log_of(fleet, host, fa),
        log_b=_log_of(fleet, peer, fb),
        kernel_esp_error=esp_error,
    )
    skip = None if datapath_probe else skip_reason
    if esp_error is not None:
        skip = (
            f"the kernel has no ESP (xfrm state add ... {esp_error}): mesh traffic cannot flow "
            "over the kernel datapath here; use datapath libipsec"
        )
    out.append(
        datapath.check(
            a,
            b,
            probe=dict(fa.probe) if fa.probe else None,
            probe_error=fa.probe_error or fa.error,
            own_public=str(host.public_address),
            peer_public=str(peer.public_address),
            own_internal=str(host.internal_address),
            peer_internal=str(peer.internal_address),
            interface=host.public_interface,
            skip_reason=skip,
        )
    )
    # the peer's connects to this host over the mesh (its probe made them)
    reach_skip = skip
    if reach_skip is None and fb.error is None and not fb.probe and fb.probe_error is None:
        reach_skip = f"the connect probe runs on {b}, which was not probed (not selected)"
    out.append(
        reach.check(
            a,
            b,
            expects=reach_expects(fleet, host, peer),
            host_internal=str(host.internal_address),
            probe=fb.probe if fb.probe else None,
            probe_error=fb.probe_error or fb.error,
            listen=fa.get("listen"),
            skip_reason=reach_skip,
        )
    )
    return out


async def verify_fleet(
    fleet: Fleet, hosts: Iterable[str] | None, pool: Pool, *, options: VerifyOptions | None = None
) -> VerifyReport:
    """Verify the selected hosts (all when ``hosts`` is empty/None) against their peers."""
    opts = options or VerifyOptions()
    started = time.monotonic()
    names = select_hosts(fleet, hosts)
    needed = list(dict.fromkeys(names + [p.name for n in names for p in fleet.peers_of(fleet.host(n))]))
    sem = asyncio.Semaphore(opts.max_concurrency)

    async def one(name: str) -> HostFacts:
        async with sem:
            try:
                return await asyncio.wait_for(
                    gather_host(fleet, fleet.host(name), pool, selected=name in names, options=opts),
                    opts.host_timeout + 10,
                )
            except TimeoutError:
                return HostFacts(name, error=f"timed out after {opts.host_timeout + 10:g} s")

    results = await asyncio.gather(*(one(n) for n in needed))
    facts = {f.host: f for f in results}
    # Evaluating is pure CPU (seconds for a 50-host mesh: 2,450 pairs): in a worker thread, so
    # the caller's event loop (the daemon answering webhooks and /healthz) keeps running.
    checks = await asyncio.to_thread(
        evaluate, fleet, names, facts, datapath_probe=opts.datapath, skip_reason=opts.datapath_skip_reason
    )
    pairs = [(n, p.name) for n in names for p in fleet.peers_of(fleet.host(n))]
    report = VerifyReport.build(
        checks, names, pairs, seconds=time.monotonic() - started, finished_at=time.time()
    )
    c = report.counts()
    log.info("verify.done", hosts=len(names), ok=report.ok, seconds=round(report.seconds, 2), **c)
    return report
