"""The Apache check: each site of the host answers (requested on the host itself, to
127.0.0.1 with the site's Host header) with ``Server: Apache`` (``ServerTokens Prod``) and
without any header the site declares removed (``X-Powered-By`` by default). Both the site
root and, when the site mounts an application (mod_jk), a path under the first mount are
requested: header removal is often scoped to the application's location. Pure evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass

from reconciler.fleet.model import Fleet, Host, Site
from reconciler.verify.checks import Check, failed, passed, skipped
from reconciler.verify.facts import HostFacts


@dataclass(frozen=True)
class Request:
    key: str  # section name suffix, e.g. "shop-0"
    site: str
    url: str
    host_header: str
    path: str


def sample_path(pattern: str) -> str:
    """A concrete path for a JkMount pattern: ``/shop/*`` -> ``/shop/reconciler-verify``."""
    path = pattern.replace("*", "reconciler-verify")
    return path if path.startswith("/") else "/" + path


def requests_for(fleet: Fleet, host: Host) -> list[Request]:
    from reconciler.domains.apache import sites_of

    out: list[Request] = []
    for site in sites_of(fleet, host):
        paths = ["/"]
        if site.mounts:
            paths.append(sample_path(site.mounts[0].path))
        scheme, port = ("https", site.tls.port) if site.tls is not None else ("http", site.port)
        for i, path in enumerate(paths):
            out.append(
                Request(
                    f"{site.name}-{i}",
                    site.name,
                    f"{scheme}://127.0.0.1:{port}{path}",
                    site.server_name,
                    path,
                )
            )
    return out


def parse_headers(text: str) -> tuple[str, dict[str, list[str]]]:
    """(status line, lower-case header name -> values) of the LAST response in ``curl -D -``
    output (a 100-continue or redirect block comes first)."""
    blocks = [b for b in text.replace("\r\n", "\n").split("\n\n") if b.strip().startswith("HTTP/")]
    if not blocks:
        return "", {}
    lines = blocks[-1].strip().splitlines()
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers.setdefault(name.strip().lower(), []).append(value.strip())
    return lines[0].strip(), headers


def check_site(host: str, site: Site, reqs: list[Request], facts: HostFacts) -> Check:
    name = f"apache.{site.name}"
    if facts.error is not None:
        return failed(host, "", name, f"cannot read {host}: {facts.error}")
    seen: list[str] = []
    problems: list[str] = []
    for r in reqs:
        sec = facts.get(f"http:{r.key}")
        if sec is None:
            problems.append(f"{r.path}: not requested")
            continue
        if sec.out.strip() == "NO-CURL":
            return skipped(host, "", name, f"curl is not installed on {host}: cannot request the site")
        status, headers = parse_headers(sec.out)
        if not status:
            err = (sec.err or sec.out).strip().splitlines()
            problems.append(
                f"{r.url} (Host: {r.host_header}) did not answer: {err[-1] if err else f'exit {sec.rc}'}"
            )
            continue
        server = headers.get("server", [])
        if server != ["Apache"]:
            problems.append(
                f"{r.path}: Server header is {server or 'missing'}, not exactly 'Apache' (ServerTokens Prod)"
            )
        for h in site.unset_headers:
            if h.lower() in headers:
                problems.append(f"{r.path}: {h}: {headers[h.lower()][0]} is present (declared removed)")
        seen.append(f"{r.path} -> {status.split(' ', 1)[-1]}, Server: {', '.join(server) or '-'}")
    evidence = f"Host: {site.server_name}: " + "; ".join(seen)
    if problems:
        return failed(host, "", name, "; ".join(problems), evidence)
    removed = ", ".join(site.unset_headers) or "nothing"
    return passed(host, "", name, evidence + f"; absent: {removed}")
