"""Hypothesis: random bytes, random YAML and random mutations of the example fleet never crash
the loader nor hang it. ``check_files`` is called directly (it has no catch-all), so any
unexpected exception fails the test."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler.errors import Problem
from reconciler.fleet.load import check_files, read_tree
from reconciler.fleet.yamlsafe import load_documents

EXAMPLE = Path(__file__).resolve().parents[2] / "fleet-repo-example"
BASE, _ = read_tree(EXAMPLE)
YAML_FILES = sorted(k for k in BASE if k.endswith(".yaml"))
LIMIT = 2.0  # seconds per example, far above the real cost (milliseconds)

FUZZ = settings(
    max_examples=150,
    deadline=None,  # timed by hand below: the first call pays for imports and schema compilation
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def check(files: dict[str, bytes]) -> list[Problem]:
    start = time.perf_counter()
    fleet, problems = check_files(files)
    assert time.perf_counter() - start < LIMIT
    assert (fleet is None) == any(p.severity == "error" for p in problems)
    for p in problems:
        assert isinstance(p.line, int) and isinstance(p.col, int) and p.message
        assert "\n" not in p.message
    return problems


@FUZZ
@given(st.binary(max_size=2000))
def test_random_bytes_never_crash(data: bytes) -> None:
    start = time.perf_counter()
    load_documents("x.yaml", data)
    load_documents("x.yaml", data, pure_python=True)
    assert time.perf_counter() - start < LIMIT
    check({**BASE, "hosts/web1.yaml": data})


YAML_TOKENS = st.sampled_from(
    [
        "a",
        "name",
        "kind",
        "Host",
        "apiVersion",
        "reconciler/v1",
        ": ",
        ":",
        "- ",
        "-",
        "[",
        "]",
        "{",
        "}",
        ",",
        "\n",
        "  ",
        "&x ",
        "*x",
        "&y ",
        "*y",
        "!!python/object:os.system ",
        "!!str ",
        "!tag ",
        "'",
        '"',
        "#",
        "---\n",
        "...\n",
        "? ",
        "|\n",
        ">\n",
        "<<: ",
        "0644",
        "yes",
        "~",
        "1e9",
        "0x1f",
        "\\n",
        "\t",
        "é",
        "\x00",
        "\ufeff",
        "%YAML 1.1\n",
        "%TAG ! tag:x,2000:\n",
        "192.0.2.1",
        "10.99.0.0/24",
    ]
)


@FUZZ
@given(st.lists(YAML_TOKENS, max_size=80), st.sampled_from(YAML_FILES))
def test_random_yaml_never_crashes(tokens: list[str], target: str) -> None:
    text = "".join(tokens)
    check({**BASE, target: text.encode("utf-8", errors="surrogatepass")})


def leaves(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(node, dict):
        return [path] + [p for k, v in node.items() for p in leaves(v, (*path, k))]
    if isinstance(node, list):
        return [path] + [p for i, v in enumerate(node) for p in leaves(v, (*path, i))]
    return [path]


JSONISH = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
    | st.sampled_from(
        ["web1", "db1", "10.99.0.7", "192.0.2.11", "/etc/motd", "3des-sha1-modp1024", "tunnel", "racoon"]
    ),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=10,
)


@FUZZ
@given(st.sampled_from(YAML_FILES), st.data())
def test_structured_mutations_of_the_example_never_crash(target: str, data: st.DataObject) -> None:
    doc = yaml.safe_load(BASE[target])
    paths = leaves(doc)
    path = data.draw(st.sampled_from(paths))
    action = data.draw(st.sampled_from(["replace", "delete", "add"]))
    value = data.draw(JSONISH)
    if not path:
        doc = value
    else:
        parent = doc
        for part in path[:-1]:
            parent = parent[part]
        if action == "delete":
            del parent[path[-1]]
        elif action == "add" and isinstance(parent, dict):
            parent[data.draw(st.text(max_size=12))] = value
        elif action == "add" and isinstance(parent, list):
            parent.append(value)
        else:
            parent[path[-1]] = value
    check({**BASE, target: yaml.safe_dump(doc, allow_unicode=True).encode()})


@FUZZ
@given(st.sampled_from(YAML_FILES), st.data())
def test_text_mutations_of_the_example_never_crash(target: str, data: st.DataObject) -> None:
    lines = BASE[target].decode().splitlines(keepends=True)
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        i = data.draw(st.integers(min_value=0, max_value=max(len(lines) - 1, 0)))
        op = data.draw(st.sampled_from(["drop", "dup", "swap", "insert", "indent"]))
        if not lines:
            break
        if op == "drop":
            del lines[i]
        elif op == "dup":
            lines.insert(i, lines[i])
        elif op == "swap":
            j = data.draw(st.integers(min_value=0, max_value=len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == "insert":
            pos = data.draw(st.integers(min_value=0, max_value=len(lines[i])))
            lines[i] = lines[i][:pos] + data.draw(st.text(max_size=8)) + lines[i][pos:]
        else:
            lines[i] = "  " + lines[i]
    check({**BASE, target: "".join(lines).encode("utf-8", errors="surrogatepass")})


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(["legacy_crypto", "public_interface", "roles", "ssh"]), JSONISH, max_size=3
    )
)
def test_random_host_fields_never_crash(fields: dict[str, Any]) -> None:
    doc = yaml.safe_load(BASE["hosts/web1.yaml"])
    doc.update(fields)
    check({**BASE, "hosts/web1.yaml": yaml.safe_dump(doc).encode()})
