"""`reconciler validate`: exit codes, summary, every error on stderr, --json, never a traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from reconciler.cli import main
from reconciler.engine.identity import derived_fleet_id

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "fleet-repo-example"


def bad_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    shutil.copytree(EXAMPLE, repo)
    web2 = repo / "hosts" / "web2.yaml"
    web2.write_text(web2.read_text().replace("roles: [web]", "roles: [web, cache]"))
    db1 = repo / "hosts" / "db1.yaml"
    db1.write_text(db1.read_text().replace("port: 22", "port: 0"))
    return repo


def test_valid_fleet_exit_0_and_summary(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(EXAMPLE)]) == 0
    out, err = capsys.readouterr()
    assert out == (
        "fleet example: 4 hosts, 6 links, 2 roles, 1 site, 1 AppArmor profile, 1 managed file; "
        "every host rendered\n"
    )
    assert err == ID_NOTE + "\n"


# the example pins no fleet id: validate says so (a note on stderr, not a warning)
ID_NOTE = (
    f"fleet.yaml: note: id: not pinned: hosts record the fleet id {derived_fleet_id('example')}, derived "
    "from the name 'example', so another fleet with that name would pass for this one; pin a unique id "
    "(e.g. `id: ` and the output of `uuidgen`) before the first apply (changing it later needs "
    "`reconciler apply --adopt` on every host)"
)


def test_a_pinned_fleet_id_gives_no_note_and_shows_in_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(EXAMPLE, repo)
    fleet = repo / "fleet.yaml"
    fleet.write_text(fleet.read_text().replace("name: example\n", "name: example\nid: shop-0001-aaaa\n"))
    assert main(["validate", str(repo)]) == 0
    assert capsys.readouterr().err == ""
    assert main(["validate", "--json", str(repo)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["fleet_id"], data["fleet_id_pinned"]) == ("shop-0001-aaaa", True)
    assert main(["validate", "--json", str(EXAMPLE)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["fleet_id"], data["fleet_id_pinned"]) == (derived_fleet_id("example"), False)
    fleet.write_text(fleet.read_text().replace("id: shop-0001-aaaa", "id: short"))
    assert main(["validate", str(repo)]) == 1
    assert (
        "fleet.yaml:5:5: id: 'short' is not valid: must be this fleet's stable id" in capsys.readouterr().err
    )


def test_repo_defaults_to_current_directory(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(EXAMPLE)
    assert main(["validate"]) == 0
    assert capsys.readouterr().out.startswith("fleet example: 4 hosts")


def test_invalid_fleet_exit_1_every_error_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["validate", str(bad_repo(tmp_path))]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        "hosts/db1.yaml:9:9: ssh.port: 0 is less than the minimum 1",
        "hosts/web2.yaml:6:14: roles[1]: unknown role 'cache' (known: db, web)",
        f"fleet repo {tmp_path / 'repo'} is invalid: 2 errors",
    ]


def test_warnings_go_to_stderr_and_still_exit_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(EXAMPLE, repo)
    fleet = repo / "fleet.yaml"
    fleet.write_text(fleet.read_text().replace("[aes256gcm16-x25519, aes256gcm16-ecp384]", "[aes256gcm16]"))
    assert main(["validate", str(repo)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("fleet example:")
    assert err == (
        "fleet.yaml:12:19: mesh.esp_proposals[0]: warning: aes256gcm16: ESP proposal without a key exchange "
        "method: no perfect forward secrecy\n" + ID_NOTE + "\n"
    )


def test_json_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "--json", str(EXAMPLE)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["valid"] is True and data["fleet"] == "example"
    assert data["counts"]["hosts"] == 4 and data["counts"]["links"] == 6
    assert main(["validate", str(bad_repo(tmp_path)), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["valid"] is False
    assert {(e["file"], e["line"], e["col"], e["field"]) for e in data["errors"]} == {
        ("hosts/db1.yaml", 9, 9, "ssh.port"),
        ("hosts/web2.yaml", 6, 14, "roles[1]"),
    }


def test_usage_error_exit_2() -> None:
    with pytest.raises(SystemExit) as info:
        main(["validate", "--nope"])
    assert info.value.code == 2


@pytest.mark.parametrize(
    "content",
    [b"\xff\xfe\x00garbage", b"{{{{", b"- !!python/name:os.system\n", b"a: &a [*a]\n", b"[" * 50000, b"\x00"],
)
def test_hostile_input_never_gives_a_traceback(tmp_path: Path, content: bytes) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(EXAMPLE, repo)
    (repo / "fleet.yaml").write_bytes(content)
    proc = subprocess.run(
        [sys.executable, "-m", "reconciler", "validate", str(repo)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("fleet.yaml:")


def test_missing_repo_is_a_clean_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert "cannot read the fleet repo: No such file or directory" in err
