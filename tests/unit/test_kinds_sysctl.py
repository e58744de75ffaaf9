# ruff: noqa: E501 - expected error lines are long
"""The sysctl kind without a host: fleet validation (file:line:field), render, the probe's
script (keys only as arguments), its parser, the diff; and the kinds' traits and registry."""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

import pytest

from reconciler.domains.render import render_host
from reconciler.engine.observe import build_script, parse_observation
from reconciler.engine.plan import plan_host
from reconciler.errors import FleetInvalid
from reconciler.fleet.load import load_fleet_files, read_tree
from reconciler.fleet.model import Fleet
from reconciler.host.script import Section
from reconciler.kinds import sysctl
from reconciler.kinds.actions import FILE_KINDS, ActionKind
from reconciler.kinds.kind import PlanStep
from reconciler.kinds.observed import Observed
from reconciler.kinds.registry import KINDS
from reconciler.kinds.resources import Desired, SysctlSetting

EXAMPLE = Path(__file__).resolve().parents[2] / "fleet-repo-example"
_BASE, _ = read_tree(EXAMPLE)
ROLE = _BASE["roles/web.yaml"].decode()


def load_with(role_text: str, extra: dict[str, str] | None = None) -> Fleet:
    files = dict(_BASE)
    files["roles/web.yaml"] = role_text.encode()
    for k, v in (extra or {}).items():
        files[k] = v.encode()
    return load_fleet_files(files)


