# ruff: noqa: E501 - XML, JSP and curl lines are long
"""mod_jk load balancing served live: an ``lb`` worker over two real Tomcat 10 backends.

One lab host (web1) runs the site from the fleet (Apache + mod_jk, applied by the reconciler,
checked by ``apache2ctl -t`` before the swap) and two Debian Tomcat 10 instances (one
CATALINA_BASE each, AJP on 127.0.0.1:8010/8011, ``jvmRoute`` tc1/tc2, a JSP that makes a
session). Requests without a cookie reach both backends; a request with a session cookie
stays on the backend that made the session (``sticky_session``). Debian's default site and its
global deflate.conf are gone: the site's own compression list decides what is compressed.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler.engine.fleet import APPLIED, IN_SYNC, reconcile_fleet
from reconciler.fleet.load import load_fleet
from reconciler.fleet.model import Fleet
from reconciler.lab import Lab, specs_from_fleet

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from test_verify_mesh import pool_for  # noqa: E402

CATALINA_HOME = "/usr/share/tomcat10"
BACKENDS = (("tc1", 8010), ("tc2", 8011))
SITE = """apiVersion: reconciler/v1
kind: Site
name: shop
server_name: shop.example.com
document_root: /srv/shop
workers:
  - {name: shop, type: lb, members: [tc1, tc2], sticky_session: true}
  - {name: tc1, host: 127.0.0.1, port: 8010, lbfactor: 1}
  - {name: tc2, host: 127.0.0.1, port: 8011, lbfactor: 1}
