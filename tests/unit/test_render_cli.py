"""`reconciler render` on the example fleet repo, through the real loader."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from test_render_network_golden import GOLDEN

from reconciler.cli import main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "fleet-repo-example"
KEYS = ROOT / "tests" / "fixtures" / "keys"
HOSTS = ("db1", "db2", "web1", "web2")


@pytest.fixture(autouse=True)
def _keep_logging_config() -> Iterator[None]:
    """cli.main configures structlog to write to the sys.stderr of the moment (pytest's capture
    here, closed after the test): put the previous configuration back for later tests."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def render(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["render", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_example_with_keys_renders_the_full_mesh_for_every_host(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "out"
    code, out, _ = render(
        capsys, str(EXAMPLE), "--all", "--out", str(out_dir), "--keys", str(KEYS / "strongswan")
    )
    assert code == 0
    assert "pending" not in out
    for host in HOSTS:
        peers = [p for p in HOSTS if p != host]
        etc = out_dir / host / "etc"
        assert sorted(p.name for p in (etc / "swanctl" / "conf.d").iterdir()) == [
            f"mesh-{p}.conf" for p in peers
        ]
        assert sorted(p.name for p in (etc / "swanctl" / "pubkey").iterdir()) == [f"{p}.pem" for p in peers]
        assert sorted(p.name for p in (etc / "network" / "interfaces.d").iterdir()) == [
            f"ipip-{p}" for p in peers
        ]
        rules = (etc / "iptables" / "rules.v4").read_text()
        assert rules.count("-p esp -j ACCEPT") == 2 * len(peers)
        assert rules.count("-p ipencap -m policy --dir in --pol ipsec -j ACCEPT") == len(peers)
        assert (etc / "iptables" / "rules.v4").stat().st_mode & 0o777 == 0o640
        assert not (etc / "swanctl" / "private").exists()