def errors(role_text: str, extra: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(FleetInvalid) as info:
        load_with(role_text, extra)
    return [str(p) for p in info.value.problems if p.severity == "error"]


# ---------------------------------------------------------------- fleet validation


@pytest.mark.parametrize(
    "key",
    [
        "net/ipv4/ip_forward",
        "net..ipv4",
        "net.ipv4.",
        ".net.ipv4",
        "Net.ipv4.ip_forward",
        "forward",
        "net.ipv4.ip forward",
    ],
)
def test_a_bad_key_is_an_error_naming_file_line_and_field(key: str) -> None:
    errs = errors(ROLE + f'sysctl:\n  "{key}": "1"\n')
    assert len(errs) == 1 and errs[0].startswith(f"roles/web.yaml:11:3: sysctl.{key}: "), errs
    assert "is not a valid key: kernel parameters (keys: dotted lowercase words" in errs[0]


@pytest.mark.parametrize("value", ["1\\n2", " 1", "1 ", "", "\\t1", "caf\\u00e9"])
def test_a_bad_value_is_an_error_naming_file_line_and_field(value: str) -> None:
    errs = errors(ROLE + f'sysctl:\n  net.ipv4.ip_forward: "{value}"\n')
    assert errs and all(e.startswith("roles/web.yaml:11:24: sysctl.net.ipv4.ip_forward: ") for e in errs), (
        errs
    )


def test_two_roles_of_a_host_setting_one_key_differently_is_an_error() -> None:
    db = _BASE["roles/db.yaml"].decode()
    assert "net.ipv4.conf.all.accept_redirects" in db
    host = _BASE["hosts/db1.yaml"].decode().replace("roles: [db]", "roles: [db, web]")
    errs = errors(ROLE + 'sysctl: {net.ipv4.conf.all.accept_redirects: "1"}\n', {"hosts/db1.yaml": host})
    assert errs == [
        "hosts/db1.yaml:6:13: roles[1]: sysctl net.ipv4.conf.all.accept_redirects: role web sets '1', role db sets '0'"
    ]


def test_integers_are_accepted_and_render_a_drop_in_and_its_handler() -> None:
    fleet = load_with(ROLE + "sysctl: {net.ipv4.ip_forward: 1, net.ipv4.ip_local_port_range: '1024 65000'}\n")
    desired = render_host(fleet, next(h for h in fleet.hosts if h.name == "web1"))
    assert desired.sysctl == (
        SysctlSetting("net.ipv4.ip_forward", "1", handler="sysctl"),
        SysctlSetting("net.ipv4.ip_local_port_range", "1024 65000", handler="sysctl"),
    )
    dropin = next(f for f in desired.files if f.path == sysctl.DROPIN)
    assert dropin.content.decode().splitlines()[1:] == [
        "net.ipv4.ip_forward = 1",
        "net.ipv4.ip_local_port_range = 1024 65000",
    ]
    assert desired.handler("sysctl").reload == ("sysctl", "-q", "-p", sysctl.DROPIN)


def test_check_refuses_what_the_schema_refuses() -> None:
    assert sysctl.check("net.ipv4.ip_forward", "0") is None
    for key in ("net/ipv4", "net..x", "-p", "kernel", "a.b/../c"):
        assert sysctl.check(key, "0") is not None, key
    for value in ("", " 0", "0\n1", "0\x00", "é"):
        assert sysctl.check("net.ipv4.ip_forward", value) is not None, value


# ---------------------------------------------------------------- observe and plan


def desired(values: dict[str, str]) -> Desired:
    settings = tuple(SysctlSetting(k, v, handler=sysctl.HANDLER) for k, v in sorted(values.items()))
    return Desired(host="h", handlers=(sysctl.handler(),), sysctl=settings)


def test_the_probe_passes_keys_only_as_arguments_and_is_absent_without_settings() -> None:
    script, args = build_script(desired({"net.ipv4.ip_forward": "0", "net.core.somaxconn": "4096"}))
    assert "net.ipv4.ip_forward" not in script and "net.core.somaxconn" not in script
    assert "net.ipv4.ip_forward" in args and "net.core.somaxconn" in args
    assert "frame sysctl sysctl " in script
    bare, _ = build_script(Desired(host="h"))
    assert "frame sysctl" not in bare


def test_parse_keeps_present_keys_and_normalises_whitespace() -> None:
    text = "net.ipv4.ip_forward = 1\nnet.ipv4.ip_local_port_range = 32768\t60999\nsysctl: cannot stat /proc/sys/x\n"
    assert sysctl.parse(text) == {"net.ipv4.ip_forward": "1", "net.ipv4.ip_local_port_range": "32768 60999"}


def observed_from(d: Desired, body: bytes, status: int | None = 0) -> Observed:
    sections = {
        "files": Section("files", b"", 0),
        "hashes": Section("hashes", b"", 0),
        "sysctl": Section("sysctl", body, status),
    }
    return parse_observation("h", d, sections)


def test_diff_plans_only_the_keys_that_differ_with_their_reload() -> None:
    d = desired(
        {"net.ipv4.ip_forward": "0", "net.ipv4.ip_local_port_range": "32768 60999", "net.x.gone": "1"}
    )
    obs = observed_from(d, b"net.ipv4.ip_forward = 1\nnet.ipv4.ip_local_port_range = 32768\t60999\n", 1)
    assert obs.sysctl == {"net.ipv4.ip_forward": "1", "net.ipv4.ip_local_port_range": "32768 60999"}
    actions = sysctl.diff(d.sysctl, obs.sysctl)
    assert [(a.kind, a.resource) for a in actions] == [
        (ActionKind.SET_SYSCTL, "sysctl net.ipv4.ip_forward"),
        (ActionKind.SET_SYSCTL, "sysctl net.x.gone"),
    ]
    assert actions[0].reason == "'1' live, should be '0'"
    assert "unknown to this kernel (no /proc/sys/net/x/gone)" in actions[1].reason
    plan = plan_host(d, obs)
    assert [a.kind for a in plan.actions][-2:] == [ActionKind.SET_SYSCTL, ActionKind.RELOAD]


def test_not_observed_plans_nothing_and_reports_why() -> None:
    d = desired({"net.ipv4.ip_forward": "0"})
    obs = observed_from(d, b"", None)
    assert obs.sysctl is None and any("sysctl: no answer" in e for e in obs.errors)
    assert sysctl.KIND.plan(PlanStep(d, d, obs, [], [], [])) == []
    missing = observed_from(d, b"sh: sysctl: not found", 127)
    assert missing.sysctl is None and any("sysctl: exit 127" in e for e in missing.errors)


def test_in_sync_is_a_noop() -> None:
    d = desired({"net.ipv4.ip_forward": "0"})
    obs = Observed(
        host="h",
        sysctl=MappingProxyType({"net.ipv4.ip_forward": "0"}),
        files=MappingProxyType({}),
    )
    assert sysctl.KIND.plan(PlanStep(d, d, obs, [], [], [])) == []


# ---------------------------------------------------------------- traits and registry


def test_every_kind_has_traits_and_the_registry_lists_sysctl() -> None:
    for k in ActionKind:
        assert k.bucket in ("add", "change", "destroy", "reload") and isinstance(k.order, int)
    assert ActionKind.SET_SYSCTL not in FILE_KINDS and ActionKind.UPDATE in FILE_KINDS
    assert ActionKind.INITIATE_CHILD.settles and not ActionKind.SET_SYSCTL.settles
    names = [k.name for k in KINDS]
    assert names[0] == "files" and names[-1] == "sysctl" and len(set(names)) == len(names)
    assert {"firewall", "keypairs", "links", "ipsec", "kernel", "packages", "services"} <= set(names)
