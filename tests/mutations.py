"""Mutation check: each mutation below breaks one safety claim in a COPY of the tree, runs only
the unit tests that guard that claim, and expects them to FAIL. A mutation the tests do not
catch (they still pass) fails the run, and so does a mutation that no longer applies (the code
moved or changed shape): update the mutation here, do not drop it.

Mutations target behaviour, not line numbers: each names the function it edits (found with
``ast`` in any file matching the glob, so a move to another module is followed) and one or more
alternative regex edits; the first alternative that matches is used.

    python3 tests/mutations.py            # all mutations (CI: .ci/run)
    python3 tests/mutations.py NAME...    # some of them
    python3 tests/mutations.py --check    # only check that every mutation still applies
    python3 tests/mutations.py --list
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IGNORE = shutil.ignore_patterns(".git", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache", "bench")


@dataclass(frozen=True)
class Edit:
    glob: str  # files to search, relative to the repo root
    pattern: str  # a regex (re.MULTILINE), applied inside ``function`` when given
    replacement: str
    function: str | None = None  # a def (any nesting) the edit is limited to


@dataclass(frozen=True)
class Mutation:
    name: str
    claim: str  # what the tests must notice
    edits: tuple[Edit, ...]  # alternatives: the first that applies is used
    tests: tuple[str, ...]  # pytest targets (relative to the repo root)


PY = "reconciler/**/*.py"
TEMPLATES = ("reconciler/**/*.html", "reconciler/**/*.j2", "reconciler/**/*.jinja", "reconciler/**/*.jinja2")

MUTATIONS: tuple[Mutation, ...] = (
    Mutation(
        "lockout-network-end-only",
        "the management-SSH lockout check probes both ends of each source network",
        (Edit(PY, r"\b(\w+)\.broadcast_address\b", r"\1.network_address", function="check_management"),),
        ("tests/unit/test_firewall_management_check.py",),
    ),
    Mutation(
        "status-reason-unescaped",
        "a refused commit's reason is escaped on the status page",
        (
            Edit(PY, r"_e\((rejection\.get\(['\"]reason['\"]\))\)", r"\1", function="render_status_page"),
            *(Edit(glob, r"\{\{\s*([^{}|]*reason[^{}|]*?)\s*\}\}", r"{{ \1 | safe }}") for glob in TEMPLATES),
            Edit(
                "reconciler/daemon/**/*.py",
                r"autoescape\s*=\s*(?:[\w.]+\([^)]*\)|[^,)\n]+)",
                "autoescape=False",
            ),
        ),
        ("tests/unit/test_status_page.py",),
    ),
    Mutation(
        "known-hosts-no-key-accepted",
        "a host with no trusted key is refused before any connection",
        (Edit(PY, r"if not (\w+) and not (\w+)\s*:", "if False:", function="_matching"),),
        ("tests/unit/test_host_keys.py",),
    ),
    Mutation(
        "deadman-confirms-over-old-connection",
        "the dead-man switch confirms only over a NEW connection",
        (Edit(PY, r"\b(\w+)\.fresh\(", r"\1.get(", function="apply_firewall"),),
        (
            "tests/unit/test_deadman.py::test_good_rules_are_confirmed_over_a_new_connection_and_the_rollback_is_disarmed",
        ),
    ),
    Mutation(
        "keys-collect-accepts-private-key",
        "keys collect never writes a private key into the fleet repo",
        (
            Edit(PY, r"\bcheck_public_key\(\s*\w+\s*\)", "None", function="collect"),
            Edit(
                PY,
                r'(\A[ \t]*def check_public_key\([^)]*\)[^:]*:\n(?:[ \t]*"""[\s\S]*?"""\n)?)([ \t]*)',
                r"\1\2return None\n\2",
                function="check_public_key",
            ),
        ),
        ("tests/unit/test_commands_keys.py",),
    ),
    Mutation(
        "outbox-no-lease",
        "two processes delivering from one outbox never send one message twice",
        (Edit(PY, r"\bnow\s*\+\s*self\.lease_seconds\b", "now", function="_claim"),),
        ("tests/unit/test_outbox_lease.py",),
    ),
    Mutation(
        "apt-any-removal-allowed",
        "a package removal apt wants that no role purges or replaces is refused at plan time",
        (
            Edit(
                PY,
                r"return tuple\(c for c in \w+\.removals if [^\n]*\)",
                "return ()",
                function="refused_removals",
            ),
        ),
        ("tests/unit/test_aptsim.py",),
    ),
    Mutation(
        "lab-apt-proxy-any-host",
        "the lab's apt proxy forwards only to the machine's own mirror hosts",
        (Edit(PY, r'\(url\.hostname or ""\) not in self\.allow', "False", function="_serve"),),
        ("tests/unit/test_lab_aptproxy.py",),
    ),
)


class StaleMutation(RuntimeError):
    """The mutation no longer applies to the code: update tests/mutations.py."""


def _function_span(source: str, name: str) -> list[tuple[int, int]]:
    """(start, end) character offsets of every def named ``name`` in ``source``."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    starts = [0]
    for line in source.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    spans = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name:
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            assert node.end_lineno is not None
            spans.append((starts[first - 1], starts[node.end_lineno]))
    return spans


