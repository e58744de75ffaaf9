"""Schema-valid document data -> model objects (pure conversion, defaults from model.py).

Only called on documents that passed their JSON Schema, so types and formats are known good;
what the schema cannot say (e.g. a network with host bits set) is left to ``semantic``.
"""

from __future__ import annotations

from collections.abc import Mapping
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network
from typing import Any

from reconciler.fleet import model as m


def network(text: str) -> IPv4Network:
    return IPv4Network(text, strict=False)


def any_network(text: str) -> IPv4Network | IPv6Network:
    """An IPv4 or IPv6 network (host bits are left to ``semantic``)."""
    return ip_network(text, strict=False)


def is_network(text: str) -> bool:
    """A port source that is a network (CIDR), not a host or role name."""
    return "/" in text


def v6_address(text: str | None) -> IPv6Address | None:
    """The schema only bounds the characters; ``semantic`` reports an unparsable address."""
    if text is None:
        return None
    try:
        return IPv6Address(text)
    except ValueError:
        return None


def _t(data: Mapping[str, Any], key: str, default: tuple[Any, ...] = ()) -> tuple[Any, ...]:
    value = data.get(key)
    return tuple(value) if value is not None else default


def host(d: Mapping[str, Any], file: str) -> m.Host:
    ssh = d.get("ssh") or {}
    base = m.SshSpec()
    return m.Host(
        name=d["name"],
        public_address=IPv4Address(d["public_address"]),
        internal_address=IPv4Address(d["internal_address"]),
        roles=_t(d, "roles"),
        ssh=m.SshSpec(
            user=ssh.get("user", base.user),
            port=ssh.get("port", base.port),
            host_keys=_t(ssh, "host_keys"),
        ),
        public_interface=d.get("public_interface", "eth0"),
        legacy_crypto=bool(d.get("legacy_crypto", False)),
        source_file=file,
        public_address_v6=v6_address(d.get("public_address_v6")),
        ipsec=m.IpsecBackend(d["ipsec"]) if "ipsec" in d else None,
        site=d.get("site"),
    )


def mesh(d: Mapping[str, Any]) -> m.Mesh:
    base = m.Mesh(internal_network=network(d["internal_network"]))
    lt = d.get("lifetimes") or {}
    rc = d.get("racoon") or {}
    rbase = m.RacoonProposal()
    racoon = m.RacoonProposal(**{k: rc.get(k, getattr(rbase, k)) for k in rbase.__dataclass_fields__})
    lbase = m.Lifetimes()
    lifetimes = m.Lifetimes(**{k: lt.get(k, getattr(lbase, k)) for k in lbase.__dataclass_fields__})
    pairs: set[tuple[str, str]] = set()
    for a, b in d.get("links") or ():
        if a != b:
            pairs.add((a, b) if a < b else (b, a))
    links = tuple(sorted(pairs))
    return m.Mesh(
        internal_network=base.internal_network,
        backend=m.IpsecBackend(d.get("backend", base.backend)),
        mode=m.MeshMode(d.get("mode", base.mode)),
        datapath=m.Datapath(d.get("datapath", base.datapath)),
        ike_proposals=_t(d, "ike_proposals", base.ike_proposals),
        esp_proposals=_t(d, "esp_proposals", base.esp_proposals),
        lifetimes=lifetimes,
        racoon=racoon,
        topology=m.Topology(d.get("topology", base.topology)),
        links=links,
        dpd_seconds=d.get("dpd_seconds", base.dpd_seconds),
        trust=m.MeshTrust(d.get("trust", base.trust)),
    )


def firewall(d: Mapping[str, Any]) -> m.FirewallPolicy:
    return m.FirewallPolicy(
        management_sources=tuple(_networks(d["management_sources"])),
        management_port=d.get("management_port", 22),
        allow_icmp=d.get("allow_icmp", True),
        log_drops=d.get("log_drops", False),
    )


def _networks(texts: Any) -> list[IPv4Network | IPv6Network]:
    out: list[IPv4Network | IPv6Network] = []
    for t in texts:
        try:
            out.append(any_network(t))
        except ValueError:
            continue  # reported by ``semantic`` with its line
    return out


def drift(d: Mapping[str, Any] | None) -> m.DriftPolicy:
    base = m.DriftPolicy()
    if not d:
        return base
    return m.DriftPolicy(
        paths=_t(d, "paths", base.paths),
        exclude=_t(d, "exclude", base.exclude),
        secret_paths=_t(d, "secret_paths", base.secret_paths),
        secret_content=_t(d, "secret_content", base.secret_content),
        max_file_bytes=d.get("max_file_bytes", base.max_file_bytes),
        interval_seconds=d.get("interval_seconds", base.interval_seconds),
        mode=m.DriftMode(d.get("mode", base.mode)),
    )


