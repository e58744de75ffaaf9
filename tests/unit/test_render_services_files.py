"""Managed files: inline content, sandboxed Jinja2 templates, links, validators, handlers."""

from __future__ import annotations

import pytest
from services_fleets import MOTD_TEMPLATE, example_fleet, motd_file
from services_golden import render_services

from reconciler.errors import RenderError
from reconciler.fleet.model import ManagedFile, ReloadHandler
from reconciler.kinds.resources import Desired


def web(*files: ManagedFile, templates: dict[str, str] | None = None) -> Desired:
    fleet = example_fleet(files=files or (motd_file(),), templates=templates)
    return render_services(fleet, fleet.host("web1"))


def motd_with(template_text: str) -> Desired:
    return web(templates={"templates/motd.j2": template_text})


def test_template_sees_the_fleet_model() -> None:
    (f,) = [f for f in web().files if f.path == "/etc/motd"]
    assert f.content == (
        b'web1 (web) is managed by reconciler from fleet "example".\n'
        b"Internal address: 10.99.0.11. Manual changes are reverted and mailed.\n"
    )
    peers = motd_with("{% for p in peers %}{{ p.name }}={{ p.internal_address }} {% endfor %}")
    assert peers.files[-1].content == b"db1=10.99.0.21 db2=10.99.0.22 web2=10.99.0.12 "


def test_no_autoescape() -> None:
    d = motd_with("{{ '<b>&' }}")
    assert d.files[-1].content == b"<b>&"


def test_undefined_variable_names_template_and_line() -> None:
    with pytest.raises(
        RenderError, match=r"templates/motd.j2:3: template error: .*'nmae'.*used by files/motd.yaml"
    ):
        motd_with("line one\nline two\n{{ host.nmae }}\n")


def test_syntax_error_names_template_and_line() -> None:
    with pytest.raises(RenderError, match=r"templates/motd.j2:2: template syntax error"):
        motd_with("ok\n{% if host.name %}\nno endif\n")


def test_sandbox_blocks_python_internals() -> None:
    with pytest.raises(RenderError, match=r"templates/motd.j2:1: template"):
        motd_with("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(RenderError, match=r"templates/motd.j2:1: template"):
        motd_with("{{ range(10**9) | list | length }}")  # the sandbox caps range()


def test_no_filesystem_and_no_randomness() -> None:
    with pytest.raises(RenderError, match="not found"):
        motd_with("{% include '/etc/passwd' %}")
    with pytest.raises(RenderError, match="lipsum"):
        motd_with("{{ lipsum() }}")


def test_include_of_another_repo_template() -> None:
    d = web(
        templates={"templates/motd.j2": "{% include 'templates/footer.j2' %}", "templates/footer.j2": "bye\n"}
    )
    assert d.files[-1].content == b"bye\n"
    with pytest.raises(RenderError, match="templates/footer.j2:1"):
        web(
            templates={
                "templates/motd.j2": "{% include 'templates/footer.j2' %}",
                "templates/footer.j2": "{{ nope }}",
            }
        )


def test_missing_template_is_refused() -> None:
    with pytest.raises(RenderError, match="templates/nope.j2: template not found.*files/motd.yaml"):
        web(motd_file(template="templates/nope.j2"))


def test_inline_content_mode_owner_secret_validator_and_reload() -> None:
    mf = ManagedFile(
        name="sshd",
        path="/etc/ssh/sshd_config.d/10-reconciler.conf",
        content="PermitRootLogin no\n",
        mode=0o600,
        owner="root",
        group="ssh",
        secret=True,
        validate=("sshd", "-t", "-f", "{path}"),
        reload=ReloadHandler(service="ssh", command=("service", "ssh", "reload")),
        source_file="files/sshd.yaml",
    )
    d = web(mf)
    (f,) = [f for f in d.files if f.path == mf.path]
    assert (f.content, f.mode, f.group, f.secret, f.handler) == (
        b"PermitRootLogin no\n",
        0o600,
        "ssh",
        True,
        "ssh",
    )
    assert f.validators[0].argv == ("sshd", "-t", "-f", "{path}")
    assert d.handler("ssh").reload == ("service", "ssh", "reload")


def test_symlink() -> None:
    mf = ManagedFile(name="tz", path="/etc/localtime", link_target="/usr/share/zoneinfo/UTC")
    d = web(mf)
    assert [(lk.path, lk.target) for lk in d.links if lk.path == "/etc/localtime"] == [
        ("/etc/localtime", "/usr/share/zoneinfo/UTC")
    ]
    assert not any(f.path == "/etc/localtime" for f in d.files)


def test_one_service_two_reload_commands_is_refused() -> None:
    a = ManagedFile(
        name="a", path="/etc/a", content="a", reload=ReloadHandler("svc", ("service", "svc", "reload"))
    )
    b = ManagedFile(
        name="b",
        path="/etc/b",
        content="b",
        reload=ReloadHandler("svc", ("svc", "--restart")),
        source_file="files/b.yaml",
    )
    with pytest.raises(RenderError, match="files/b.yaml: service svc is reloaded with"):
        web(a, b)


def test_same_service_same_command_is_one_handler() -> None:
    h = ReloadHandler("svc", ("service", "svc", "reload"))
    d = web(
        ManagedFile(name="a", path="/etc/a", content="a", reload=h),
        ManagedFile(name="b", path="/etc/b", content="b", reload=h),
    )
    assert [x.name for x in d.handlers if x.name == "svc"] == ["svc"]


def test_template_constant_matches_example_repo() -> None:
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2] / "fleet-repo-example" / "templates" / "motd.j2"
    assert repo.read_text() == MOTD_TEMPLATE
