"""AppArmor checks: every profile the host's roles declare parses
(``apparmor_parser -Q -K``, as installed, with its local override), and whether it is loaded
in the kernel, which is a skip (with the reason) on a kernel without the AppArmor LSM. Pure.
"""

from __future__ import annotations

from reconciler.verify.checks import Check, failed, passed, skipped
from reconciler.verify.facts import HostFacts


def parse_checks(host: str, profiles: list[tuple[str, str]], facts: HostFacts) -> list[Check]:
    """``profiles``: (profile name, path of the profile file)."""
    out: list[Check] = []
    for name, path in profiles:
        cname = f"apparmor.{name}"
        if facts.error is not None:
            out.append(failed(host, "", cname, f"cannot read {host}: {facts.error}"))
            continue
        sec = facts.get(f"aa:{path}")
        if sec is None:
            out.append(failed(host, "", cname, f"{path} was not checked"))
        elif sec.out.strip() == "NO-PARSER":
            out.append(skipped(host, "", cname, f"apparmor_parser is not installed on {host}"))
        elif sec.ok:
            out.append(passed(host, "", cname, f"apparmor_parser -Q -K {path}: parses (exit 0)"))
        else:
            lines = [
                ln
                for ln in (sec.err + "\n" + sec.out).splitlines()
                if ln.strip() and "Cache read/write" not in ln
            ]
            out.append(
                failed(host, "", cname, f"{path} does not parse: {lines[-1] if lines else f'exit {sec.rc}'}")
            )
    return out


def loaded_check(host: str, names: list[str], facts: HostFacts) -> Check:
    """The profiles are loaded (enforce or complain) when the kernel has AppArmor."""
    cname = "apparmor.loaded"
    if facts.error is not None:
        return failed(host, "", cname, f"cannot read {host}: {facts.error}")
    sec = facts.get("apparmor")
    text = sec.out if sec else ""
    first = text.splitlines()[0] if text else ""
    if first.strip() != "enabled=Y":
        state = first.removeprefix("enabled=") or "unknown"
        return skipped(
            host,
            "",
            cname,
            f"the AppArmor LSM is not active on this kernel (module parameter enabled={state}): "
            "profiles can be parsed but not loaded",
        )
    loaded = {line.rsplit(" (", 1)[0].strip() for line in text.splitlines()[1:]}
    missing = [n for n in names if not any(n == p or n.replace(".", "/") in p for p in loaded)]
    if missing:
        return failed(host, "", cname, f"not loaded in the kernel: {', '.join(missing)}")
    return passed(host, "", cname, f"loaded: {', '.join(names)}")
