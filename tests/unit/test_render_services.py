"""Services rendering (AppArmor, Apache, managed files) of the example fleet: golden files,
the seed's Apache article found in the rendered site, determinism."""

from __future__ import annotations

import re
from pathlib import Path

from services_fleets import example_fleet, mysqld_profile
from services_golden import check_golden, render_services, snapshot

from reconciler.fleet.model import Fleet

REPO = Path(__file__).resolve().parents[2]


def test_golden_test_fleet() -> None:
    check_golden("test-fleet", example_fleet())


def _load_example() -> Fleet:
    from reconciler.fleet.load import load_fleet

    return load_fleet(REPO / "fleet-repo-example")


def test_golden_example_fleet_repo() -> None:
    """The example fleet repo itself, through the real loader."""
    check_golden("example", _load_example())


def test_test_fleet_mirrors_the_example_repo() -> None:
    """The dataclass fleet used by the other tests renders what the example repo renders (the
    full mysqld profile aside, until the repo carries it)."""
    example = _load_example()
    content = example.apparmor["usr.sbin.mysqld"].content
    assert snapshot(example_fleet(profiles=(mysqld_profile(content=content),))) == snapshot(example)


def test_rendering_is_deterministic_and_sorted() -> None:
    fleet = example_fleet()
    for host in fleet.hosts:
        a, b = render_services(fleet, host), render_services(example_fleet(), host)
        assert a == b
        assert [f.path for f in a.files] == sorted(f.path for f in a.files)
        assert [lk.path for lk in a.links] == sorted(lk.path for lk in a.links)


def test_hosts_get_only_their_roles_services() -> None:
    fleet = example_fleet()
    web = render_services(fleet, fleet.host("web1"))
    db = render_services(fleet, fleet.host("db1"))
    assert any(f.path == "/etc/apache2/sites-available/shop.conf" for f in web.files)
    assert not any(f.path.startswith("/etc/apparmor.d") for f in web.files)
    assert not any(f.path.startswith("/etc/apache2") for f in db.files) and not db.links
    assert {f.path for f in db.files} == {
        "/etc/apparmor.d/usr.sbin.mysqld",
        "/etc/apparmor.d/local/usr.sbin.mysqld",
        "/etc/motd",
    }
    assert [h.name for h in db.handlers] == ["apparmor:usr.sbin.mysqld"]
    assert [h.name for h in web.handlers] == ["apache2"]


# Every directive of the seed's article "Deploying a J2EE application behind an Apache server"
# (steps 2 to 6), as a regex over the whole rendered Apache tree, with the example's values.
SEED_DIRECTIVES = (
    r"<VirtualHost \*:80>",
    r"ServerAdmin webmaster@localhost",
    r"ServerAlias www\.shop\.example\.com",
    r"ServerName shop\.example\.com",
    r"DocumentRoot /srv/shop/shop\.war",
    r"<Directory /srv/shop/shop\.war>",
    r"Options FollowSymLinks",
    r"AllowOverride None",
    r"ErrorLog \$\{APACHE_LOG_DIR\}/shop-error\.log",
    r"LogLevel warn",
    r"CustomLog \$\{APACHE_LOG_DIR\}/shop-access\.log combined",
    r"JkWorkersFile workers\.properties",
    r"JkShmFile +/var/log/apache2/mod_jk\.shm",
    r"JkLogFile +/var/log/apache2/mod_jk\.log",
    r"JkLogLevel +info",
    r'JkLogStampFormat "\[%a %b %d %H:%M:%S %Y\] "',
    r"worker\.list=shop",
    r"worker\.shop\.type=ajp13",
    r"worker\.shop\.host=127\.0\.0\.1",
    r"worker\.shop\.port=8009",
    r"JkMount /shop/\* shop",
    r"JkOptions \+ForwardURICompat",
    r"JkUnMount /shop/\*\.css shop",
    r"JkUnMount /shop/\*\.js shop",
    r"JkUnMount /shop/\*\.html shop",
    r"JkUnMount /shop/\*\.png shop",
    r"AddOutputFilterByType DEFLATE text/html text/plain text/xml text/css text/javascript( \S+)*",
    r"ExpiresActive On",
    r"ExpiresByType text/css A1296000",
    r"ExpiresByType image/png A1296000",
    r"ExpiresByType image/gif A1296000",
    r"ExpiresByType image/jpeg A1296000",
    r"ExpiresByType text/javascript A1296000",
    r'<LocationMatch "\^/shop/\.\*">',
    r"Header unset X-Powered-By",
    r"ServerSignature Off",
    r"ServerTokens Prod",
)


def test_seed_apache_article_is_in_the_rendered_site() -> None:
    fleet = example_fleet()
    desired = render_services(fleet, fleet.host("web1"))
    text = "\n".join(f.content.decode() for f in desired.files if f.path.startswith("/etc/apache2/"))
    missing = [d for d in SEED_DIRECTIVES if not re.search(rf"^\s*{d}\s*$", text, re.MULTILINE)]
    assert not missing, f"seed directives missing from the rendered Apache tree: {missing}"
    # the seed's modules: "jk headers expires ssl deflate rewrite" (ssl only with TLS; rewrite
    # only if something needs it: nothing does)
    enabled = {lk.path.rsplit("/", 1)[1] for lk in desired.links if "/mods-enabled/" in lk.path}
    assert "rewrite.load" not in enabled and "deflate.conf" not in enabled
    for mod in ("jk", "headers", "expires", "deflate"):
        assert f"{mod}.load" in enabled, mod
    assert "ssl.load" not in enabled
    assert "/etc/apache2/sites-enabled/shop.conf" in {lk.path for lk in desired.links}
