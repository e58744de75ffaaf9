"""Run a command (the test suite) and fail if processes it started are still running after it.

    python3 tests/leftovers.py -- make test

Every process the suite starts inherits a unique ``RECONCILER_SUITE_TAG`` in its environment
(daemons that detach, like gpg-agent or an sshd, keep it), so after the command the processes
carrying the tag are exactly the suite's leftovers, whatever else runs on the machine. The
process list is compared before and after: a leftover is a process that was not there before
and carries the tag. Leftovers are listed and the exit status is 1 (they are NOT killed: the
listing is the evidence, and the CI machine is thrown away).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

TAG_VAR = "RECONCILER_SUITE_TAG"
# seconds for processes that are already exiting (a SIGTERMed daemon) to go
GRACE = float(os.environ.get("RECONCILER_LEFTOVER_GRACE", "10"))


def processes() -> dict[int, str]:
    """pid -> start time (field 22 of /proc/PID/stat): a pid reused later is another process."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            found[int(entry)] = stat.rsplit(")", 1)[1].split()[19]
    return found


def tagged(pid: int, tag: str) -> bool:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"{TAG_VAR}={tag}".encode() in env.split(b"\0")


def describe(pid: int) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmd = "?"
    return f"{pid} {cmd[:200]}"


def leftovers(before: dict[int, str], tag: str) -> list[int]:
    me = os.getpid()
    return [
        pid
        for pid, start in processes().items()
        if pid != me and before.get(pid) != start and tagged(pid, tag)
    ]


def main(argv: list[str]) -> int:
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    tag = uuid.uuid4().hex
    before = processes()
    rc = subprocess.run(argv, env=dict(os.environ, **{TAG_VAR: tag})).returncode
    deadline = time.monotonic() + GRACE
    left = leftovers(before, tag)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = leftovers(before, tag)
    if left:
        print(f"{len(left)} process(es) started by `{' '.join(argv)}` are still running:", file=sys.stderr)
        for pid in left:
            print(f"  {describe(pid)}", file=sys.stderr)
        return rc or 1
    print(f"no leftover processes after `{' '.join(argv)}`")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
