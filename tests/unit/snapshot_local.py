"""Run the snapshot's own host commands on this machine (the same sh/find/tar a host runs):
``reconciler.host.fake.FakeHost`` rooted at /."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path

from reconciler.host.fake import FakeHost


class LocalRunner(FakeHost):
    """A fake host whose root is this machine's (the tests give it their own temporary paths).
    ``env``: extra environment (fault injection puts a shim first on PATH)."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        super().__init__(root=Path("/"), host="local", env=dict(env or {}))


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", f"--git-dir={repo}", *args], check=True, capture_output=True, text=True
    ).stdout


def git_bytes(repo: Path, *args: str) -> bytes:
    return subprocess.run(["git", f"--git-dir={repo}", *args], check=True, capture_output=True).stdout


def all_objects(repo: Path) -> bytes:
    """Every object of the repo, reachable or not."""
    return git_bytes(repo, "cat-file", "--batch-all-objects", "--batch")
