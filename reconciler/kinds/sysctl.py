"""Kind ``sysctl``: kernel parameters a role declares (``sysctl: {net.ipv4.ip_forward: "0"}``).

- desired: ``SysctlSetting`` per key (``reconciler.domains.sysctl`` renders them with the
  drop-in ``DROPIN`` as a ``FileResource`` and the ``sysctl`` handler that loads it);
- observe: ONE ``sysctl KEY...`` in the observation script (the keys as quoted arguments;
  ``key = value`` lines, so a key the kernel lacks is simply absent, never misaligned);
- plan: a ``set-sysctl`` action per key whose live value differs (runs of whitespace compare
  equal: the kernel prints ``32768<TAB>60999``), with the handler, so the plan reloads it;
- apply: the drop-in goes through the file transaction (staged, swapped by rename, restored on
  failure); the handler's reload is ``sysctl -q -p DROPIN``; the actions are done when that
  reload succeeded. Someone running ``sysctl -w`` later is drift the next plan shows.

On a lab host (a network namespace sharing the machine's kernel) only ``net.*`` keys are the
host's own: tests and the example fleet use only those. On real hosts any key works.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from types import MappingProxyType

from reconciler.host.script import ScriptBuilder
from reconciler.kinds.actions import Action, ActionKind
from reconciler.kinds.kind import ApplyRun, PlanStep, SectionReader
from reconciler.kinds.observed import Observed
from reconciler.kinds.resources import Desired, Handler, SysctlSetting

DROPIN = "/etc/sysctl.d/60-reconciler.conf"
HANDLER = "sysctl"
# dotted lowercase words: never a '/', never '..', never an option (the fleet schema says so too)
KEY = re.compile(r"^[a-z0-9_]+(\.[a-z0-9_-]+)+$")
VALUE = re.compile(r"^[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?$")
SECTION = "sysctl"


def check(key: str, value: str) -> str | None:
    """Why a key or value cannot be declared, or None."""
    if not KEY.match(key) or len(key) > 128:
        return f"sysctl key {key!r}: dotted lowercase words (a-z 0-9 _ -), no '/' and no '..'"
    if not VALUE.match(value) or len(value) > 1024:
        return f"sysctl {key}: value {value!r} must be printable, one line, no leading or trailing space"
    return None


def normalise(value: str) -> str:
    return " ".join(value.split())


def dropin(settings: Sequence[SysctlSetting]) -> bytes:
    lines = ["# managed by reconciler: kernel parameters of this host's roles"]
    lines += [f"{s.key} = {s.value}" for s in sorted(settings, key=lambda s: s.key)]
    return ("\n".join(lines) + "\n").encode()


def handler() -> Handler:
    return Handler(name=HANDLER, reload=("sysctl", "-q", "-p", DROPIN))


def parse(text: str) -> dict[str, str]:
    """``sysctl KEY...`` output: ``key = value`` lines (value as printed, normalised)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(" = ")
        if sep and KEY.match(key):
            out[key] = normalise(value)
    return out


def diff(settings: Sequence[SysctlSetting], live: Mapping[str, str] | None) -> list[Action]:
    """One ``set-sysctl`` per key whose live value differs (None: not observed: nothing known)."""
    if live is None:
        return []
    out: list[Action] = []
    for s in settings:
        have = live.get(s.key)
        if have == normalise(s.value):
            continue
        reason = (
            f"{have!r} live, should be {s.value!r}"
            if have is not None
            else f"unknown to this kernel (no /proc/sys/{s.key.replace('.', '/')}), should be {s.value!r}"
        )
        diff_text = f"-{s.key} = {have}\n+{s.key} = {s.value}\n" if have is not None else ""
        out.append(
            Action(ActionKind.SET_SYSCTL, f"sysctl {s.key}", s.domain, reason, diff_text, None, s.handler, s)
        )
    return out


class SysctlKind:
    name = "sysctl"
    shell = ""

    def wanted(self, desired: Desired) -> bool:
        return bool(desired.sysctl)

    def probe(self, desired: Desired, b: ScriptBuilder) -> None:
        keys = [s.key for s in desired.sysctl if KEY.match(s.key)]
        # exit 1 (some key unknown) still prints the others
        b.add(f"frame {SECTION} sysctl {b.refs(keys)}")

    def parse(self, desired: Desired, read: SectionReader, observed: Observed) -> Observed:
        text = read(SECTION, "sysctl", ok=(0, 1, 255))
        if text is None:
            return observed
        return replace(observed, sysctl=MappingProxyType(parse(text)))

    def plan(self, step: PlanStep) -> Sequence[Action]:
        return diff(step.desired.sysctl, step.observed.sysctl)

    async def apply(self, run: ApplyRun) -> None:
        """The values are set by the handler's reload (``sysctl -p`` of the swapped drop-in)."""
        for i in run.indices({ActionKind.SET_SYSCTL}):
            name = run.plan.actions[i].handler or HANDLER
            if name in run.reloaded:
                run.mark(i, "done", f"loaded from {DROPIN}")
            elif name in run.failed_handlers:
                run.mark(i, "failed", f"{DROPIN} did not load (see the reload of {name})")


KIND = SysctlKind()