mounts:
  - {path: /shop/*, worker: shop}
compression: [text/html]
unset_headers: [X-Powered-By]
"""
SERVER_XML = """<?xml version="1.0" encoding="UTF-8"?>
<Server port="-1" shutdown="SHUTDOWN">
  <Service name="Catalina">
    <Connector protocol="AJP/1.3" address="127.0.0.1" port="{port}" secretRequired="false" redirectPort="8443"/>
    <Engine name="Catalina" defaultHost="localhost" jvmRoute="{route}">
      <Host name="localhost" appBase="webapps" unpackWARs="false" autoDeploy="false"/>
    </Engine>
  </Service>
</Server>
"""
JSP = '<%@ page session="true" %>route=<%= session.getId() %> <% for (int i = 0; i < 40; i++) { %>padding <% } %>\n'
# one CATALINA_BASE per backend: conf (server.xml, Debian's web.xml), the webapp, and a start
# in the background with its pid file
TOMCAT = r"""
set -e
b=/srv/$1; mkdir -p $b/conf $b/logs $b/temp $b/work $b/webapps/shop
cp /etc/tomcat10/web.xml /etc/tomcat10/logging.properties $b/conf/
cat > $b/conf/server.xml
printf '%s' "$3" > $b/webapps/shop/index.jsp
CATALINA_HOME=/usr/share/tomcat10 CATALINA_BASE=$b CATALINA_PID=$b/pid \
  setsid -f /usr/share/tomcat10/bin/catalina.sh run >$b/logs/out.log 2>&1 </dev/null
"""


def make_repo(tmp: Path) -> Path:
    repo = tmp / "fleet"
    shutil.copytree(ROOT / "fleet-repo-example", repo)
    for h in ("db1", "db2", "web2"):
        (repo / "hosts" / f"{h}.yaml").unlink()
    (repo / "sites" / "shop.yaml").write_text(SITE)
    return repo


def sh(lab: Lab, script: str, *args: str, input: bytes | None = None, timeout: float = 60) -> str:
    res = lab.exec("web1", ["sh", "-c", script, "sh", *args], input=input, timeout=timeout)
    return res.stdout.decode(errors="replace") + res.stderr.decode(errors="replace")


def curl(fleet: Fleet, *args: str) -> tuple[str, dict[str, str]]:
    """GET /shop/index.jsp on web1 from the machine (root namespace), with a Host header."""
    res = subprocess.run(
        [
            "curl", "-s", "-i", "--max-time", "60", "-H", "Host: shop.example.com", "-H", "Accept-Encoding: gzip",
            *args, f"http://{fleet.host('web1').public_address}/shop/index.jsp",
        ],
        capture_output=True,
        timeout=90,
    )  # fmt: skip
    head, _, body = res.stdout.decode(errors="replace").partition("\r\n\r\n")
    headers = {}
    for line in head.split("\r\n")[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    headers["status"] = head.split(" ")[1] if " " in head else "?"
    return body, headers


@pytest.fixture
def lb_lab(lab_factory: Any, tmp_path: Path) -> Iterator[tuple[Fleet, Lab]]:
    if not Path(CATALINA_HOME, "bin", "catalina.sh").exists():
        pytest.skip("tomcat10 is not installed (scripts/install.sh installs it)")
    repo = make_repo(tmp_path)
    fleet = load_fleet(repo)
    lab = lab_factory(specs_from_fleet(fleet))
    try:
        for route, port in BACKENDS:
            server = SERVER_XML.format(port=port, route=route).encode()
            out = sh(lab, TOMCAT, route, str(port), JSP, input=server)
            assert "error" not in out.lower(), out
        yield fleet, lab
    finally:
        for route, _ in BACKENDS:
            sh(lab, 'p=$(cat /srv/$1/pid 2>/dev/null) && kill "$p"', route)
        lab.down()


def wait_ajp(lab: Lab, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # Tomcat logs "Server startup in" once its connectors are started
        started = sh(lab, "grep -l 'Server startup in' /srv/tc1/logs/out.log /srv/tc2/logs/out.log")
        if all(f"/srv/{route}/logs/out.log" in started for route, _ in BACKENDS):
            return
        time.sleep(1)
    logs = sh(lab, "tail -n 30 /srv/tc1/logs/out.log /srv/tc2/logs/out.log")
    raise AssertionError(f"Tomcat AJP connectors did not listen in {timeout} s:\n{logs}")


def test_lb_worker_balances_over_two_tomcats_and_keeps_sessions(lb_lab: tuple[Fleet, Lab]) -> None:
    fleet, lab = lb_lab
    # Debian's defaults on the host before: the default site and the global compression list
    assert "000-default.conf" in sh(lab, "ls /etc/apache2/sites-enabled/")
    assert "deflate.conf" in sh(lab, "ls /etc/apache2/mods-enabled/")

    async def apply() -> None:
        async with pool_for(fleet, lab) as pool:
            result = await reconcile_fleet(fleet, None, pool, apply=True, firewall_window=4)
            (h,) = result.hosts
            assert h.status == APPLIED, h.error
            again = await reconcile_fleet(fleet, None, pool, apply=False)
            assert again.hosts[0].status == IN_SYNC, again.hosts[0].plan

    asyncio.run(apply())
    props = sh(lab, "cat /etc/apache2/workers.properties")
    assert "worker.list=shop\n" in props and "worker.shop.balance_workers=tc1,tc2" in props, props
    assert "worker.tc1.route=tc1" in props and "worker.shop.sticky_session=true" in props
    assert "000-default.conf" not in sh(lab, "ls /etc/apache2/sites-enabled/")
    assert "deflate.conf" not in sh(lab, "ls /etc/apache2/mods-enabled/")

    wait_ajp(lab)
    routes: list[str] = []
    for _ in range(8):  # no cookie: each request is a new session, balanced over the members
        body, headers = curl(fleet)
        assert headers["status"] == "200", (headers, body)
        routes.append(headers.get("set-cookie", "").split(";")[0].rsplit(".", 1)[-1])
    assert set(routes) == {"tc1", "tc2"}, routes
    # a session stays on the backend that made it
    cookie = None
    for _ in range(2):
        body, headers = curl(fleet)
        cookie = headers.get("set-cookie", "").split(";")[0]
    assert cookie and cookie.startswith("JSESSIONID=")
    route = cookie.rsplit(".", 1)[-1]
    for _ in range(6):
        body, headers = curl(fleet, "-H", f"Cookie: {cookie}", "--compressed")
        assert headers["status"] == "200" and "set-cookie" not in headers, headers
        assert f"route={cookie.split('=', 1)[1]}" in body and body.count("padding") == 40, body[:200]
        assert cookie.endswith(f".{route}")
    # the site's own compression list decides: text/html is gzipped
    _, headers = curl(fleet, "-H", f"Cookie: {cookie}")
    assert headers.get("content-encoding") == "gzip", headers
