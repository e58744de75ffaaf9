"""The rendered services checked by the real tools of this machine, not by string matching.

- Every rendered Apache tree (the machine's /etc/apache2 copied to a scratch dir, the rendered
  files and links laid over it) passes a real ``apache2ctl -t``, run exactly as the handler's
  Validator says (``APACHE_CONFDIR={tree}``); a broken site fails with Apache's own message.
- The rendered site really serves: Apache started from the staged tree in private network,
  mount and PID namespaces (loopback only) answers with ``Server: Apache``, no signature,
  gzip, Expires, static files (JkUnMount) from the docroot, and 503 for JkMount paths (no
  Tomcat here).
- Every rendered AppArmor profile passes a real ``apparmor_parser -Q -K`` with the staged
  /etc/apparmor.d as base; a broken one fails with the parser's message.
- A managed file's declared validator really runs (``sshd -t -f {path}``).

Apache's run/log/lock directories are private tmpfs mounts when root (so the machine's
/var/log/apache2 is untouched and a machine where Apache never ran works too).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))

from services_fleets import example_fleet, motd_file, mysqld_profile, shop_site  # noqa: E402
from services_golden import render_services  # noqa: E402

from reconciler.domains import apache, apparmor  # noqa: E402
from reconciler.fleet.model import AppArmorProfile, Fleet, JkWorker, Site, TlsSpec  # noqa: E402
from reconciler.kinds.resources import Desired, Validator  # noqa: E402
from tests.skip_policy import skip_kernel_feature  # noqa: E402

IS_ROOT = os.geteuid() == 0


def need(*commands: str) -> None:
    for cmd in commands:
        if shutil.which(cmd) is None:
            pytest.skip(f"{cmd} is not installed on this machine")


# ---------------------------------------------------------------- staging and running validators


def stage(desired: Desired, tree_root: str, dest: Path, *, drop: tuple[str, ...] = ()) -> Path:
    """Copy the machine's ``tree_root`` to ``dest`` and lay the rendered files and links of
    ``desired`` under it over the copy, as the engine's staging does. ``drop`` removes
    entries (relative paths) from the copy first, e.g. to mimic a host without some modules."""
    if not Path(tree_root).is_dir():
        pytest.skip(f"{tree_root} does not exist on this machine")
    shutil.copytree(tree_root, dest, symlinks=True)
    for rel in drop:
        (dest / rel).unlink(missing_ok=True)
    prefix = tree_root.rstrip("/") + "/"
    for f in desired.files:
        if f.path.startswith(prefix):
            target = dest / f.path[len(prefix) :]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(f.content)
    for lk in desired.links:
        if lk.path.startswith(prefix):
            link = dest / lk.path[len(prefix) :]
            link.parent.mkdir(parents=True, exist_ok=True)
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(lk.target)
    return dest


# Private /run and /var/log for Apache (the script is ours; paths come only as arguments).
PRIVATE_DIRS = r"""
set -e
for d in /run /var/run /var/lock /var/log; do
  if [ -d "$d" ] && [ ! -L "$d" ]; then mount -t tmpfs -o mode=0755 tmpfs "$d"; fi
done
mkdir -p /run/lock /var/run/apache2 /var/lock/apache2 /var/log/apache2
exec "$@"
"""


def run_validator(
    v: Validator, tree: Path | None = None, path: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a Validator as data: ``{tree}``/``{path}`` substituted in argv and env values."""

    def subst(s: str) -> str:
        if tree is not None:
            s = s.replace("{tree}", str(tree))
        if path is not None:
            s = s.replace("{path}", str(path))
        return s

    argv = [subst(a) for a in v.argv]
    env = dict(os.environ) | {k: subst(val) for k, val in v.env}
    if v.tree_root == apache.APACHE_DIR and IS_ROOT and shutil.which("unshare"):
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", PRIVATE_DIRS, "sh", *argv]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)