def notifications(d: Mapping[str, Any] | None) -> m.Notifications:
    mail = (d or {}).get("mail")
    if not mail:
        return m.Notifications()
    smtp = mail.get("smtp") or {}
    base = m.SmtpSettings()
    return m.Notifications(
        mail=m.MailSettings(
            to=tuple(mail["to"]),
            sender=mail["from"],
            smtp=m.SmtpSettings(
                host=smtp.get("host", base.host),
                port=smtp.get("port", base.port),
                security=m.SmtpSecurity(smtp.get("security", base.security)),
                username_env=smtp.get("username_env"),
                password_env=smtp.get("password_env"),
            ),
        )
    )


def role(d: Mapping[str, Any], file: str) -> m.Role:
    return m.Role(
        name=d["name"],
        packages=_t(d, "packages"),
        purge_packages=_t(d, "purge_packages"),
        services=tuple(s if isinstance(s, str) else s["name"] for s in d.get("services") or ()),
        service_packages=tuple(
            (s["name"], s["package"]) for s in d.get("services") or () if not isinstance(s, str)
        ),
        replaces=_t(d, "replaces"),
        ports=tuple(
            m.ServicePort(
                port=p["port"],
                protocol=p.get("protocol", "tcp"),
                # networks only: host and role names are resolved by ``semantic``, which
                # knows every host and role
                sources=tuple(_networks(s for s in p.get("sources") or () if is_network(s))),
                name=p.get("name", ""),
            )
            for p in d.get("ports") or ()
        ),
        sites=_t(d, "sites"),
        apparmor=_t(d, "apparmor"),
        files=_t(d, "files"),
        source_file=file,
        sysctl=tuple(sorted((str(k), str(v)) for k, v in (d.get("sysctl") or {}).items())),
    )


def site(d: Mapping[str, Any], file: str) -> m.Site:
    base = m.Site(name="", server_name="")
    tls = d.get("tls")
    return m.Site(
        name=d["name"],
        server_name=d["server_name"],
        aliases=_t(d, "aliases"),
        server_admin=d.get("server_admin", base.server_admin),
        document_root=d.get("document_root", base.document_root),
        port=d.get("port", base.port),
        log_level=d.get("log_level", base.log_level),
        workers=tuple(
            m.JkWorker(
                name=w["name"],
                host=w.get("host", "127.0.0.1"),
                port=w.get("port", 8009),
                type=w.get("type", "ajp13"),
                lbfactor=w.get("lbfactor", 1),
                members=_t(w, "members"),
                sticky_session=bool(w.get("sticky_session", True)),
            )
            for w in d.get("workers") or ()
        ),
        mounts=tuple(m.JkMount(path=x["path"], worker=x["worker"]) for x in d.get("mounts") or ()),
        unmounts=tuple(m.JkMount(path=x["path"], worker=x["worker"]) for x in d.get("unmounts") or ()),
        compression=_t(d, "compression"),
        expires=tuple(
            m.ExpiresRule(mime_type=x["type"], seconds=x["seconds"]) for x in d.get("expires") or ()
        ),
        unset_headers=_t(d, "unset_headers", base.unset_headers),
        header_location=d.get("header_location"),
        tls=None
        if tls is None
        else m.TlsSpec(
            certificate_file=tls["certificate_file"],
            key_file=tls["key_file"],
            chain_file=tls.get("chain_file"),
            port=tls.get("port", 443),
        ),
        source_file=file,
    )


def apparmor(d: Mapping[str, Any], file: str) -> m.AppArmorProfile:
    return m.AppArmorProfile(
        name=d["name"],
        content=d.get("content"),
        rules=_t(d, "rules"),
        moved_directories=tuple(
            m.MovedDirectory(old=x["from"], new=x["to"]) for x in d.get("moved_directories") or ()
        ),
        source_file=file,
    )


def managed_file(d: Mapping[str, Any], file: str) -> m.ManagedFile:
    reload = d.get("reload")
    cd = d.get("controlled_dir")
    return m.ManagedFile(
        name=d["name"],
        path=d["path"],
        content=d.get("content"),
        template=d.get("template"),
        link_target=d.get("link_target"),
        mode=int(d.get("mode", "0644"), 8),
        owner=d.get("owner", "root"),
        group=d.get("group", "root"),
        secret=bool(d.get("secret", False)),
        validate=_t(d, "validate"),
        reload=None
        if reload is None
        else m.ReloadHandler(service=reload["service"], command=tuple(reload["command"])),
        source_file=file,
        package=d.get("package"),
        controlled_dir=None if cd is None else m.ControlledDir(path=cd["path"], user=cd.get("user")),
    )
