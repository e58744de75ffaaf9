"""Apache rendering: modules and their dependencies, mod_jk, TLS, hardening, bad input."""

from __future__ import annotations

import pytest
from services_fleets import example_fleet, shop_site
from services_golden import render_services

from reconciler.domains import apache
from reconciler.errors import RenderError
from reconciler.fleet.model import JkMount, JkWorker, Site, TlsSpec
from reconciler.kinds.resources import Desired


def web(*sites: Site) -> Desired:
    fleet = example_fleet(sites=sites or (shop_site(),))
    return render_services(fleet, fleet.host("web1"))


def text(desired: Desired, suffix: str) -> str:
    return next(f for f in desired.files if f.path.endswith(suffix)).content.decode()


def enabled(desired: Desired) -> set[str]:
    return {lk.path.rsplit("/", 1)[1] for lk in desired.links if "/mods-enabled/" in lk.path}


def test_links_are_what_a2enmod_and_a2ensite_write() -> None:
    d = web()
    for lk in d.links:
        directory, name = lk.path.rsplit("/", 1)
        kind = directory.rsplit("/", 1)[1].replace("-enabled", "-available")
        assert lk.target == f"../{kind}/{name}", lk
        assert lk.handler == "apache2"
    assert all(f.handler == "apache2" for f in d.files if f.path.startswith("/etc/apache2/"))


def test_tls_enables_ssl_with_its_dependencies_and_renders_a_second_vhost() -> None:
    tls = TlsSpec(
        certificate_file="/etc/ssl/certs/shop.pem",
        key_file="/etc/ssl/private/shop.key",
        chain_file="/etc/ssl/certs/chain.pem",
    )
    d = web(shop_site(tls=tls))
    for name in (
        "ssl.load",
        "ssl.conf",
        "socache_shmcb.load",
        "setenvif.load",
        "setenvif.conf",
        "mime.load",
        "mime.conf",
    ):
        assert name in enabled(d), name
    site = text(d, "/shop.conf")
    assert "<VirtualHost *:80>" in site and "<VirtualHost *:443>" in site
    assert "SSLEngine on" in site
    assert "SSLCertificateKeyFile /etc/ssl/private/shop.key" in site
    assert "SSLCertificateChainFile /etc/ssl/certs/chain.pem" in site
    # both vhosts carry the same mounts
    assert site.count("JkMount /shop/* shop") == 2
    # 443 is opened by Debian's ports.conf once ssl is loaded
    assert "Listen" not in text(d, apache.HARDENING_CONF)
    # no key material is rendered, only paths
    assert not any(f.path.startswith("/etc/ssl") for f in d.files)


def test_without_tls_no_ssl_and_deflate_brings_filter() -> None:
    mods = enabled(web())
    assert "ssl.load" not in mods
    assert {"deflate.load", "filter.load"} <= mods
    # Debian's global compression list is off: the site's own list decides what is compressed
    assert "deflate.conf" not in mods
    absent = {a.path for a in web().absent}
    assert absent == {"/etc/apache2/mods-enabled/deflate.conf", "/etc/apache2/sites-enabled/000-default.conf"}


def test_features_off_means_modules_off() -> None:
    bare = shop_site(workers=(), mounts=(), unmounts=(), compression=(), expires=(), unset_headers=())
    d = web(bare)
    assert enabled(d) == {"authz_core.load"}
    assert not any(f.path.endswith(("jk.conf", "workers.properties")) for f in d.files)
    site = text(d, "/shop.conf")
    for word in ("JkMount", "DEFLATE", "Expires", "Header"):
        assert word not in site


def test_hardening_conf_sorts_after_debians_security_conf() -> None:
    assert apache.HARDENING_CONF > "security.conf"
    assert sorted(["charset.conf", "security.conf", "serve-cgi-bin.conf", apache.HARDENING_CONF])[-1] == (
        apache.HARDENING_CONF
    )
    hardening = text(web(), apache.HARDENING_CONF)
    assert "ServerTokens Prod" in hardening and "ServerSignature Off" in hardening


def test_jk_conf_defines_the_workers_file_once() -> None:
    jk = text(web(), "mods-available/jk.conf")
    directives = [
        line.split()[0] for line in jk.splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]
    assert directives.count("JkWorkersFile") == 1
    assert "JkWorkersFile workers.properties" in jk  # relative to ServerRoot: staged tree validates


def test_header_rules_for_the_whole_vhost_without_location() -> None:
    site = text(
        web(shop_site(header_location=None, unset_headers=("X-Powered-By", "X-AspNet-Version"))), "/shop.conf"
    )
    assert "LocationMatch" not in site
    assert "    Header unset X-Powered-By\n    Header unset X-AspNet-Version\n" in site


def test_location_regex_is_quoted() -> None:
    site = text(web(shop_site(header_location='^/shop/(a|b) "x"')), "/shop.conf")
    assert '<LocationMatch "^/shop/(a|b) \\"x\\"">' in site


def test_two_sites_share_one_workers_file_and_extra_ports_are_listened() -> None:
    blog = shop_site(
        name="blog",
        server_name="blog.example.com",
        aliases=(),
        port=8080,
        workers=(JkWorker(name="blog", port=8010),),
        mounts=(JkMount("/blog/*", "blog"),),
        unmounts=(),
        header_location=None,
        source_file="sites/blog.yaml",
    )
    d = web(shop_site(), blog)
    workers = text(d, "workers.properties")
    assert "worker.list=blog,shop" in workers
    assert "worker.blog.port=8010" in workers and "worker.shop.port=8009" in workers
    assert "Listen 8080" in text(d, apache.HARDENING_CONF)
    assert {lk.path for lk in d.links} >= {
        "/etc/apache2/sites-enabled/blog.conf",
        "/etc/apache2/sites-enabled/shop.conf",
    }


def test_conflicting_workers_are_refused_naming_both_sites() -> None:
    other = shop_site(
        name="other", workers=(JkWorker(name="shop", port=9009),), source_file="sites/other.yaml"
    )
    with pytest.raises(
        RenderError, match=r"sites/shop.yaml: worker shop is declared differently by sites/other"
    ):
        web(shop_site(), other)


def test_mount_to_an_undeclared_worker_is_refused() -> None:
    with pytest.raises(RenderError, match=r"sites/shop.yaml: mount /app/\* uses worker 'app'"):
        web(shop_site(mounts=(JkMount("/app/*", "app"),)))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("server_name", "shop.example.com\nInclude /etc/shadow"),
        ("document_root", "/srv/my shop"),
        ("log_level", "warn\n"),
        ("aliases", ("a.example.com\x00",)),
    ],
)
def test_unsafe_values_never_reach_the_config(field: str, value: object) -> None:
    with pytest.raises(RenderError, match=f"sites/shop.yaml: {field}"):
        web(shop_site(**{field: value}))


def test_unknown_site_in_a_role_is_refused() -> None:
    fleet = example_fleet()
    roles = dict(fleet.roles)
    import dataclasses
    from types import MappingProxyType

    roles["web"] = dataclasses.replace(roles["web"], sites=("shop", "nope"))
    fleet = dataclasses.replace(fleet, roles=MappingProxyType(roles))
    with pytest.raises(RenderError, match="unknown sites: nope"):
        apache.render(fleet, fleet.host("web1"))