def plan(root: Path, mutation: Mutation) -> tuple[Path, str, str]:
    """(file, original text, mutated text) for the first alternative that applies."""
    tried = []
    for edit in mutation.edits:
        for path in sorted(root.glob(edit.glob)):
            if not path.is_file():
                continue
            text = path.read_text(encoding="utf-8")
            spans = _function_span(text, edit.function) if edit.function else [(0, len(text))]
            for start, end in spans:
                part = text[start:end]
                mutated, n = re.subn(edit.pattern, edit.replacement, part, flags=re.MULTILINE)
                if n and mutated != part:
                    return path, text, text[:start] + mutated + text[end:]
        tried.append(f"{edit.function or '(any)'} in {edit.glob}: /{edit.pattern}/")
    raise StaleMutation(
        f"mutation {mutation.name} ({mutation.claim}) no longer applies; tried: " + "; ".join(tried)
    )


def _pytest(root: Path, targets: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(root), RECONCILER_REQUIRE_LAB="1")
    argv = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--no-header", *targets]
    return subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=900)


def _tail(res: subprocess.CompletedProcess[str], lines: int = 15) -> str:
    return "\n".join((res.stdout + res.stderr).strip().splitlines()[-lines:])


def run(mutations: list[Mutation]) -> int:
    with tempfile.TemporaryDirectory(prefix="rcl-mutations-") as tmp:
        root = Path(tmp) / "tree"
        shutil.copytree(REPO, root, ignore=IGNORE, symlinks=True)
        stale = []
        planned = []
        for m in mutations:
            try:
                planned.append((m, plan(root, m)))
            except StaleMutation as err:
                stale.append(str(err))
        targets = tuple(dict.fromkeys(t for m in mutations for t in m.tests))
        started = time.monotonic()
        base = _pytest(root, targets)
        print(f"baseline (unmutated copy): exit {base.returncode} in {time.monotonic() - started:.1f} s")
        if base.returncode != 0:
            print("the guarding tests must pass on the unmutated tree first:\n" + _tail(base, 40))
            return 1
        survived = []
        for m, (path, original, mutated) in planned:
            path.write_text(mutated, encoding="utf-8")
            started = time.monotonic()
            try:
                res = _pytest(root, m.tests)
            finally:
                path.write_text(original, encoding="utf-8")
            took = time.monotonic() - started
            where = path.relative_to(root)
            if res.returncode == 1:
                print(f"caught    {m.name:<40} {took:5.1f} s  ({where})")
            else:
                what = "SURVIVED" if res.returncode == 0 else f"ERROR (pytest exit {res.returncode})"
                print(f"{what:<9} {m.name:<40} {took:5.1f} s  ({where}): {m.claim}\n{_tail(res)}")
                survived.append(m.name)
    for s in stale:
        print(f"STALE     {s}")
    if survived or stale:
        print(f"{len(survived)} mutation(s) not caught, {len(stale)} no longer apply: claims left unproven")
        return 1
    print(f"all {len(planned)} mutations caught")
    return 0


def check(mutations: list[Mutation]) -> list[str]:
    """Problems: mutations that no longer apply to the tree, or name no existing test file."""
    problems = []
    for m in mutations:
        try:
            plan(REPO, m)
        except StaleMutation as err:
            problems.append(str(err))
        for target in m.tests:
            if not (REPO / target.split("::")[0]).is_file():
                problems.append(f"mutation {m.name}: test {target} does not exist")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="mutations to run (default: all)")
    ap.add_argument("--check", action="store_true", help="only check that every mutation still applies")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args(argv)
    by_name = {m.name: m for m in MUTATIONS}
    unknown = [n for n in args.names if n not in by_name]
    if unknown:
        ap.error(f"unknown mutation(s): {', '.join(unknown)}; known: {', '.join(by_name)}")
    chosen = [by_name[n] for n in args.names] or list(MUTATIONS)
    if args.list:
        for m in chosen:
            print(f"{m.name:<40} {m.claim}")
        return 0
    if args.check:
        problems = check(chosen)
        for p in problems:
            print(p)
        return 1 if problems else 0
    return run(chosen)


if __name__ == "__main__":
    sys.exit(main())
