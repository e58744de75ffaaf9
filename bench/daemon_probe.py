"""``reconciler run`` with a probe for the scale bench (bench_scale.py): on SIGUSR2 the daemon
process writes ``probe-<k>.json`` into ``$BENCH_PROBE_DIR`` (k counts from 1): its live asyncio
tasks (by name), gc counts and object count after a full collection, and, when
``BENCH_TRACEMALLOC`` is set (a frame depth), a tracemalloc snapshot ``probe-<k>.snap``.

Run as ``python bench/daemon_probe.py`` with the daemon's environment; nothing of the daemon is
changed (the probe is a Python signal handler in the same process, run between bytecodes on the
main thread, where the daemon's event loop runs).
"""

from __future__ import annotations

import asyncio
import collections
import gc
import json
import os
import signal
import sys
import tracemalloc
from pathlib import Path
from types import FrameType


def main() -> int:
    out = Path(os.environ["BENCH_PROBE_DIR"])
    depth = int(os.environ.get("BENCH_TRACEMALLOC", "0") or 0)
    if depth:
        tracemalloc.start(depth)
    count = 0

    def probe(signum: int, frame: FrameType | None) -> None:
        nonlocal count
        count += 1
        collected = gc.collect()
        try:
            tasks = asyncio.all_tasks(asyncio.get_running_loop())
        except RuntimeError:
            tasks = set()
        names = collections.Counter(
            t.get_name().rstrip("0123456789").rstrip("-")
            if t.get_name().startswith("Task-")
            else t.get_name()
            for t in tasks
        )
        data = {
            "tasks": len(tasks),
            "task_names": dict(names.most_common(20)),
            "gc_counts": list(gc.get_count()),
            "gc_collected": collected,
            "gc_objects": len(gc.get_objects()),
            "traced_kb": tracemalloc.get_traced_memory()[0] / 1024 if depth else None,
        }
        if depth:
            tracemalloc.take_snapshot().dump(str(out / f"probe-{count}.snap"))
        tmp = out / f".probe-{count}.json"
        tmp.write_text(json.dumps(data))
        tmp.rename(out / f"probe-{count}.json")

    signal.signal(signal.SIGUSR2, probe)
    from reconciler.cli import main as cli_main

    sys.argv = ["reconciler", "run"]
    return int(cli_main() or 0)


if __name__ == "__main__":
    sys.exit(main())
