# ruff: noqa: E501 - expected messages are long
"""`reconciler validate` goes as deep as it can without a host: it renders every host (in the
bounded render worker) and reports template errors with file:line, warns on Jinja syntax in
inline content and on legacy_crypto nothing needs, refuses what Apache cannot do, and a render
that breaks a bound is a clear error, never a traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from reconciler.cli import main
from reconciler.commands.validate import RENDER_ALL_LINKS, hosts_to_render
from reconciler.fleet.load import load_fleet

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "fleet-repo-example"


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    out = tmp_path / "repo"
    shutil.copytree(EXAMPLE, out)
    return out


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new))


def run(repo: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str, str]:
    code = main(["validate", *extra, str(repo)])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def test_a_template_error_is_found_by_validate_with_its_file_and_line(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (repo / "templates" / "motd.j2").write_text("line one\n{{ host.name }}\n{{ host.no_such_field }}\n")
    code, _, err = run(repo, capsys)
    assert code == 1
    # every host renders the template: one error each, located in the template
    lines = [x for x in err.splitlines() if x.startswith("templates/motd.j2:3:1:")]
    assert len(lines) == 4, err
    assert "no_such_field" in lines[0] and "(host db1)" in err and "(host web2)" in err
    assert "used by files/motd.yaml" in lines[0]
    assert "is invalid: 4 errors" in err


def test_a_template_syntax_error_names_its_line(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (repo / "templates" / "motd.j2").write_text("ok\n{% if host.name %}\nunclosed\n")
    code, _, err = run(repo, capsys)
    assert code == 1
    assert "templates/motd.j2:2:0: template syntax error" in err, err  # found when the repo is read


def test_without_render_the_template_error_is_not_seen(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (repo / "templates" / "motd.j2").write_text("{{ host.no_such_field }}\n")
    code, out, _ = run(repo, capsys, "--no-render")
    assert code == 0 and out.endswith("hosts not rendered (--no-render)\n")


@pytest.mark.parametrize(
    ("template", "limit_words"),
    [
        ("{{ 'a' * 10**9 }}\n", "refused by the sandbox"),
        ("{% for i in range(90000) %}{{ 'x' * 100 }}{% endfor %}\n", "larger than 1 MiB"),
    ],
)
def test_a_render_that_breaks_a_bound_is_a_clear_error(
    repo: Path, capsys: pytest.CaptureFixture[str], template: str, limit_words: str
) -> None:
    (repo / "templates" / "motd.j2").write_text(template)
    code, _, err = run(repo, capsys)
    assert code == 1
    assert "render refused" in err and limit_words in err, err
    assert "templates/motd.j2" in err


def test_jinja_syntax_in_inline_content_is_a_warning(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    motd = repo / "files" / "motd.yaml"
    edit(motd, "template: templates/motd.j2", "content: 'Welcome to {{ host.name }}'")
    code, _, err = run(repo, capsys)
    assert code == 0
    assert "files/motd.yaml:5:" in err
    assert "content: warning: inline content holds '{{' or '{%': it is written literally" in err


def test_header_unset_server_is_refused_with_the_servertokens_hint(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    edit(
        repo / "sites" / "shop.yaml", "unset_headers: [X-Powered-By]", "unset_headers: [X-Powered-By, Server]"
    )
    code, _, err = run(repo, capsys)
    assert code == 1
    assert "sites/shop.yaml:" in err and "unset_headers[1]: Apache cannot remove its own Server header" in err
    assert "use ServerTokens" in err


def test_legacy_crypto_that_nothing_needs_is_a_warning(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db1 = repo / "hosts" / "db1.yaml"
    db1.write_text(db1.read_text() + "legacy_crypto: true\n")
    code, _, err = run(repo, capsys)
    assert code == 0
    assert (
        "hosts/db1.yaml:11:" in err and "legacy_crypto: warning: legacy_crypto: true, but no proposal" in err
    )
    # and not when a weak proposal really needs it on every host
    for h in ("db2", "web1", "web2"):
        p = repo / "hosts" / f"{h}.yaml"
        p.write_text(p.read_text() + "legacy_crypto: true\n")
    edit(
        repo / "fleet.yaml",
        "aes256gcm16-prfsha384-ecp384]",
        "aes256gcm16-prfsha384-ecp384, aes256-sha1-modp2048]",
    )
    code, _, err = run(repo, capsys)
    assert code == 0
    assert "no proposal or key on this host's links is deprecated" not in err
    assert "SHA-1 as integrity algorithm is deprecated" in err


def test_lb_worker_members_are_checked(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edit(
        repo / "sites" / "shop.yaml",
        "  - {name: shop, host: 127.0.0.1, port: 8009}",
        "  - {name: shop, type: lb, members: [tc1, tc9]}\n  - {name: tc1, port: 8010}\n  - {name: tc2, port: 8011, sticky_session: false}",
    )
    code, _, err = run(repo, capsys)
    assert code == 1
    assert "workers[0].members[1]: unknown worker 'tc9'" in err
    assert "workers[2].type: members and sticky_session belong to an lb worker" in err


def test_json_tells_how_many_hosts_were_rendered(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(repo, capsys, "--json")
    assert code == 0 and json.loads(out)["rendered_hosts"] == 4


def test_a_big_full_mesh_renders_one_host_per_roles_and_stack() -> None:
    fleet = load_fleet(EXAMPLE)
    assert hosts_to_render(fleet) == ["db1", "db2", "web1", "web2"]
    import dataclasses

    many = dataclasses.replace(
        fleet,
        hosts=tuple(
            dataclasses.replace(fleet.hosts[i % 4], name=f"h{i:04d}")
            for i in range(2 + int((2 * RENDER_ALL_LINKS) ** 0.5))
        ),
    )
    chosen = hosts_to_render(many)
    assert len(chosen) == 2  # roles [db] and [web], one stack
