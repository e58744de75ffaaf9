"""Checks of the IPsec mesh: backend, mode and datapath, links, crypto policy (with the
``legacy_crypto`` escape hatch) and the hosts' public keys."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from reconciler.fleet import crypto
from reconciler.fleet import model as m
from reconciler.fleet.keys import KeyFileError, PublicKey, parse_public_key, weaknesses
from reconciler.fleet.semantic_context import CheckContext, Located
from reconciler.fleet.yamlsafe import Path, YamlDocument


class MeshChecks(CheckContext):
    def check_mesh(self, mesh: m.Mesh, hosts: Mapping[str, m.Host]) -> dict[str, set[str]] | None:
        doc = self.src.fleet
        assert doc is not None
        md = doc.data["mesh"]
        # backend / mode / datapath
        if mesh.datapath is m.Datapath.LIBIPSEC and mesh.mode is not m.MeshMode.TUNNEL:
            self.err(
                doc, ("mesh", "datapath"), "datapath libipsec has no transport mode: it needs mode: tunnel"
            )
        self.check_host_stacks(mesh, hosts)
        if mesh.backend is m.IpsecBackend.RACOON:
            if mesh.mode is not m.MeshMode.IPIP:
                self.err(
                    doc,
                    ("mesh", "mode"),
                    "backend racoon builds the seed's transport-mode IP-IP mesh: it needs mode: ipip",
                )
            if mesh.datapath is not m.Datapath.KERNEL:
                self.err(doc, ("mesh", "datapath"), "backend racoon needs datapath: kernel")
            self.warn(
                doc,
                ("mesh", "backend"),
                "backend racoon speaks only IKEv1 (deprecated by RFC 8247; racoon is unmaintained)",
            )
            for k in ("ike_proposals", "esp_proposals"):
                if k in md:
                    self.warn(doc, ("mesh", k), f"{k} is ignored with backend racoon (see mesh.racoon)")
        elif "racoon" in md and not any(h.ipsec is m.IpsecBackend.RACOON for h in hosts.values()):
            self.warn(doc, ("mesh", "racoon"), "mesh.racoon is ignored: no host runs racoon")
        # links
        # peers per host; None for a full mesh (every host is every other host's peer: never
        # enumerate the n*(n-1)/2 pairs, 50 million for 10,000 hosts)
        peers: dict[str, set[str]] | None = None
        if mesh.topology is m.Topology.FULL:
            if md.get("links"):
                self.err(doc, ("mesh", "links"), "links are only used with topology: links")
        else:
            peers = {}
            seen: dict[tuple[str, str], int] = {}
            for i, pair in enumerate(md.get("links") or ()):
                a, b = pair
                bad = False
                for j, n in enumerate(pair):
                    if n not in hosts:
                        bad = True
                        if n not in self.src.broken.get("Host", set()):
                            self.err(doc, ("mesh", "links", i, j), f"unknown host {n!r}")
                if a == b:
                    self.err(doc, ("mesh", "links", i), f"a host cannot link to itself ({a})")
                    continue
                key = (a, b) if a < b else (b, a)
                if key in seen:
                    self.err(
                        doc, ("mesh", "links", i), f"link {a}-{b} is listed twice (also links[{seen[key]}])"
                    )
                    continue
                seen[key] = i
                if not bad:
                    peers.setdefault(a, set()).add(b)
                    peers.setdefault(b, set()).add(a)
            if not seen:
                self.warn(doc, ("mesh", "topology"), "topology links with no links: no host talks IPsec")
        self.check_crypto(mesh, hosts, peers)
        self.check_mixed_links(mesh, hosts, peers)
        return peers

    def host_doc(self, name: str) -> YamlDocument | None:
        return next((d for d in self.src.docs.get("Host", ()) if d.data.get("name") == name), None)

    def check_host_stacks(self, mesh: m.Mesh, hosts: Mapping[str, m.Host]) -> None:
        """A host's own ``ipsec:`` against what the fleet's mesh can do."""
        if mesh.backend is m.IpsecBackend.RACOON:
            return  # the fleet-wide checks below say it once
        for h in hosts.values():
            if h.ipsec is not m.IpsecBackend.RACOON:
                continue
            doc = self.host_doc(h.name)
            if doc is None:
                continue
            if mesh.mode is not m.MeshMode.IPIP:
                self.err(
                    doc,
                    ("ipsec",),
                    "racoon builds the seed's transport-mode IP-IP mesh: it needs mesh.mode ipip",
                )
            if mesh.datapath is not m.Datapath.KERNEL:
                self.err(doc, ("ipsec",), "racoon needs mesh.datapath kernel (libipsec is strongSwan's)")
            self.warn(
                doc, ("ipsec",), "racoon speaks only IKEv1 (deprecated by RFC 8247; racoon is unmaintained)"
            )

    def check_mixed_links(
        self, mesh: m.Mesh, hosts: Mapping[str, m.Host], peers: dict[str, set[str]] | None
    ) -> None:
        """A link between a racoon host and a strongSwan host is IKEv1 with racoon's proposal:
        one of the fleet's strongSwan proposals must allow it (IKE and ESP), or the link can
        never come up. Reported once per racoon host, naming both ends' files."""
        doc = self.src.fleet
        assert doc is not None

        def stack(h: m.Host) -> m.IpsecBackend:
            return h.ipsec or mesh.backend

        racoon_hosts = sorted(n for n, h in hosts.items() if stack(h) is m.IpsecBackend.RACOON)
        if not racoon_hosts or len(racoon_hosts) == len(hosts):
            return
        ike = crypto.racoon_ike_proposal(mesh.racoon)
        esp = crypto.racoon_esp_proposal(mesh.racoon)
        missing = []
        if not crypto.common_proposal(mesh.ike_proposals, ike, ike=True):
            missing.append(
                f"no IKE proposal in common: racoon offers {ike} (mesh.racoon), the strongSwan end "
                f"accepts {', '.join(mesh.ike_proposals)} (mesh.ike_proposals)"
            )
        if not crypto.common_proposal(mesh.esp_proposals, esp, ike=False):
            missing.append(
                f"no ESP proposal in common: racoon offers {esp} (mesh.racoon sa_*, pfs_group), the "
                f"strongSwan end accepts {', '.join(mesh.esp_proposals)} (mesh.esp_proposals)"
            )
        if not missing:
            return
        fix = f"add {ike} to mesh.ike_proposals and {esp} to mesh.esp_proposals, or change mesh.racoon"
        for name in racoon_hosts:
            linked = sorted(hosts) if peers is None else sorted(peers.get(name, ()))
            others = [
                p for p in linked if p != name and p in hosts and stack(hosts[p]) is m.IpsecBackend.STRONGSWAN
            ]
            if not others:
                continue
            rdoc = self.host_doc(name)
            odoc = self.host_doc(others[0])
            more = f" (and {len(others) - 1} more strongSwan peers)" if len(others) > 1 else ""
            where = f"{odoc.file}" if odoc is not None else others[0]
            msg = (
                f"link {name} (racoon) - {others[0]} (strongswan, {where}){more} is IKEv1: "
                + "; ".join(missing)
                + f": {fix}"
            )
            if rdoc is not None:
                self.err(rdoc, ("ipsec",) if "ipsec" in rdoc.data else ("name",), msg)
            else:
                self.err(doc, ("mesh",), msg)

    def check_legacy_unused(self, hosts: list[Located]) -> None:
        """``legacy_crypto: true`` that nothing needs: a hatch left open for no reason."""
        if "*" in self.legacy_used:
            return
        for x in hosts:
            if x.obj.legacy_crypto and x.obj.name not in self.legacy_used:
                self.warn(
                    x.doc,
                    ("legacy_crypto",),
                    "legacy_crypto: true, but no proposal or key on this host's links is deprecated: "
                    "remove it (it would silently allow weak crypto added later)",
                )

    def legacy_block(self, hosts: Mapping[str, m.Host], names: Iterable[str]) -> list[str]:
        """The hosts among ``names`` that are NOT marked legacy_crypto."""
        return sorted({n for n in names if n in hosts and not hosts[n].legacy_crypto})

    def judge(self, doc: YamlDocument, path: Path, message: str, blockers: list[str]) -> None:
        if blockers:
            listed = ", ".join(blockers[:5]) + (f" and {len(blockers) - 5} more" if len(blockers) > 5 else "")
            self.err(
                doc,
                path,
                f"{message}; allowed only when every host on the link sets legacy_crypto: true "
                f"(not: {listed})",
            )
        else:
            self.legacy_used.add("*")
            self.warn(doc, path, f"{message} (allowed: every host on the link is legacy_crypto)")

    @staticmethod
    def linked_hosts(hosts: Mapping[str, m.Host], peers: dict[str, set[str]] | None) -> Iterable[str]:
        if peers is None:
            return hosts if len(hosts) >= 2 else ()
        return peers

    def check_crypto(
        self, mesh: m.Mesh, hosts: Mapping[str, m.Host], peers: dict[str, set[str]] | None
    ) -> None:
        doc = self.src.fleet
        assert doc is not None
        blockers = self.legacy_block(hosts, self.linked_hosts(hosts, peers))
        stacks = {h.ipsec or mesh.backend for h in hosts.values()} or {mesh.backend}
        if m.IpsecBackend.STRONGSWAN in stacks:
            for key, ike in (("ike_proposals", True), ("esp_proposals", False)):
                for i, proposal in enumerate(getattr(mesh, key)):
                    path: Path = ("mesh", key, i) if key in doc.data["mesh"] else ("mesh",)
                    for f in crypto.check_proposal(proposal, ike=ike):
                        msg = f"{proposal}: {f.message}"
                        if f.level == "invalid":
                            self.err(doc, path, msg)
                        elif f.level == "weak":
                            self.judge(doc, path, msg, blockers)
                        else:
                            self.warn(doc, path, msg)
        if m.IpsecBackend.RACOON in stacks:
            for f in crypto.check_racoon(mesh.racoon):
                path = ("mesh", "racoon", f.field)
                if f.level == "weak":
                    self.judge(doc, path, f.message, blockers)
                else:
                    self.warn(doc, path, f.message)

    def check_keys(
        self, mesh: m.Mesh, hosts: Mapping[str, m.Host], peers: dict[str, set[str]] | None
    ) -> dict[str, str]:
        everyone = self.legacy_block(hosts, hosts) if peers is None else []
        out: dict[str, str] = {}
        for host, (file, data) in sorted(self.src.keys.items()):
            if host not in hosts:
                if host not in self.src.broken.get("Host", set()):
                    self.at(file, f"public key for undeclared host {host!r}")
                continue
            try:
                key: PublicKey = parse_public_key(data)
            except KeyFileError as exc:
                self.at(file, str(exc))
                continue
            stack = hosts[host].ipsec or mesh.backend
            want = "racoon" if stack is m.IpsecBackend.RACOON else "pem"
            if key.format != want:
                need = "a racoon ': PUB 0s...' line" if want == "racoon" else "a PEM public key"
                who = (
                    f"backend {stack.value}"
                    if hosts[host].ipsec is None
                    else f"{host} (ipsec: {stack.value})"
                )
                self.at(file, f"{who} needs {need}")
                continue
            weak, warn = weaknesses(key)
            if peers is None:
                blockers = everyone if len(hosts) >= 2 else self.legacy_block(hosts, [host])
            else:
                blockers = self.legacy_block(hosts, {host, *peers.get(host, ())})
            for msg in weak:
                if blockers:
                    self.at(
                        file,
                        f"{msg}; allowed only when every host on its links sets legacy_crypto: true "
                        f"(not: {', '.join(blockers[:5])})",
                    )
                else:
                    self.legacy_used.update(
                        {host, *(peers or {}).get(host, ())} if peers is not None else {"*"}
                    )
                    self.at(file, f"{msg} (allowed: legacy_crypto)", severity="warning")
            for msg in warn:
                self.at(file, msg, severity="warning")
            out[host] = key.text
        return out
