"""Crash safety and partial failure on a real lab host (sshd, sh, apache2):

- the SSH session killed between the swap and the reload: the new files are live but the
  daemon was never reloaded; the host's pending-reloads journal makes the next plan reload it
  ("a previous apply was interrupted before reloading"), and then the host is in sync;
- a failing validator holds back only its own handler's changes: an independent handler and a
  file without handler still apply and reload; both sets are reported;
- ``apache2ctl graceful`` is probed: a good change shows a new worker generation under the same
  master; a change Apache accepts in ``-t`` but cannot run (a Listen port that another process
  holds) kills the master although graceful returned 0: detected, the old files are restored.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from reconciler.domains import apache
from reconciler.engine import apply as apply_mod
from reconciler.engine.apply import apply_host
from reconciler.engine.observe import observe_host
from reconciler.engine.plan import INTERRUPTED, plan_host
from reconciler.host.connection import ConnectionLost, ConnectionPool, SshTarget
from reconciler.kinds.actions import ActionKind, HostPlan
from reconciler.kinds.resources import Desired, Domain, FileResource, Handler, Validator
from reconciler.lab import Lab, LabHostSpec

pytestmark = [pytest.mark.lab, pytest.mark.slow]

HOST = "c1"
JOURNAL = "/var/lib/reconciler/pending-reloads"


@pytest.fixture(scope="module")
def lab(lab_factory: Any) -> Iterator[Lab]:
    lab = lab_factory([LabHostSpec(HOST, "192.0.2.61")], lock_timeout=3000)
    yield lab
    lab.down()


def pool_for(lab: Lab) -> ConnectionPool:
    h = lab.info.hosts[0]
    target = SshTarget(
        host=h.name,
        address=h.address,
        known_hosts=str(lab.info.known_hosts),
        client_keys=(str(lab.info.client_key),),
    )
    return ConnectionPool({h.name: target}, connect_timeout=10)


def sh(lab: Lab, script: str) -> str:
    res = lab.exec(HOST, ["sh", "-c", script], timeout=60)
    return res.stdout.decode(errors="replace") + res.stderr.decode(errors="replace")


async def plan_of(pool: ConnectionPool, desired: Desired) -> HostPlan:
    return plan_host(desired, await observe_host(await pool.get(HOST), desired))


def app(name: str, text: str, *, check: str = "v") -> tuple[FileResource, Handler]:
    """A file of /etc/<name> with a handler whose tree validator greps for ``check`` and whose
    reload appends the live content to /tmp/<name>.reloads."""
    handler = Handler(
        name,
        validators=(Validator(("grep", "-rq", check, "{tree}"), tree_root=f"/etc/{name}"),),
        reload=("sh", "-c", f"cat /etc/{name}/app.conf >> /tmp/{name}.reloads"),
    )
    return FileResource(f"/etc/{name}/app.conf", text.encode(), Domain.FILES, handler=name), handler


async def test_cut_between_swap_and_reload_is_reloaded_by_the_next_apply(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    sh(lab, "mkdir -p /etc/capp && printf 'v1\\n' > /etc/capp/app.conf && rm -f /tmp/capp.reloads")
    conf, handler = app("capp", "v2\n")
    desired = Desired(host=HOST, files=(conf,), handlers=(handler,))

    async def cut(host: str) -> None:
        # the SSH session dies right after the swap (the reconciler never gets to reload)
        lab.exec(host, ["sh", "-c", "for p in $(pgrep -f 'sshd: root'); do kill -9 $p; done"])
        raise ConnectionLost(f"host {host}: connection lost (SSH session killed by the test)")

    monkeypatch.setattr(apply_mod, "FAULT_AFTER_SWAP", cut)
    async with pool_for(lab) as pool:
        plan = await plan_of(pool, desired)
        result = await apply_host(pool, HOST, plan, desired, verify=False)
    monkeypatch.setattr(apply_mod, "FAULT_AFTER_SWAP", None)
    assert not result.ok and any("connection lost" in m for m in result.messages), result.messages
    assert sh(lab, "cat /etc/capp/app.conf") == "v2\n"  # live ...
    assert sh(lab, "cat /tmp/capp.reloads 2>/dev/null || echo never") == "never\n"  # ... not reloaded
    assert sh(lab, f"cat {JOURNAL}") == "capp\n"

    async with pool_for(lab) as pool:
        plan2 = await plan_of(pool, desired)
        assert [(a.kind, a.handler, a.reason) for a in plan2.actions] == [
            (ActionKind.RELOAD, "capp", INTERRUPTED)
        ], plan2.actions
        result2 = await apply_host(pool, HOST, plan2, desired)
        assert result2.ok and result2.converged and result2.reloaded == ("capp",), result2.messages
        plan3 = await plan_of(pool, desired)
    assert sh(lab, "cat /tmp/capp.reloads") == "v2\n"
    assert sh(lab, f"test -e {JOURNAL} && echo left || echo cleared") == "cleared\n"
    assert plan3.actions == ()


async def test_failed_validation_holds_back_only_its_handler(lab: Lab) -> None:
    sh(
        lab,
        "mkdir -p /etc/pgood /etc/pbad && printf 'v1\\n' | tee /etc/pgood/app.conf > /etc/pbad/app.conf",
    )
    good, good_h = app("pgood", "v2\n")
    bad, bad_h = app("pbad", "v2 broken\n", check="NEVER-THERE")
    plain = FileResource("/etc/pplain.conf", b"independent\n", Domain.FILES)
    desired = Desired(host=HOST, files=(good, bad, plain), handlers=(good_h, bad_h))
    async with pool_for(lab) as pool:
        plan = await plan_of(pool, desired)
        result = await apply_host(pool, HOST, plan, desired)
    assert not result.ok and result.partial
    assert sh(lab, "cat /etc/pgood/app.conf /etc/pplain.conf /tmp/pgood.reloads") == "v2\nindependent\nv2\n"
    assert sh(lab, "cat /etc/pbad/app.conf; ls -a /etc/pbad") == "v1\n.\n..\napp.conf\n"  # untouched, no temp
    assert sh(lab, "cat /tmp/pbad.reloads 2>/dev/null || echo never") == "never\n"
    assert (
        "reload handler pgood" in result.applied()
        and "update file /etc/pbad/app.conf" in result.not_applied()
    )
    assert any("independent changes still applied" in m and "NEVER-THERE" in m for m in result.messages)
    # the re-observation shows exactly the held-back change still to do
    assert result.verify is not None
    assert {a.resource for a in result.verify.actions} == {"file /etc/pbad/app.conf", "handler pbad"}


async def test_apache_graceful_is_probed(lab: Lab) -> None:
    started = sh(lab, "apache2ctl start 2>&1; sleep 1; cat /var/run/apache2/apache2.pid")
    master = started.strip().splitlines()[-1]
    assert master.isdigit(), started
    conf = "/etc/apache2/conf-enabled/zz-reconciler-probe.conf"
    handler = apache.handler()
    good = Desired(
        host=HOST,
        files=(FileResource(conf, b"ServerSignature Off\n", Domain.APACHE, handler=handler.name),),
        handlers=(handler,),
    )
    async with pool_for(lab) as pool:
        plan = await plan_of(pool, good)
        result = await apply_host(pool, HOST, plan, good)
    assert result.ok and result.reloaded == ("apache2",), result.messages
    reload = next(o for o in result.outcomes if o.action.kind is ActionKind.RELOAD)
    assert "new worker generation" in reload.message and f"under master {master}" in reload.message

    # Apache's -t accepts a Listen on a port another process holds; graceful returns 0 and the
    # master then fails to bind and exits: the probe sees it, the old files come back
    sh(
        lab,
        "setsid -f python3 -c "
        "'import socket,time; s=socket.socket(); s.bind((\"0.0.0.0\", 8081)); s.listen(); time.sleep(120)'"
        " </dev/null >/dev/null 2>&1; "
        # wait until it really holds the port (python starts slowly on a busy machine)
        "for i in $(seq 100); do ss -ltn | grep -q ':8081 ' && break; sleep 0.1; done",
    )
    assert ":8081 " in sh(lab, "ss -ltn"), "the port holder did not bind 8081"
    bad = Desired(
        host=HOST,
        files=(
            FileResource(conf, b"ServerSignature Off\nListen 8081\n", Domain.APACHE, handler=handler.name),
        ),
        handlers=(handler,),
    )
    try:
        async with pool_for(lab) as pool:
            plan = await plan_of(pool, bad)
            result = await apply_host(pool, HOST, plan, bad)
        assert not result.ok
        msg = "\n".join(result.messages)
        assert "returned 0, but the master" in msg and "died after the reload" in msg, msg
        assert "restored" in msg
        assert sh(lab, f"cat {conf}") == "ServerSignature Off\n"
    finally:
        sh(lab, "pkill -f 'socket.socket' ; apache2ctl stop >/dev/null 2>&1; rm -f " + conf)
