"""AppArmor rendering: full profile, local override, moved directories, handler data."""

from __future__ import annotations

import pytest
from services_fleets import MYSQLD_PROFILE, example_fleet, mysqld_profile
from services_golden import render_services

from reconciler.domains import apparmor
from reconciler.errors import RenderError
from reconciler.fleet.model import AppArmorProfile, MovedDirectory
from reconciler.kinds.resources import Desired


def db(*profiles: AppArmorProfile) -> Desired:
    fleet = example_fleet(profiles=profiles or (mysqld_profile(),))
    return render_services(fleet, fleet.host("db1"))


def content(d: Desired, path: str) -> str:
    return next(f for f in d.files if f.path == path).content.decode()


def test_moved_datadir_becomes_the_seeds_two_rules() -> None:
    local = content(db(), "/etc/apparmor.d/local/usr.sbin.mysqld")
    assert "/data/var/mysql/ r,\n/data/var/mysql/** rwk,\n" in local
    assert "# moved: /var/lib/mysql -> /data/var/mysql" in local


def test_full_profile_is_written_as_declared_and_includes_the_override() -> None:
    full = content(db(), "/etc/apparmor.d/usr.sbin.mysqld")
    assert full == MYSQLD_PROFILE
    assert "abi <abi/3.0>," in full and "include if exists <local/usr.sbin.mysqld>" in full


def test_without_content_only_the_override_is_written() -> None:
    d = db(mysqld_profile(content=None, rules=("/srv/x/ r,",)))
    assert [f.path for f in d.files if "apparmor" in f.path] == ["/etc/apparmor.d/local/usr.sbin.mysqld"]
    assert content(d, "/etc/apparmor.d/local/usr.sbin.mysqld").endswith("# declared rules\n/srv/x/ r,\n")


def test_trailing_slashes_do_not_double() -> None:
    rules = apparmor.moved_directory_rules(MovedDirectory(old="/a/", new="/data/b/"))
    assert rules == ("/data/b/ r,", "/data/b/** rwk,")


def test_handler_validates_the_staged_tree_and_reloads_only_with_apparmor_enabled() -> None:
    d = db()
    h = d.handler("apparmor:usr.sbin.mysqld")
    (v,) = h.validators
    assert v.tree_root == "/etc/apparmor.d"
    assert v.argv[:3] == ("apparmor_parser", "-Q", "-K")
    assert v.argv[-1] == "{tree}/usr.sbin.mysqld"
    assert ("-b", "{tree}") == v.argv[3:5] and ("-I", "{tree}") == v.argv[5:7]
    assert h.reload == ("apparmor_parser", "-r", "/etc/apparmor.d/usr.sbin.mysqld")
    assert h.only_if_running == ("aa-enabled", "-q")
    assert all(f.handler == h.name and f.needs_package == "apparmor" for f in d.files if "apparmor" in f.path)


def test_rule_with_a_newline_is_refused() -> None:
    with pytest.raises(RenderError, match="apparmor/usr.sbin.mysqld.yaml: rules"):
        db(mysqld_profile(rules=("/x r,\n/ rw,",)))


def test_two_profiles_two_handlers() -> None:
    other = AppArmorProfile(
        name="usr.sbin.named", rules=("/srv/dns/** r,",), source_file="apparmor/named.yaml"
    )
    d = db(mysqld_profile(), other)
    assert [h.name for h in d.handlers] == ["apparmor:usr.sbin.mysqld", "apparmor:usr.sbin.named"]
