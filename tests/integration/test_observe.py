"""observe_host on real lab hosts: a hand-built Desired, the parsed state, round trips,
secrets never read, nothing changed on the host; and the timing on 10 hosts."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from reconciler.engine.observe import observe_host
from reconciler.host.connection import CommandResult, Connection, ConnectionPool, SshTarget
from reconciler.host.script import split_sections
from reconciler.kinds.resources import (
    Desired,
    Domain,
    FileResource,
    FirewallRuleset,
    Handler,
    KeyPair,
    LinkResource,
    Package,
    Service,
    Tunnel,
)
from reconciler.lab import Lab, LabHostSpec
from reconciler.netfilter.iptables import canonical_iptables

pytestmark = [pytest.mark.lab]

HOSTS = [LabHostSpec(f"o{i}", f"192.0.2.{40 + i}") for i in range(1, 11)]
D = "/etc/reconciler-test"
CANARY_SECRET = b"CANARY-SECRET-0a1b2c3d\n"
CANARY_KEY = b"-----BEGIN PRIVATE KEY-----\nCANARY-PRIVATE-KEY-9f8e7d\n-----END PRIVATE KEY-----\n"
RULES = """*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -p tcp --dport 22 -s 192.0.2.254 -j ACCEPT
-A INPUT -p 50 -s 192.0.2.42 -j ACCEPT
-A INPUT -p 4 -m policy --pol ipsec --dir in -s 192.0.2.42 -j ACCEPT
COMMIT
"""
SWANCTL = """connections {
  o1-o2 {
    local_addrs = 192.0.2.41
    remote_addrs = 192.0.2.42
    local { auth = psk }
    remote { auth = psk }
    children { o1-o2 { local_ts = 10.99.0.1/32
                       remote_ts = 10.99.0.2/32 } }
  }
}
"""
SETUP = f"""set -e
mkdir -p {D}/conf.d /var/lib/reconciler /etc/swanctl/conf.d
printf 'same\\n' > {D}/same
printf 'old\\n' > {D}/differs
chmod 600 {D}/differs
printf '%s' "$1" > {D}/secret.key
printf '%s' "$2" > {D}/k.key
printf 'pub\\n' > {D}/k.pub
ln -sfn same {D}/link
printf 'a\\n' > {D}/conf.d/a.conf
printf 'stray\\n' > {D}/conf.d/b.conf
printf '%s' "$3" > /var/lib/reconciler/inventory.json
printf '%s' "$4" | iptables-restore
printf '%s' "$5" > /etc/swanctl/conf.d/test.conf
ip addr add 10.99.0.1/32 dev lo
setsid -f /usr/lib/ipsec/charon >/dev/null 2>&1
i=0; while [ ! -S /var/run/charon.vici ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
swanctl --load-conns >/dev/null 2>&1
"""
INVENTORY = json.dumps([f"{D}/old", f'{D}/q"uote', f"{D}/same"], indent=1)


def desired(**over: Any) -> Desired:
    fields: dict[str, Any] = dict(
        host="o1",
        files=(
            # a file of the IPsec domain: observe looks at IPsec (charon, swanctl, xfrm)
            FileResource(f"{D}/conf.d/a.conf", b"a\n", Domain.IPSEC),
            FileResource(f"{D}/differs", b"new\n", Domain.FILES),
            FileResource(f"{D}/missing", b"x\n", Domain.FILES),
            FileResource(f"{D}/same", b"same\n", Domain.FILES),
            FileResource(f"{D}/secret.key", b"another secret\n", Domain.FILES, mode=0o600, secret=True),
        ),
        links=(LinkResource(f"{D}/link", "same", Domain.FILES),),
        keypairs=(KeyPair("k", f"{D}/k.key", f"{D}/k.pub", generate=()),),
        firewall=FirewallRuleset(rules_v4=RULES, persistent_path=f"{D}/rules.v4"),
        packages=(Package("openssh-server"), Package("reconciler-no-such-package")),
        services=(Service("sshd", status=("sh", "-c", "kill -0 1")), Service("apache2")),
        owned_dirs=(f"{D}/conf.d",),
        # these make observe look at links and kernel facts
        handlers=(Handler("charon"),),
        tunnels=(Tunnel("tun-o2", "192.0.2.41", "192.0.2.42", "10.99.1.1", "10.99.1.2", "o2"),),
    )
    fields.update(over)
    return Desired(**fields)


@pytest.fixture(scope="module")
def lab(lab_factory: Any) -> Iterator[Lab]:
    lab = lab_factory(HOSTS)
    setup = lab.exec(
        "o1",
        ["sh", "-c", SETUP, "sh", CANARY_SECRET.decode(), CANARY_KEY.decode(), INVENTORY, RULES, SWANCTL],
        timeout=60,
    )
    assert setup.returncode == 0, setup.stderr
    yield lab
    lab.down()


def targets(lab: Lab) -> dict[str, SshTarget]:
    return {
        h.name: SshTarget(
            host=h.name,
            address=h.address,
            known_hosts=str(lab.info.known_hosts),
            client_keys=(str(lab.info.client_key),),
        )
        for h in lab.info.hosts
    }


class Recording:
    """Delegates to a Connection and keeps every round trip's output."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.host = conn.host
        self.results: list[CommandResult] = []
        self.nonces: list[str] = []

    async def run_script(self, script: str, **kw: Any) -> CommandResult:
        res = await self.conn.run_script(script, **kw)
        self.results.append(res)
        self.nonces.append(kw["stdin_after"].decode().strip())
        return res


def snapshot(lab: Lab) -> bytes:
    cmd = "find /etc /var/lib /root -xdev -printf '%p %s %m %T@\\n' | sort"
    return lab.exec("o1", ["sh", "-c", cmd]).stdout


async def test_observe_a_lab_host(lab: Lab) -> None:
    before = snapshot(lab)
    async with ConnectionPool(targets(lab)) as pool:
        rec = Recording(await pool.get("o1"))
        obs = await observe_host(rec, desired())  # type: ignore[arg-type]
    assert snapshot(lab) == before  # observation changed nothing

    assert obs.errors == (), obs.errors
    f = obs.files
    assert f[f"{D}/same"].sha256 == hashlib.sha256(b"same\n").hexdigest() and f[f"{D}/same"].content is None
    assert (f[f"{D}/differs"].mode, f[f"{D}/differs"].owner, f[f"{D}/differs"].group) == (
        0o600,
        "root",
        "root",
    )
    assert f[f"{D}/differs"].content == b"old\n"  # fetched for the diff (second round trip)
    assert not f[f"{D}/missing"].exists
    assert f[f"{D}/secret.key"].sha256 == hashlib.sha256(CANARY_SECRET).hexdigest()
    assert f[f"{D}/secret.key"].content is None
    assert f[f"{D}/k.key"].exists and f[f"{D}/k.key"].sha256 is None and f[f"{D}/k.key"].content is None
    assert f[f"{D}/link"].kind == "link" and f[f"{D}/link"].link_target == "same"
    assert f[f"{D}/conf.d/b.conf"].exists  # the stray file in the owned dir: a prune candidate
    assert not f[f"{D}/rules.v4"].exists
    assert obs.inventory == (f"{D}/old", f'{D}/q"uote', f"{D}/same")
    assert not f[f"{D}/old"].exists and not f[f'{D}/q"uote'].exists  # second trip stat'ed the escaped one

    assert obs.iptables is not None
    assert obs.iptables.tables["filter"] == canonical_iptables(RULES).tables["filter"]
    lo = next(lk for lk in obs.links if lk.name == "lo")
    assert "10.99.0.1/32" in lo.addresses
    assert obs.ipsec.daemon_running and obs.ipsec.loaded_connections == ("o1-o2",)
    assert obs.packages["openssh-server"].installed
    assert not obs.packages["reconciler-no-such-package"].installed
    assert obs.services["sshd"].running and not obs.services["apache2"].running
    assert obs.init_system == "sysv"
    assert set(obs.kernel) >= {"ipip", "esp", "xfrm", "vxlan", "tun"}

    # secrets never left the host, in any round trip, in any form we decode
    assert len(rec.results) == 2
    for res, nonce in zip(rec.results, rec.nonces, strict=True):
        blobs = [res.stdout, res.stderr] + [s.body for s in split_sections(res.stdout, nonce=nonce).values()]
        for blob in blobs:
            assert b"CANARY-SECRET" not in blob and b"CANARY-PRIVATE-KEY" not in blob


async def test_nothing_differs_means_one_round_trip(lab: Lab) -> None:
    same = desired(
        files=(FileResource(f"{D}/same", b"same\n", Domain.FILES),),
        packages=(),
        services=(),
    )
    lab.exec("o1", ["sh", "-c", f"mv /var/lib/reconciler/inventory.json {D}/inv.bak"])
    try:
        async with ConnectionPool(targets(lab)) as pool:
            rec = Recording(await pool.get("o1"))
            obs = await observe_host(rec, same)  # type: ignore[arg-type]
    finally:
        lab.exec("o1", ["sh", "-c", f"mv {D}/inv.bak /var/lib/reconciler/inventory.json"])
    assert len(rec.results) == 1
    assert obs.errors == () and obs.inventory == ()


async def test_timing_on_ten_hosts_cold_and_warm(lab: Lab, record_property: Any) -> None:
    d = desired(host="any")
    async with ConnectionPool(targets(lab)) as pool:

        async def one(name: str) -> None:
            obs = await observe_host(await pool.get(name), d)
            assert obs.errors == (), obs.errors

        started = time.monotonic()
        await asyncio.gather(*(one(h.name) for h in lab.info.hosts))
        cold = time.monotonic() - started
        started = time.monotonic()
        await asyncio.gather(*(one(h.name) for h in lab.info.hosts))
        warm = time.monotonic() - started
    record_property("observe_10_hosts_cold_s", round(cold, 3))
    record_property("observe_10_hosts_warm_s", round(warm, 3))
    print(f"observe on 10 lab hosts: cold (connect included) {cold:.3f} s, warm {warm:.3f} s")
    assert cold < 15 and warm < 10
