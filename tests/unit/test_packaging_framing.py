"""The packaging scripts (apt-get install/purge, apt-get -s, update-rc.d) on the one framing,
attacked: apt, a package's maintainer script or update-rc.d printing the old fixed markers
(``@@ENDLOG``, ``@@PKG``, ``@@APT ok``, ``@@SIM``, ``@@ENABLED``) or new-style sections with a
guessed nonce changes no outcome. The real scripts run under the local sh on a fake host whose
/usr/local/sbin (first on the scripts' fixed PATH) holds stand-ins for apt-get, apt-cache,
dpkg-query, flock and update-rc.d (a private bind mount: root and unshare needed)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from reconciler.host.fake import FakeHost, bind_supported
from reconciler.kinds import aptsim, packaging, service_manager
from reconciler.kinds.resources import Service

GUESS = "0" * 32
FORGE = (
    r"printf '@@ENDLOG\n@@PKG foo ii \n@@APT ok\n@@ENDSIM\n@@SIM 0\nInst foo (1.0 x [amd64])\n"
    r"@@NOINIT\n@@ALREADY\n@@ENABLED\n'; "
    rf"printf '\n@@{GUESS}<say.1\nAPT ok\n@@{GUESS}>say.1 0\n'; "
    rf"printf '\n@@{GUESS}<say.2\nPKG foo ii \n@@{GUESS}>say.2 0\n'; "
    rf"printf '\n@@{GUESS}<sim.9\nInst foo (1.0 x [amd64])\n@@{GUESS}>sim.9 0\n'; "
    rf"printf '\n@@{GUESS}<say.3\nENABLED\n@@{GUESS}>say.3 0\n'"
)

TOOLS = {
    # an install fails (exit 100) after a "maintainer script" printed the forgeries; a
    # simulation fails too (held broken packages) after printing them
    "apt-get": f"""#!/bin/sh
case " $* " in
  *" -s "*) {FORGE}; echo 'E: Unable to correct problems, you have held broken packages.'; exit 100;;
esac
echo 'Setting up foo (1.0) ...'; {FORGE}
echo 'E: Sub-process /usr/bin/dpkg returned an error code (1)'; exit 100
""",
    "apt-cache": "#!/bin/sh\necho '  Candidate: 1.0'\n",
    "dpkg-query": f"#!/bin/sh\n{{ {FORGE}; }} >&2; printf 'iF '\n",
    "flock": "#!/bin/sh\nexit 0\n",
    "update-rc.d": f"#!/bin/sh\n{FORGE}; exit 1\n",
}


@pytest.fixture
def host(tmp_path: Path) -> FakeHost:
    why = bind_supported()
    if why is not None:
        pytest.skip(why)
    h = FakeHost(tmp_path, bind=("/usr/local/sbin", "/etc/init.d"))
    for name, text in TOOLS.items():
        h.write(f"/usr/local/sbin/{name}", text, mode=0o755)
    h.write("/etc/init.d/rclfake", "#!/bin/sh\n", mode=0o755)
    return h


def test_apt_output_cannot_forge_an_installed_package(host: FakeHost) -> None:
    run = asyncio.run(packaging.apt(host, "install", ["foo"]))
    assert "@@PKG foo ii" in run.output_tail  # the forgery was printed (and is shown as apt's output)
    assert not run.ok and run.done == () and run.lock is None
    ((name, why),) = run.failed
    assert name == "foo"
    assert why == (
        "apt-get install failed (exit 100): E: Sub-process /usr/bin/dpkg returned an error code (1); "
        "now half-configured (a maintainer script failed)"
    )


def test_simulation_output_cannot_forge_a_clean_round(host: FakeHost) -> None:
    sim = asyncio.run(aptsim.simulate(host, ["foo"], []))
    assert sim.ran and not sim.ok
    assert sim.errors == ("E: Unable to correct problems, you have held broken packages.",)


def test_update_rc_d_output_cannot_forge_enabled(host: FakeHost) -> None:
    svc = Service("rclfake", start=("true",))
    res = asyncio.run(service_manager.enable_service(host, svc, "sysv"))
    assert not res.ok and res.message.startswith("update-rc.d rclfake defaults failed:")
    assert "@@ENABLED" in res.message  # update-rc.d ran and printed the forgery
