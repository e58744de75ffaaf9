"""Run the snapshot's own host commands on this machine (the same sh/find/tar a host runs)."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Result:
    exit_status: int
    stdout: bytes
    stderr: bytes


class LocalRunner:
    """Runs the snapshot's own commands on this machine (the same sh/find/tar a host runs).
    ``env``: extra environment (fault injection puts a shim first on PATH)."""

    host = "local"

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self.calls = 0
        self.env = {**os.environ, **env} if env else None

    async def run(
        self, argv: Sequence[str], *, stdin: bytes | None = None, timeout: float | None = None
    ) -> Result:
        self.calls += 1
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.env,
        )
        out, err = await proc.communicate(stdin or b"")
        return Result(proc.returncode or 0, out, err)

    async def run_script(
        self,
        script: str,
        *,
        args: Sequence[str] = (),
        stdin_after: bytes | None = None,
        timeout: float | None = None,
    ) -> Result:
        return await self.run(["sh", "-c", script, "sh", *args], stdin=stdin_after, timeout=timeout)


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", f"--git-dir={repo}", *args], check=True, capture_output=True, text=True
    ).stdout


def git_bytes(repo: Path, *args: str) -> bytes:
    return subprocess.run(["git", f"--git-dir={repo}", *args], check=True, capture_output=True).stdout


def all_objects(repo: Path) -> bytes:
    """Every object of the repo, reachable or not."""
    return git_bytes(repo, "cat-file", "--batch-all-objects", "--batch")
