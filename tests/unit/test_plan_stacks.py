"""Plan for a host's IPsec stack and the Debian defaults its sites replace (pure): a stack apt
cannot install refuses the host before anything is touched; a switched host's old stack is
stopped and its files deleted; replaced defaults are deleted; a local AppArmor override whose
packaged profile is missing is a plan error."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path
from types import MappingProxyType

from reconciler.domains.render import render_host
from reconciler.engine.observe import build_script, parse_observation
from reconciler.engine.plan import ActionKind, plan_host
from reconciler.fleet.load import load_fleet_files, read_tree
from reconciler.host.script import new_nonce, split_sections
from reconciler.kinds.observed import FileState, Observed, PackageState, ServiceState
from reconciler.kinds.resources import Desired

EXAMPLE = Path(__file__).resolve().parents[2] / "fleet-repo-example"
_BASE, _ = read_tree(EXAMPLE)


def desired_for(host: str, racoon: tuple[str, ...] = (), extra: dict[str, bytes] | None = None) -> Desired:
    files = dict(_BASE)
    text = files["fleet.yaml"].decode()
    text = text.replace(
        "aes256gcm16-prfsha384-ecp384]", "aes256gcm16-prfsha384-ecp384, aes256-sha256-modp3072]"
    )
    text = text.replace("aes256gcm16-ecp384]", "aes256gcm16-ecp384, aes256-sha256-modp3072]")
    files["fleet.yaml"] = text.encode()
    for h in racoon:
        files[f"hosts/{h}.yaml"] += b"ipsec: racoon\n"
    files.update(extra or {})
    fleet = load_fleet_files(files)
    fleet = dataclasses.replace(fleet, public_keys=MappingProxyType({}))
    return render_host(fleet, fleet.host(host))


def observed(d: Desired, **kw: object) -> Observed:
    """Every desired file missing, every needed package installed (unless ``kw`` says)."""
    files = {f.path: FileState(f.path, False) for f in d.files}
    files.update({a.path: FileState(a.path, False) for a in d.absent})
    files.update({e.path: FileState(e.path, True) for e in d.expects})
    packages = {p: PackageState(p, True, "1") for r in d.requires for p in r.packages}
    base: dict[str, object] = {"host": d.host, "files": files, "packages": packages}
    base.update(kw)
    return Observed(**base)  # type: ignore[arg-type]


def test_racoon_without_an_apt_candidate_refuses_the_host_with_nothing_planned() -> None:
    d = desired_for("db1", racoon=("db1",))
    obs = observed(
        d,
        packages={"ipsec-tools": PackageState("ipsec-tools", False), "racoon": PackageState("racoon", False)},
        candidates=MappingProxyType({"ipsec-tools": "", "racoon": ""}),
    )
    plan = plan_host(d, obs)
    assert plan.actions == ()
    assert plan.refused_requirement
    assert plan.refusal.startswith("ipsec: racoon cannot run on this host: apt has no install candidate for ")
    assert "ipsec-tools, racoon (apt-cache policy on the host" in plan.refusal
    assert "nothing on this host was changed" in plan.refusal


def test_a_candidate_means_no_refusal() -> None:
    d = desired_for("db1", racoon=("db1",))
    obs = observed(d, candidates=MappingProxyType({"racoon": "1:0.8.2-1"}))
    assert plan_host(d, obs).refusal == ""


def test_a_switched_host_stops_racoon_and_deletes_its_files() -> None:
    d = desired_for("web1")
    obs = observed(d)
    files = dict(obs.files)
    for path in ("/etc/ipsec-tools.conf", "/etc/racoon/racoon.conf", "/etc/racoon/peers/db1.pub"):
        files[path] = FileState(
            path, True, kind="file", sha256="0" * 64, mode=0o644, owner="root", group="root"
        )
    obs = dataclasses.replace(
        obs,
        files=MappingProxyType(files),
        services=MappingProxyType({"racoon": ServiceState("racoon", True)}),
    )
    plan = plan_host(d, obs)
    deletes = {a.path for a in plan.actions if a.kind is ActionKind.DELETE}
    assert {"/etc/ipsec-tools.conf", "/etc/racoon/racoon.conf", "/etc/racoon/peers/db1.pub"} <= deletes
    (stop,) = [a for a in plan.actions if a.kind is ActionKind.STOP_SERVICE]
    assert stop.resource == "service racoon"
    # a stopped racoon is not stopped again
    quiet = dataclasses.replace(obs, services=MappingProxyType({"racoon": ServiceState("racoon", False)}))
    assert not [a for a in plan_host(d, quiet).actions if a.kind is ActionKind.STOP_SERVICE]


def test_debian_defaults_the_sites_replace_are_deleted() -> None:
    d = desired_for("web1")
    obs = observed(d)
    files = dict(obs.files)
    for path in ("/etc/apache2/mods-enabled/deflate.conf", "/etc/apache2/sites-enabled/000-default.conf"):
        files[path] = FileState(path, True, kind="link", link_target="../x")
    plan = plan_host(d, dataclasses.replace(obs, files=MappingProxyType(files)))
    gone = {a.path: a for a in plan.actions if a.kind is ActionKind.DELETE}
    assert gone["/etc/apache2/mods-enabled/deflate.conf"].handler == "apache2"
    assert "each site declares its own" in gone["/etc/apache2/mods-enabled/deflate.conf"].reason
    assert "/etc/apache2/sites-enabled/000-default.conf" in gone


def test_an_override_of_a_profile_no_package_ships_is_a_plan_error() -> None:
    override = (
        b"apiVersion: reconciler/v1\nkind: AppArmorProfile\nname: usr.sbin.nothing\nrules: ['/srv/x r,']\n"
    )
    role = (
        _BASE["roles/db.yaml"]
        .decode()
        .replace("apparmor: [usr.sbin.mysqld]", "apparmor: [usr.sbin.mysqld, usr.sbin.nothing]")
    )
    d = desired_for("db1", extra={"apparmor/nothing.yaml": override, "roles/db.yaml": role.encode()})
    (ex,) = d.expects
    assert ex.path == "/etc/apparmor.d/usr.sbin.nothing"
    obs = observed(d)
    files = dict(obs.files)
    files[ex.path] = FileState(ex.path, False)
    plan = plan_host(d, dataclasses.replace(obs, files=MappingProxyType(files)))
    assert any(
        "apparmor/nothing.yaml: a local override for /etc/apparmor.d/usr.sbin.nothing" in e
        for e in plan.errors
    )


def test_the_observation_asks_this_machines_apt_for_the_stack_packages() -> None:
    """The real observation script, run here (read-only): this Debian 12 has no racoon."""
    d = desired_for("db1", racoon=("db1",))
    script, args = build_script(d)
    assert "frame aptcand apt_cand" in script
    nonce = new_nonce()
    res = subprocess.run(
        ["sh", "-c", script, "sh", *args], input=(nonce + "\n").encode(), capture_output=True, timeout=60
    )
    obs = parse_observation("db1", d, split_sections(res.stdout, res.stderr, nonce=nonce))
    assert obs.candidates.get("racoon") == "" and obs.candidates.get("ipsec-tools") == ""
    plan = plan_host(d, obs)
    assert plan.refused_requirement and plan.actions == ()
    # strongSwan is installed here: its packages are not even asked about
    d2 = desired_for("web1")
    script, args = build_script(d2)
    res = subprocess.run(
        ["sh", "-c", script, "sh", *args], input=(nonce + "\n").encode(), capture_output=True, timeout=60
    )
    obs2 = parse_observation("web1", d2, split_sections(res.stdout, res.stderr, nonce=nonce))
    assert dict(obs2.candidates) == {} and obs2.packages["strongswan-swanctl"].installed