def apache_check(desired: Desired, tmp: Path, **kw: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    tree = stage(desired, apache.APACHE_DIR, tmp / "apache2", **kw)
    (validator,) = desired.handler(apache.HANDLER).validators
    return run_validator(validator, tree=tree)


def web(fleet: Fleet) -> Desired:
    return render_services(fleet, fleet.host("web1"))


# ---------------------------------------------------------------- Apache


def test_module_table_matches_debians_mods_available() -> None:
    """The renderer's module table (conf files, Depends) is what Debian ships here."""
    avail = Path("/etc/apache2/mods-available")
    if not avail.is_dir():
        pytest.skip("apache2 is not installed on this machine")
    for mod in apache.MODULES.values():
        load = avail / f"{mod.name}.load"
        assert load.is_file(), f"{load} missing"
        assert (avail / f"{mod.name}.conf").is_file() == mod.has_conf, mod.name
        depends: tuple[str, ...] = ()
        for line in load.read_text().splitlines():
            if line.startswith("# Depends:"):
                depends = tuple(line.split(":", 1)[1].split())
        assert set(depends) == set(mod.depends), mod.name


def test_rendered_example_sites_pass_apache2ctl(tmp_path: Path) -> None:
    need("apache2ctl")
    fleet = example_fleet()
    for host in ("web1", "web2"):
        result = apache_check(render_services(fleet, fleet.host(host)), tmp_path / host)
        assert result.returncode == 0, result.stderr + result.stdout
        assert "Syntax OK" in result.stderr + result.stdout


def test_an_lb_worker_over_two_members_passes_apache2ctl_and_mod_jk_reads_it(tmp_path: Path) -> None:
    """The tree with an lb worker passes a real apache2ctl -t. (mod_jk reads workers.properties
    only when Apache starts, not under -t: checked here by experiment, a bogus worker type and an
    unknown member still give Syntax OK; so validate and render check the members themselves,
    and tests/integration/test_apache_lb.py proves the file live with two Tomcats.)"""
    need("apache2ctl")
    lb = shop_site(
        workers=(
            JkWorker(name="shop", type="lb", members=("tc1", "tc2"), sticky_session=True),
            JkWorker(name="tc1", port=8010, lbfactor=2),
            JkWorker(name="tc2", port=8011),
        )
    )
    desired = web(example_fleet(sites=(lb,)))
    props = next(f.content.decode() for f in desired.files if f.path.endswith("workers.properties"))
    assert "worker.list=shop\n" in props
    assert "worker.shop.balance_workers=tc1,tc2" in props and "worker.tc1.lbfactor=2" in props
    result = apache_check(desired, tmp_path / "ok")
    assert result.returncode == 0 and "Syntax OK" in result.stderr + result.stdout, result.stderr


def test_modules_never_enabled_are_enabled_with_their_dependencies(tmp_path: Path) -> None:
    """On a host where jk, deflate (needs filter), ssl (needs setenvif, mime, socache_shmcb)
    were never enabled, the rendered links alone make the tree valid."""
    need("apache2ctl", "openssl")
    cert, key = tmp_path / "shop.crt", tmp_path / "shop.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=shop.example.com",
        ]
        + ["-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    site = shop_site(tls=TlsSpec(certificate_file=str(cert), key_file=str(key), port=8443), port=8080)
    desired = web(example_fleet(sites=(site,)))
    drop = tuple(
        f"mods-enabled/{m}.{ext}"
        for m in ("jk", "deflate", "filter", "setenvif", "mime", "socache_shmcb", "ssl", "headers", "expires")
        for ext in ("load", "conf")
    )
    result = apache_check(desired, tmp_path / "a", drop=drop)
    assert result.returncode == 0, result.stderr + result.stdout
    hardening = next(f for f in desired.files if f.path.endswith(apache.HARDENING_CONF)).content.decode()
    assert "Listen 8080" in hardening and "Listen 8443" in hardening

    # without the dependencies' links the same tree fails: the links are what makes it valid
    stripped = dataclasses.replace(
        desired, links=tuple(lk for lk in desired.links if "socache_shmcb" not in lk.path)
    )
    result = apache_check(stripped, tmp_path / "b", drop=drop)
    assert result.returncode != 0
    assert "SSLSessionCache" in result.stderr or "socache" in result.stderr, result.stderr


def test_broken_site_fails_with_apaches_message(tmp_path: Path) -> None:
    need("apache2ctl")
    desired = web(example_fleet(sites=(shop_site(log_level="chatty"),)))
    result = apache_check(desired, tmp_path)
    assert result.returncode != 0
    site = next(f for f in desired.files if f.path.endswith("/shop.conf")).content.decode()
    line = 1 + site.splitlines().index("    LogLevel chatty")
    assert f"AH00526: Syntax error on line {line} of" in result.stderr, result.stderr
    assert "sites-enabled/shop.conf" in result.stderr
    print(result.stderr.strip())  # what a user sees in the plan's validation failure


# A stand-in for Tomcat's AJP connector (there is no Tomcat on this machine): answers every
# forwarded request with 200 and the header JBoss adds, X-Powered-By, which the site removes.
AJP_BACKEND = r"""
import socket, struct
def s(x):
    b = x.encode()
    return struct.pack(">H", len(b)) + b + b"\0"
def pkt(payload):
    return b"AB" + struct.pack(">H", len(payload)) + payload
def read(c, n):
    buf = b""
    while len(buf) < n:
        chunk = c.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 8009))
srv.listen(8)
print("ready", flush=True)
while True:
    c, _ = srv.accept()
    try:
        while True:
            magic, length = struct.unpack(">HH", read(c, 4))
            kind = read(c, length)[0]
            if kind == 10:  # CPING
                c.sendall(pkt(b"\x09"))
                continue
            body = b"from the application server\n"
            headers = [("Content-Type", "text/html"), ("X-Powered-By", "Servlet/3.0; JBossAS-6")]
            h = b"\x04" + struct.pack(">H", 200) + s("OK") + struct.pack(">H", len(headers))
            h += b"".join(s(k) + s(v) for k, v in headers)
            c.sendall(pkt(h))
            c.sendall(pkt(b"\x03" + struct.pack(">H", len(body)) + body + b"\0"))
            c.sendall(pkt(b"\x05\x01"))
    except (EOFError, OSError):
        c.close()
"""

CLIENT = r"""
import http.client, json, sys
out = {}
def get(name, path, gzip=False):
    c = http.client.HTTPConnection("127.0.0.1", 80, timeout=10)
    h = {"Host": "shop.example.com"}
    if gzip:
        h["Accept-Encoding"] = "gzip"
    c.request("GET", path, headers=h)
    r = c.getresponse()
    body = r.read()
    out[name] = {"status": r.status, "headers": {k.lower(): v for k, v in r.getheaders()},
                 "body": body.decode("latin-1")}
get("static", "/shop/style.css")
get("html", "/shop/page.html", gzip=True)
get("app", "/shop/login.do")
get("missing", "/nothing-here.html")
print(json.dumps(out))
"""

# Runs as PID 1 of private net+mount+PID namespaces: everything started here dies with it.
SERVE = r"""
set -e
tree=$1; py=$2; client=$3; backend=$4
ip link set lo up
"$py" -c "$backend" > /var/log/apache2/backend.out 2>&1 &
i=0
while ! grep -q ready /var/log/apache2/backend.out && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done
APACHE_CONFDIR="$tree" apache2ctl start
i=0
while [ ! -s /var/run/apache2/apache2.pid ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done
"$py" -c "$client"
APACHE_CONFDIR="$tree" apache2ctl stop >/dev/null 2>&1 || true
"""


@pytest.fixture
def docroot() -> Iterator[Path]:
    # world-readable (Apache's children run as www-data), unlike pytest's 0700 tmp dirs
    root = Path(tempfile.mkdtemp(prefix="reconciler-services-"))
    try:
        root.chmod(0o755)
        (root / "shop").mkdir(mode=0o755)
        (root / "shop" / "style.css").write_text("body { color: black; }\n")
        (root / "shop" / "page.html").write_text("<html><body>" + "static page " * 200 + "</body></html>\n")
        for p in root.rglob("*"):
            p.chmod(0o755 if p.is_dir() else 0o644)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def serve(tree: Path) -> dict[str, dict[str, object]]:
    """Start Apache from the staged tree (loopback of a private netns) with the AJP stand-in,
    make the client's requests, return the responses."""
    result = subprocess.run(
        ["unshare", "--net", "--mount", "--pid", "--fork", "--kill-child", "--propagation", "private"]
        + [
            "sh",
            "-c",
            PRIVATE_DIRS,
            "sh",
            "sh",
            "-c",
            SERVE,
            "sh",
            str(tree),
            sys.executable,
            CLIENT,
            AJP_BACKEND,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_rendered_site_serves_the_seeds_headers(tmp_path: Path, docroot: Path) -> None:
    need("apache2ctl", "unshare", "ip")
    if not IS_ROOT:
        pytest.skip("starting Apache in private namespaces needs root")
    desired = web(example_fleet(sites=(shop_site(document_root=str(docroot)),)))
    tree = stage(desired, apache.APACHE_DIR, tmp_path / "apache2")
    assert (tree / "conf-enabled/security.conf").exists(), "Debian's security.conf stays enabled"
    out: dict[str, dict[str, Any]] = serve(tree)
    for name, resp in out.items():
        # ServerTokens Prod wins over security.conf's ServerTokens OS
        assert resp["headers"]["server"] == "Apache", (name, resp["headers"])
    assert out["static"]["status"] == 200  # JkUnMount: served by Apache from the docroot
    assert out["static"]["headers"]["cache-control"] == "max-age=1296000"
    assert "expires" in out["static"]["headers"]
    assert out["html"]["status"] == 200
    assert out["html"]["headers"].get("content-encoding") == "gzip"
    # JkMount: forwarded over AJP13 to the worker; the backend's X-Powered-By is removed
    assert out["app"]["status"] == 200, out["app"]
    assert out["app"]["body"] == "from the application server\n"
    assert "x-powered-by" not in out["app"]["headers"], out["app"]["headers"]
    assert out["missing"]["status"] == 404
    assert "Apache/" not in out["missing"]["body"] and "Server at" not in out["missing"]["body"]

    # control: the same tree without our conf-enabled file shows what Debian's security.conf
    # gives (so the assertions above really measure our file)
    (tree / "conf-enabled" / apache.HARDENING_CONF).unlink()
    control: dict[str, dict[str, Any]] = serve(tree)
    assert control["missing"]["headers"]["server"].startswith("Apache/2"), control["missing"]["headers"]
    assert "Server at" in control["missing"]["body"]


# ---------------------------------------------------------------- AppArmor


def aa_check(fleet: Fleet, tmp: Path) -> list[tuple[AppArmorProfile, subprocess.CompletedProcess[str]]]:
    need("apparmor_parser")
    out = []
    for host in fleet.hosts:
        desired = render_services(fleet, host)
        for profile in apparmor.profiles_of(fleet, host):
            tree = stage(desired, apparmor.APPARMOR_DIR, tmp / host.name / profile.name)
            (validator,) = desired.handler(apparmor.handler_name(profile)).validators
            out.append((profile, run_validator(validator, tree=tree)))
    return out


def test_rendered_profiles_pass_apparmor_parser(tmp_path: Path) -> None:
    results = aa_check(example_fleet(), tmp_path)
    assert results
    for profile, result in results:
        assert result.returncode == 0, f"{profile.name}: {result.stderr}"


def test_override_of_a_packaged_profile_passes(tmp_path: Path) -> None:
    """content=None: only local/<name> is written, and the packaged profile includes it."""
    if not Path("/etc/apparmor.d/usr.bin.tcpdump").is_file():
        pytest.skip("no packaged tcpdump profile on this machine")
    profile = AppArmorProfile(name="usr.bin.tcpdump", rules=("/data/captures/** rw,",), source_file="x.yaml")
    results = aa_check(example_fleet(profiles=(profile,)), tmp_path)
    for _, result in results:
        assert result.returncode == 0, result.stderr


def test_broken_override_fails_with_the_parsers_message(tmp_path: Path) -> None:
    fleet = example_fleet(profiles=(mysqld_profile(rules=("/data/var/mysql/tmp/** rwz,",)),))
    _, result = aa_check(fleet, tmp_path)[0]
    assert result.returncode != 0
    assert "local/usr.sbin.mysqld" in result.stderr and "line" in result.stderr, result.stderr
    print(result.stderr.strip())


def test_broken_profile_fails_with_the_parsers_message(tmp_path: Path) -> None:
    broken = mysqld_profile(
        content=mysqld_profile().content.replace("  capability setgid,\n", "  capabilty setgid,\n")
    )  # type: ignore[union-attr]
    _, result = aa_check(example_fleet(profiles=(broken,)), tmp_path)[0]
    assert result.returncode != 0
    assert "usr.sbin.mysqld" in result.stderr and "line" in result.stderr, result.stderr


def test_profile_reload_waits_for_an_enabled_apparmor() -> None:
    """Without the AppArmor LSM the reload's probe says no: the profile is parsed, not loaded."""
    need("aa-enabled")
    h = apparmor.handler_for(mysqld_profile())
    probe = subprocess.run(list(h.only_if_running), capture_output=True, check=False)
    if probe.returncode == 0:
        skip_kernel_feature("the AppArmor LSM is enabled here: the reload would really load the profile")
    assert probe.returncode != 0


# ---------------------------------------------------------------- managed files


def test_managed_file_validator_really_runs(tmp_path: Path) -> None:
    need("sshd")
    sshd = shutil.which("sshd")
    assert sshd is not None
    good = motd_file(
        name="sshd",
        path="/etc/ssh/sshd_config.d/reconciler.conf",
        template=None,
        content="PermitRootLogin prohibit-password\n",
        validate=(sshd, "-t", "-f", "{path}"),
    )
    bad = dataclasses.replace(good, content="PermitRootLogin perhaps\n")
    for mf, ok in ((good, True), (bad, False)):
        fleet = example_fleet(files=(mf,), web_files=("sshd",))
        (f,) = [x for x in render_services(fleet, fleet.host("web1")).files if x.path == good.path]
        staged = tmp_path / f"{ok}.conf"
        staged.write_bytes(f.content)
        (validator,) = f.validators
        result = run_validator(validator, path=staged)
        assert (result.returncode == 0) is ok, result.stderr
        if not ok:
            assert "perhaps" in result.stderr, result.stderr


def test_site_dataclass_fields_all_reach_the_config() -> None:
    """Guard: a new Site field must be rendered (or listed here as deliberately not)."""
    rendered_elsewhere = {"name", "source_file", "workers", "tls", "port"}
    site = shop_site(aliases=("alias.example.com",), server_admin="ops@example.com")
    text = apache.render_site(site)
    for field in dataclasses.fields(Site):
        if field.name in rendered_elsewhere:
            continue
        value = getattr(site, field.name)
        probes = value if isinstance(value, tuple) else (value,)
        for probe in probes:
            probe_text = getattr(probe, "path", getattr(probe, "mime_type", probe))
            assert str(probe_text) in text, (field.name, probe_text)


# ---------------------------------------------------------------- the example fleet repo itself


def _example_repo_fleet() -> Fleet:
    from reconciler.fleet.load import load_fleet

    return load_fleet(Path(__file__).resolve().parents[2] / "fleet-repo-example")


def test_example_repo_sites_pass_apache2ctl(tmp_path: Path) -> None:
    need("apache2ctl")
    fleet = _example_repo_fleet()
    for host in fleet.hosts:
        desired = render_services(fleet, host)
        if not any(f.path.startswith("/etc/apache2/") for f in desired.files):
            continue
        result = apache_check(desired, tmp_path / host.name)
        assert result.returncode == 0, result.stderr + result.stdout


def test_example_repo_profiles_pass_apparmor_parser(tmp_path: Path) -> None:
    fleet = _example_repo_fleet()
    for profile in fleet.apparmor.values():
        if profile.content is None and not Path(apparmor.APPARMOR_DIR, profile.name).is_file():
            pytest.skip(
                f"{profile.source_file}: no full profile in the example fleet and no package ships "
                f"{profile.name} on this machine, so there is nothing to parse the override with"
            )
    for profile, result in aa_check(fleet, tmp_path):
        assert result.returncode == 0, f"{profile.name}: {result.stderr}"
