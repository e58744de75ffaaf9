"""Render limits for the commands that render (render, plan, apply): flags and one helper.

The fleet is loaded here while a render worker starts (its imports overlap the YAML load),
then every selected host is rendered in that worker under the limits; the engine uses those
results and never renders in this process (``reconciler.engine.fleet.seed_rendered``).
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from reconciler.daemon.config_values import ConfigError, parse_size
from reconciler.domains.bounded_render import RenderRejected, RenderResults, RenderWorker
from reconciler.domains.render_limits import RenderLimits, format_size
from reconciler.errors import Terminal

if TYPE_CHECKING:
    from reconciler.fleet.model import Fleet

DEFAULTS = RenderLimits()


class RenderRefused(Terminal):
    """A render broke a bound (the message says which, where, and the flag to change)."""


def _size(flag: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            return parse_size(text, flag)
        except ConfigError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return parse


def add_render_args(p: argparse.ArgumentParser) -> None:
    d, size = DEFAULTS, format_size
    g = p.add_argument_group("render limits (a template that breaks one is refused)")
    g.add_argument("--render-timeout", type=float, default=d.timeout, metavar="S",
                   help=f"seconds to render every selected host (default {d.timeout:g})")  # fmt: skip
    g.add_argument("--render-memory", type=_size("--render-memory"), default=d.memory, metavar="SIZE",
                   help=f"memory of the render worker (default {size(d.memory)})")  # fmt: skip
    g.add_argument("--max-file-bytes", type=_size("--max-file-bytes"), default=d.max_file_bytes,
                   metavar="SIZE", help=f"a rendered file (default {size(d.max_file_bytes)})")  # fmt: skip
    g.add_argument("--max-host-bytes", type=_size("--max-host-bytes"), default=d.max_host_bytes,
                   metavar="SIZE", help=f"a host, all files (default {size(d.max_host_bytes)})")  # fmt: skip


def limits_from_args(args: argparse.Namespace) -> RenderLimits:
    return RenderLimits(
        timeout=args.render_timeout,
        memory=args.render_memory,
        max_file_bytes=args.max_file_bytes,
        max_host_bytes=max(args.max_host_bytes, args.max_file_bytes),
    )


def load_and_render(
    load: Callable[[], Fleet], hosts: Callable[[Fleet], Sequence[str]], limits: RenderLimits
) -> tuple[Fleet, RenderResults]:
    """``load()`` the fleet and render ``hosts(fleet)`` under ``limits``; raises the loader's
    errors, or ``RenderRefused`` when a bound is broken. Render errors of single hosts are in
    the results."""

    async def main() -> tuple[Fleet, RenderResults | RenderRejected]:
        worker = RenderWorker(limits)
        try:
            await worker.start()
            fleet = await asyncio.to_thread(load)
            return fleet, await worker.render(fleet, hosts(fleet))
        finally:
            await worker.close()

    fleet, result = asyncio.run(main())
    if isinstance(result, RenderRejected):
        raise RenderRefused(f"render refused: {result.reason}")
    return fleet, result
