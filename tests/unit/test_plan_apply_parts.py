"""Pure parts of apply and the plan views: staged names, validator quoting, tar staging, output."""

from __future__ import annotations

import dataclasses
import fnmatch
import io
import subprocess
from types import MappingProxyType
from typing import Any

import pytest

from reconciler.engine.fleet import CHANGES, ERROR, IN_SYNC, FleetResult, HostOutcome
from reconciler.engine.plan import plan_host
from reconciler.engine.planview import render_plan, to_json, use_color
from reconciler.engine.run import ActionOutcome, HostRun, backup_path, reobserve_scope, staged_path
from reconciler.engine.transaction import _stage_ops
from reconciler.engine.validate import _ref_with_tree, _validator_cmd
from reconciler.host.script import ScriptBuilder
from reconciler.kinds.actions import ActionKind
from reconciler.kinds.observed import Observed
from reconciler.kinds.resources import Desired, Domain, FileResource, Handler, LinkResource, Validator


@pytest.mark.parametrize("path", ["/etc/apache2/sites-enabled/shop.conf", "/etc/apparmor.d/usr.sbin.mysqld"])
def test_staged_and_backup_names_are_dotfiles_no_include_glob_loads(path: str) -> None:
    for name in (staged_path(path, "ab12cd"), backup_path(path, "ab12cd")):
        base = name.rsplit("/", 1)[1]
        assert name.rsplit("/", 1)[0] == path.rsplit("/", 1)[0]  # same directory: rename is atomic
        assert base.startswith(".")  # apparmor.d and most loaders skip dotfiles
        assert not fnmatch.fnmatch(base, "*.conf")  # Apache's IncludeOptional *.conf
        assert not fnmatch.fnmatch(base, "*.load")
        assert ".reconciler-" in base


def test_validator_command_quotes_hostile_values_and_substitutes_tree() -> None:
    hostile = "x'; touch /tmp/pwned; echo '$(id)`id`"
    v = Validator(
        argv=("printf", "%s|%s|%s\\n", "{path}", "{tree}/apache2.conf", hostile), env=(("T", "{tree}"),)
    )
    b = ScriptBuilder()
    cmd = _validator_cmd(b, v, path="/etc/a b/.f.reconciler-1")
    assert hostile not in cmd and "/etc/a b" not in cmd  # data only as positional arguments
    script = f'tree="/tmp/t r"; {cmd}; echo "env=$T"'
    out = subprocess.run(
        ["sh", "-c", script, "sh", *b.args], capture_output=True, check=True, text=True
    ).stdout
    assert out.splitlines()[0] == f"/etc/a b/.f.reconciler-1|/tmp/t r/apache2.conf|{hostile}"
    assert _ref_with_tree(ScriptBuilder(), "\x00TREE\x00", "\x00TREE\x00") == '"$tree"'


def test_staging_makes_dotfile_temps_with_owner_and_mode_and_links(tmp_path: Any) -> None:
    """The staging run of the path-safety helper (as root, in a temp dir): dotfile temps next to
    their targets, a secret created 0600 and given its mode on the open file, links as links."""
    import os
    import secrets

    from reconciler.host import pathsafe

    if os.geteuid() != 0:
        pytest.skip("staging chowns files: run as root")
    os.chmod(tmp_path, 0o755)
    x = f"{tmp_path}/etc/x"
    d = Desired(
        host="h",
        files=(FileResource(f"{x}/secret.key", b"k", Domain.FILES, mode=0o640, secret=True),),
        links=(LinkResource(f"{x}/link.conf", "../y/target.conf", Domain.FILES),),
    )
    plan = plan_host(d, Observed(host="h"))
    run = HostRun(pool=None, host="h", plan=plan, desired=d, token="abc123")  # type: ignore[arg-type]
    idx = [i for i, a in enumerate(plan.actions) if a.path in (f"{x}/secret.key", f"{x}/link.conf")]
    b = pathsafe.Batch()
    b.token("abc123")
    _stage_ops(run, b, idx, idx)
    marker = secrets.token_hex(8)
    res = subprocess.run(pathsafe.command(), input=b.payload(marker), capture_output=True, check=True)
    assert [s.text.split(" ")[0] for s in pathsafe.statuses(res.stdout, marker)] == ["ok", "ok"]
    assert sorted(os.listdir(x)) == [".link.conf.reconciler-abc123", ".secret.key.reconciler-abc123"]
    key = os.lstat(f"{x}/.secret.key.reconciler-abc123")
    assert key.st_mode & 0o7777 == 0o640 and key.st_uid == 0
    assert os.readlink(f"{x}/.link.conf.reconciler-abc123") == "../y/target.conf"