def test_example_matches_the_golden_files_of_its_dataclass_mirror(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The network files rendered from fleet-repo-example (through the loader) are exactly the
    golden files of the dataclass fleet that mirrors it."""
    out_dir = tmp_path / "out"
    code, _, _ = render(
        capsys, str(EXAMPLE), "--all", "--out", str(out_dir), "--keys", str(KEYS / "strongswan")
    )
    assert code == 0
    for host in HOSTS:
        golden = GOLDEN / "strongswan-ipip-kernel" / host
        for path in sorted(golden.rglob("*")):
            if path.is_file() and path.name != "_resources.json":
                rendered = out_dir / host / path.relative_to(golden)
                assert rendered.read_text() == path.read_text(), str(path.relative_to(GOLDEN))


def test_example_without_keys_says_which_peers_are_pending(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = render(capsys, str(EXAMPLE), "--all", "--out", str(tmp_path / "o"))
    assert code == 0
    for host in HOSTS:
        for peer in HOSTS:
            if peer != host:
                assert f"pending: ipsec peer {peer}: no public key yet: keys/{peer}.pub is missing" in out
    assert "reconciler keys collect" in out and "--keys DIR" in out
    # everything else is there: tunnels and firewall per peer, no connection yet
    assert not (tmp_path / "o" / "web1" / "etc" / "swanctl" / "conf.d").exists()
    assert len(list((tmp_path / "o" / "web1" / "etc" / "network" / "interfaces.d").iterdir())) == 3


def test_one_host_is_written_at_the_root_of_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, _ = render(
        capsys, str(EXAMPLE), "--host", "web1", "--out", str(tmp_path), "--keys", str(KEYS / "strongswan")
    )
    assert code == 0
    assert (tmp_path / "etc" / "swanctl" / "conf.d" / "mesh-web2.conf").is_file()
    assert not (tmp_path / "web1").exists()


def test_json_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = render(
        capsys, str(EXAMPLE), "--host", "db1", "--host", "web1", "--out", str(tmp_path), "--json", "--keys",
        str(KEYS / "strongswan"),
    )  # fmt: skip
    assert code == 0
    data = json.loads(out)
    assert sorted(data["hosts"]) == ["db1", "web1"]
    web1 = data["hosts"]["web1"]
    assert web1["root"] == str(tmp_path / "web1")
    assert "/etc/swanctl/conf.d/mesh-db1.conf" in web1["files"]
    assert [t["name"] for t in web1["tunnels"]] == ["ipip-db1", "ipip-db2", "ipip-web2"]
    assert web1["keypairs"] == [{"name": "strongswan", "public_path": "/etc/swanctl/pubkey/web1.pem"}]
    assert web1["pending"] == []


def copy_example(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    shutil.copytree(EXAMPLE, repo)
    return repo


def test_switching_the_mesh_to_racoon_writes_the_seed_shaped_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = copy_example(tmp_path)
    fleet_yaml = repo / "fleet.yaml"
    fleet_yaml.write_text(fleet_yaml.read_text().replace("backend: strongswan", "backend: racoon"))
    out_dir = tmp_path / "out"
    code, out, _ = render(capsys, str(repo), "--all", "--out", str(out_dir), "--keys", str(KEYS / "racoon"))
    assert code == 0, out
    for host in HOSTS:
        etc = out_dir / host / "etc"
        setkey = (etc / "ipsec-tools.conf").read_text()
        statements = [ln for ln in setkey.splitlines() if ln and not ln.startswith("#")]
        assert statements[:2] == ["flush;", "spdflush;"] and len(statements) == 2 + 2 * 3
        assert (etc / "racoon" / "racoon.conf").read_text().count("generate_policy off;") == 3
        assert sorted(p.name for p in (etc / "racoon" / "peers").iterdir()) == [
            f"{p}.pub" for p in HOSTS if p != host
        ]
        assert not (etc / "swanctl").exists()


def test_bad_input_prints_the_loaders_errors_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = copy_example(tmp_path)
    web2 = repo / "hosts" / "web2.yaml"
    web2.write_text(web2.read_text().replace("public_address: 192.0.2.12", "public_address: 192.0.2.300"))
    out_dir = tmp_path / "out"
    code, _, err = render(capsys, str(repo), "--all", "--out", str(out_dir))
    assert code == 1
    assert "hosts/web2.yaml" in err and "nothing written" in err
    assert not out_dir.exists()


def test_unknown_host_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = render(
        capsys, str(EXAMPLE), "--host", "web1", "--host", "nosuch", "--out", str(tmp_path / "o")
    )
    assert code == 1 and "nosuch" in err and "web1" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("template", "flags", "expect"),
    [
        ("{{ 'a' * 10**9 }}\n", [], "templates/motd.j2:1: template refused by the sandbox: '*' (repetition)"),
        ("{% for i in range(100000) %}{{ 'x' * 730 }}\n{% endfor %}", [],
         "templates/motd.j2: the output is larger than 1 MiB, the limit per file (render.max_file_bytes)"),
        ("{{ 'x' * 70000 }}", ["--max-file-bytes", "64K"], "the output is larger than 64 KiB"),
        ("ok\n{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
         ["--render-timeout", "2"], "templates/motd.j2:2: template rendering took longer than 2 s"),
    ],
)  # fmt: skip
def test_a_template_that_breaks_a_bound_is_refused_and_nothing_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], template: str, flags: list[str], expect: str
) -> None:
    repo = copy_example(tmp_path)
    (repo / "templates" / "motd.j2").write_text(template)
    out_dir = tmp_path / "out"
    started = time.monotonic()
    code, _, err = render(capsys, str(repo), "--all", "--out", str(out_dir), *flags)
    assert code == 1 and expect in err, err
    assert "render refused" in err and "nothing written" in err and "Traceback" not in err
    assert time.monotonic() - started < 8
    assert not out_dir.exists()
