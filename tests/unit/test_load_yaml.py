# ruff: noqa: E501 - expected error lines are long
"""YAML safety rules of the fleet loader: each hostile input gives a located error, fast."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from reconciler.errors import FleetInvalid
from reconciler.fleet import yamlsafe
from reconciler.fleet.load import MAX_TOTAL_BYTES, load_fleet, load_fleet_files, read_tree
from reconciler.fleet.yamlsafe import load_documents

EXAMPLE = Path(__file__).resolve().parents[2] / "fleet-repo-example"


def example_files() -> dict[str, bytes]:
    files, problems = read_tree(EXAMPLE)
    assert problems == []
    return files


def errors(files: dict[str, bytes]) -> list[str]:
    with pytest.raises(FleetInvalid) as info:
        load_fleet_files(files)
    return [str(p) for p in info.value.problems]


def with_host(text: str, name: str = "hosts/web1.yaml") -> dict[str, bytes]:
    files = example_files()
    files[name] = text.encode()
    return files


WEB1 = """apiVersion: reconciler/v1
kind: Host
name: web1
public_address: 192.0.2.11
internal_address: 10.99.0.11
roles: [web]
"""


def test_duplicate_key_names_both_lines() -> None:
    errs = errors(with_host(WEB1 + "name: web9\n"))
    assert "hosts/web1.yaml:7:1: name: duplicate key 'name' (first at line 3, again at line 7)" in errs


def test_python_tag_is_rejected_and_never_constructed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    text = WEB1 + f"ssh: !!python/object/apply:os.system ['touch {marker}']\n"
    errs = errors(with_host(text))
    assert any(
        e.startswith(
            "hosts/web1.yaml:7:6: ssh: tag 'tag:yaml.org,2002:python/object/apply:os.system' is not allowed"
        )
        for e in errs
    ), errs
    assert not marker.exists()


def test_application_tags_binary_set_timestamp_rejected() -> None:
    docs, problems = load_documents("x.yaml", b"a: !foo 1\nb: !!binary aGk=\nc: !!set {x}\nd: 2001-12-14\n")
    assert [str(p) for p in problems] == [
        "x.yaml:1:4: a: tag '!foo' is not allowed (only plain YAML data)",
        "x.yaml:2:4: b: tag 'tag:yaml.org,2002:binary' is not allowed (only plain YAML data)",
        "x.yaml:3:4: c: tag 'tag:yaml.org,2002:set' is not allowed (only plain YAML data)",
    ]
    assert docs[0].data["d"] == "2001-12-14"  # no timestamps: a plain string


def test_plain_scalars_resolve_strictly() -> None:
    docs, problems = load_documents("x.yaml", b"a: [yes, no, on, off, true, 0644, 12, 0x1f, 1.5, ~, '7']\n")
    assert problems == []
    assert docs[0].data["a"] == ["yes", "no", "on", "off", True, "0644", 12, 31, 1.5, None, "7"]


def test_billion_laughs_fails_fast_in_bounded_memory() -> None:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 30):
        refs = ",".join([f"*a{i - 1}"] * 10)
        lines.append(f"a{i}: &a{i} [{refs}]")
    bomb = ("apiVersion: reconciler/v1\nkind: Host\n" + "\n".join(lines) + "\n").encode()
    start = time.perf_counter()
    errs = errors(with_host(bomb.decode()))
    assert time.perf_counter() - start < 2
    # a0 has 11 nodes, a1 111, a2 1111: the 8th *a2 inside a3 crosses 10000 expanded nodes
    assert errs == ["hosts/web1.yaml:6:38: a3[7]: aliases expand to more than 10000 nodes (alias bomb?)"]


def test_recursive_and_undefined_aliases() -> None:
    _, problems = load_documents("x.yaml", b"a: &a [1, *a]\n")
    assert [str(p) for p in problems] == ["x.yaml:1:11: a[1]: recursive alias *'a'"]
    _, problems = load_documents("x.yaml", b"a: *nope\n")
    assert [str(p) for p in problems] == ["x.yaml:1:4: a: undefined alias *'nope'"]


def test_small_aliases_are_fine() -> None:
    docs, problems = load_documents("x.yaml", b"a: &n [10.99.0.0/24]\nb: *n\n")
    assert problems == [] and docs[0].data == {"a": ["10.99.0.0/24"], "b": ["10.99.0.0/24"]}


def test_merge_keys_are_refused() -> None:
    _, problems = load_documents("x.yaml", b"base: &b {port: 22}\nssh:\n  <<: *b\n")
    assert [str(p) for p in problems] == [
        "x.yaml:3:3: ssh.<<: merge keys (<<) are not supported: write the keys out"
    ]


def test_complex_keys_are_refused() -> None:
    _, problems = load_documents("x.yaml", b"? [a, b]\n: 1\n")
    assert [str(p) for p in problems] == ["x.yaml:1:3: a mapping key must be a plain string"]


@pytest.mark.parametrize(
    "text",
    [b"[" * 200_000, b"- " * 200_000 + b"x\n", b"a:\n" + b"".join(b" " * i + b"b:\n" for i in range(1, 60))],
)
def test_deep_nesting_is_refused_fast(text: bytes) -> None:
    start = time.perf_counter()
    _, problems = load_documents("x.yaml", text)
    assert time.perf_counter() - start < 1
    assert len(problems) == 1 and problems[0].message == "nesting deeper than 32 levels"


def test_non_utf8_is_refused_with_position() -> None:
    files = example_files()
    files["hosts/web1.yaml"] = WEB1.encode() + b"# caf\xe9\n"
    errs = errors(files)
    assert "hosts/web1.yaml:7:6: not valid UTF-8 (byte 0xe9)" in errs


def test_control_character_in_yaml_stream() -> None:
    _, problems = load_documents("x.yaml", "a: é\nb: \x07\n".encode())
    assert [str(p) for p in problems] == ["x.yaml:2:4: character U+0007 is not allowed in YAML"]


def test_syntax_error_is_located() -> None:
    errs = errors(with_host(WEB1 + "roles: [web\n"))
    assert any(e.startswith("hosts/web1.yaml:8:1: YAML syntax error:") for e in errs), errs


def test_file_size_cap() -> None:
    big = WEB1 + "# " + "x" * (yamlsafe.MAX_FILE_BYTES) + "\n"
    errs = errors(with_host(big))
    assert f"hosts/web1.yaml:0:0: file is {len(big)} bytes; the limit is 1048576" in errs


def test_total_size_cap() -> None:
    files = example_files()
    for i in range(21):
        files[f"templates/big{i:02d}.txt"] = b"x" * (1024 * 1024 - 1)
    errs = errors(files)
    assert any(e.endswith(f"the fleet repo holds more than {MAX_TOTAL_BYTES} bytes") for e in errs), errs


def test_total_size_cap_on_a_tree(tmp_path: Path) -> None:
    repo = copy_example(tmp_path / "repo")
    for i in range(21):
        (repo / "templates" / f"big{i:02d}").write_bytes(b"x" * (1024 * 1024 - 1))
    with pytest.raises(FleetInvalid) as info:
        load_fleet(repo)
    texts = [str(p) for p in info.value.problems]
    assert any(t.endswith("the fleet repo holds more than 20971520 bytes") for t in texts), texts


def copy_example(dest: Path) -> Path:
    import shutil

    shutil.copytree(EXAMPLE, dest)
    return dest


def test_symlink_leaving_the_repo_is_refused(tmp_path: Path) -> None:
    repo = copy_example(tmp_path / "repo")
    secret = tmp_path / "secret.yaml"
    secret.write_text(WEB1)
    (repo / "hosts" / "web1.yaml").unlink()
    os.symlink(secret, repo / "hosts" / "web1.yaml")
    os.symlink("/etc", repo / "templates" / "etc")
    with pytest.raises(FleetInvalid) as info:
        load_fleet(repo)
    texts = [str(p) for p in info.value.problems]
    assert "hosts/web1.yaml:0:0: symlink points outside the fleet repo: refused" in texts
    assert "templates/etc:0:0: symlink points outside the fleet repo: refused" in texts


def test_symlink_inside_the_repo_is_followed(tmp_path: Path) -> None:
    repo = copy_example(tmp_path / "repo")
    (repo / "shared").mkdir()
    (repo / "hosts" / "web1.yaml").rename(repo / "shared" / "web1.yaml")
    os.symlink("../shared/web1.yaml", repo / "hosts" / "web1.yaml")
    fleet = load_fleet(repo)
    assert "web1" in fleet.host_names()


def test_fifo_is_not_read(tmp_path: Path) -> None:
    repo = copy_example(tmp_path / "repo")
    os.mkfifo(repo / "hosts" / "pipe.yaml")
    with pytest.raises(FleetInvalid) as info:
        load_fleet(repo)
    assert "hosts/pipe.yaml:0:0: not a regular file" in [str(p) for p in info.value.problems]


def test_several_documents_per_file_keep_their_lines() -> None:
    files = example_files()
    web2 = files.pop("hosts/web2.yaml").decode()
    web1 = files.pop("hosts/web1.yaml").decode()
    files["hosts/web.yaml"] = (web1 + "---\n" + web2.replace("name: web2", "name: Web2")).encode()
    errs = errors(files)
    line = web1.count("\n") + 1 + 3  # the '---' line, then apiVersion, kind, name
    assert any(e.startswith(f"hosts/web.yaml:{line}:7: name: 'Web2' is not valid") for e in errs), errs


def test_pure_python_parser_agrees_with_libyaml() -> None:
    for rel, data in example_files().items():
        if not rel.endswith(".yaml"):
            continue
        fast, p1 = load_documents(rel, data)
        slow, p2 = load_documents(rel, data, pure_python=True)
        assert p1 == p2 == []
        assert [(d.data, d.marks, d.key_marks) for d in fast] == [
            (d.data, d.marks, d.key_marks) for d in slow
        ]