def outcome(host: str, status: str, desired: Desired, observed: Observed) -> HostOutcome:
    return HostOutcome(host, status, plan_host(desired, observed), desired)


def test_render_plan_summary_errors_and_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    d = Desired(host="a", files=(FileResource("/etc/motd", b"new\n", Domain.FILES),))
    changed = outcome("a", CHANGES, d, Observed(host="a"))
    in_sync = HostOutcome("b", IN_SYNC, plan_host(Desired(host="b"), Observed(host="b")))
    broken = HostOutcome("c", ERROR, error="host c (192.0.2.3:22): connect timed out")
    result = FleetResult((changed, in_sync, broken))
    text = render_plan(result, color=False)
    assert "\x1b[" not in text
    assert "+ create file /etc/motd  (missing)" in text
    assert "+new" in text
    assert "b: in sync" in text
    assert "c: ERROR host c (192.0.2.3:22): connect timed out" in text
    assert "Plan: 1 to add, 0 to change, 0 to destroy, 0 reloads on 2 hosts; 1 host with errors" in text
    assert result.exit_code() == 1
    assert "\x1b[32m" in render_plan(result, color=True)
    monkeypatch.setenv("NO_COLOR", "1")
    assert not use_color(io.StringIO())
    import json

    doc = json.loads(to_json(result, mode="plan"))
    assert doc["summary"]["add"] == 1 and doc["exit_code"] == 1
    assert [h["status"] for h in doc["hosts"]] == ["changes", "in-sync", "error"]


def test_exit_codes() -> None:
    ok = HostOutcome("b", IN_SYNC, plan_host(Desired(host="b"), Observed(host="b", inventory=())))
    assert FleetResult((ok,)).exit_code() == 0
    d = Desired(host="a", files=(FileResource("/etc/motd", b"x", Domain.FILES),))
    pending = outcome("a", CHANGES, d, Observed(host="a", files=MappingProxyType({})))
    assert FleetResult((ok, pending)).exit_code() == 2


def _done(plan: Any, status: str = "done") -> list[ActionOutcome]:
    return [ActionOutcome(a, status) for a in plan.actions]


def test_after_a_files_only_apply_only_those_files_are_observed_again() -> None:
    motd = FileResource("/etc/motd", b"new\n", Domain.FILES)
    other = FileResource("/etc/other.conf", b"same\n", Domain.FILES)
    d = Desired(host="h", files=(motd, other), firewall=None)
    before = Observed(host="h")
    plan = plan_host(d, before)
    assert plan.observed is before
    scope = reobserve_scope(plan, d, _done(plan))
    assert scope is not None and {f.path for f in scope.files} == {"/etc/motd", "/etc/other.conf"}
    assert not (scope.handlers or scope.services or scope.packages or scope.firewall or scope.keypairs)


def test_any_other_change_or_a_failure_observes_the_whole_host_again() -> None:
    v = Validator(argv=("true",))
    site = FileResource("/etc/apache2/sites-available/x.conf", b"x", Domain.APACHE, handler="apache2")
    handler = Handler(name="apache2", validators=(v,), reload=("true",))
    d = Desired(host="h", files=(site,), handlers=(handler,))
    plan = plan_host(d, Observed(host="h"))
    assert any(a.kind is ActionKind.RELOAD for a in plan.actions)
    assert reobserve_scope(plan, d, _done(plan)) is None  # a reload: services may have changed
    plain = Desired(host="h", files=(FileResource("/etc/motd", b"m", Domain.FILES),))
    plan = plan_host(plain, Observed(host="h"))
    assert reobserve_scope(plan, plain, _done(plan, "failed")) is None
    assert reobserve_scope(plan, plain, _done(plan)[:-1]) is None  # not every action ran
    no_obs = dataclasses.replace(plan, observed=None)
    assert reobserve_scope(no_obs, plain, _done(no_obs)) is None
