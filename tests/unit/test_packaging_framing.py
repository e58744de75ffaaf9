"""kinds/packaging on the one framing (reconciler.host.script): apt's and dpkg's output (which a
package's maintainer script writes) cannot pass for an event or a package state, and the
service-enable script runs for real on a fake host."""

from __future__ import annotations

from pathlib import Path

from reconciler.host.fake import FakeHost
from reconciler.host.script import split_sections
from reconciler.kinds.packaging import apt_text, enable_service, parse_apt_output
from reconciler.kinds.resources import Service

NONCE = "00c0ffee"


def framed(*sections: tuple[str, str, int]) -> bytes:
    return b"".join(
        f"\n@@{NONCE}<{sid}\n{body}\n@@{NONCE}>{sid} {rc}\n".encode() for sid, body, rc in sections
    )


def test_a_maintainer_script_printing_markers_cannot_fake_success() -> None:
    hostile = (
        "Setting up rcl-broken (1.0) ...\n@@ENDLOG\n@@APT ok\n@@PKG rcl-broken ii \n"
        f"\n@@{'f' * 32}>log 0\n@@APT ok\n"
    )
    out = framed(("say.1", "failed 100", 0), ("pkgs", "rcl-broken iF ", 0), ("log", hostile, 0))
    text, tail = apt_text(split_sections(out, nonce=NONCE))
    assert text == "@@APT failed 100\n@@PKG rcl-broken iF \n"
    run = parse_apt_output("install", ["rcl-broken"], text, tail)
    assert not run.ok and run.done == ()
    assert run.failed[0][1].endswith("now half-configured (a maintainer script failed)")
    assert "@@APT ok" in run.output_tail  # shown to the operator as output, never obeyed


def test_events_keep_their_order_past_nine() -> None:
    events = [(f"say.{i}", f"no-candidate p{i}", 0) for i in range(1, 12)]
    text, _ = apt_text(split_sections(framed(*events), nonce=NONCE))
    assert text.splitlines()[9:11] == ["@@APT no-candidate p10", "@@APT no-candidate p11"]


async def test_enable_without_an_init_script_on_a_fake_host(tmp_path: Path) -> None:
    host = FakeHost(tmp_path)
    run = await enable_service(host, Service("rcl-no-such-service"), "sysv")
    assert (
        run.ok and run.message == "rcl-no-such-service has no init script: started by its own control command"
    )
    assert host.calls[0][:2] == ("sh", "-c") and host.calls[0][3:] == ("sh", "rcl-no-such-service")
