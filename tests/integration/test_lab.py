"""The lab, live: real sshd per host in network namespaces, isolation, real services, teardown.

One 3-host lab is shared by the TestLabHosts class (downed when the class ends, so the
crash/CLI tests below can take the machine-wide lab lock next).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.lab import Lab, LabError, LabHostSpec, LabInfo, probe_capabilities
from reconciler.lab.cleanup import leftovers
from tests.lab_plugin import LabFactory, _timeout_paused
from tests.skip_policy import skip_kernel_feature

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
SPECS = [
    LabHostSpec("web1", "192.0.2.11"),
    LabHostSpec("web2", "192.0.2.12"),
    LabHostSpec("db1", "192.0.2.21"),
]
CLEAN_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


def ssh_argv(info: LabInfo, address: str, command: str, known_hosts: Path | None = None) -> list[str]:
    return [
        "ssh", "-F", "/dev/null", "-i", str(info.client_key),
        "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
        "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={known_hosts or info.known_hosts}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        f"root@{address}", command,
    ]  # fmt: skip


def ssh(
    info: LabInfo, address: str, command: str, input: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ssh_argv(info, address, command), input=input.decode() if input else None,
        capture_output=True, text=True, timeout=60, env=CLEAN_ENV,
    )  # fmt: skip


def assert_gone(prefix: str) -> None:
    """Nothing named with the prefix is left: netns, link, mount, process, state dir."""
    assert leftovers(prefix) == []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert prefix not in netns
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert prefix not in links
    assert prefix not in Path("/proc/self/mountinfo").read_text()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                cmd = Path(f"/proc/{entry.name}/cmdline").read_bytes()
            except OSError:
                continue
            assert prefix.encode() not in cmd, f"process {entry.name} left: {cmd!r}"
    routes = subprocess.run(["ip", "route", "show", "table", "all"], capture_output=True, text=True).stdout
    assert prefix not in routes
    rules = subprocess.run(["iptables", "-w", "5", "-S"], capture_output=True, text=True).stdout
    assert prefix not in rules


class TestLabHosts:
    @pytest.fixture(scope="class")
    def lab(self, lab_factory: LabFactory) -> Iterator[Lab]:
        lab = lab_factory(SPECS)
        yield lab
        prefix = lab.info.prefix
        assert lab.down() == []
        assert_gone(prefix)

    async def test_every_host_answers_ssh_with_strict_host_keys(self, lab: Lab) -> None:
        import asyncssh

        for h in lab.info.hosts:
            async with asyncssh.connect(
                h.address,
                username="root",
                known_hosts=str(lab.info.known_hosts),
                client_keys=[str(lab.info.client_key)],
                connect_timeout=10,
            ) as conn:
                r = await conn.run("hostname; cat /etc/hostname; ip -o link | wc -l", check=True)
                name, etc_name, nlinks = str(r.stdout).split()
                assert name == etc_name == h.name
                assert nlinks == "2"  # lo and eth0: the host sees only its own interfaces

    async def test_unknown_host_key_is_refused(self, lab: Lab, tmp_path: Path) -> None:
        import asyncssh

        web1, web2 = lab.info.host("web1"), lab.info.host("web2")
        # web2's key recorded for web1's address: the real web1 key does not match
        line = next(
            x for x in lab.info.known_hosts.read_text().splitlines() if x.startswith(web2.address + " ")
        )
        wrong = tmp_path / "known_hosts"
        wrong.write_text(line.replace(web2.address, web1.address, 1) + "\n")
        with pytest.raises(asyncssh.HostKeyNotVerifiable):
            async with asyncssh.connect(
                web1.address,
                username="root",
                known_hosts=str(wrong),
                client_keys=[str(lab.info.client_key)],
                connect_timeout=10,
            ):
                pass
        r = subprocess.run(ssh_argv(lab.info, web1.address, "true", known_hosts=wrong), capture_output=True,
                           text=True, timeout=30)  # fmt: skip
        assert r.returncode == 255
        assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in r.stderr or "verification failed" in r.stderr

    def test_root_login_is_key_only_and_the_environment_clean(self, lab: Lab) -> None:
        web1 = lab.info.host("web1")
        r = ssh(
            lab.info,
            web1.address,
            "echo $HOME $PATH; ls -A /root; if test -e /root/.pyenv; then echo PYENV; fi",
        )
        assert r.returncode == 0, r.stderr
        assert "pyenv" not in r.stdout.lower()
        assert r.stdout.split()[0] == "/root"
        cfg = lab.exec("web1", ["sshd", "-T"]).stdout.decode()
        assert "passwordauthentication no" in cfg
        assert "permitrootlogin without-password" in cfg or "permitrootlogin prohibit-password" in cfg
        assert "usepam no" in cfg
        # a password login is not even offered
        r2 = subprocess.run(
            ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "PubkeyAuthentication=no",
             "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={lab.info.known_hosts}",
             f"root@{web1.address}", "true"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert r2.returncode == 255 and "Permission denied (publickey)" in r2.stderr

    def test_etc_data_and_var_log_are_per_host(self, lab: Lab) -> None:
        web1, web2 = lab.info.host("web1"), lab.info.host("web2")
        marker = f"lab-test-{os.getpid()}"
        script = (
            f"echo {marker} > /etc/lab-test; mkdir -p /data/x; echo {marker} > /data/x/f; "
            f"echo {marker} > /var/log/lab-test"
        )
        r = ssh(lab.info, web1.address, script)
        assert r.returncode == 0, r.stderr
        assert (
            ssh(lab.info, web1.address, "cat /etc/lab-test /data/x/f /var/log/lab-test").stdout.split()
            == [marker] * 3
        )
        r2 = ssh(lab.info, web2.address, "ls /etc/lab-test /data/x /var/log/lab-test")
        assert r2.returncode != 0 and r2.stdout == ""
        assert not Path("/etc/lab-test").exists()
        assert not Path("/var/log/lab-test").exists()
        assert not Path("/data/x/f").exists()
        # the change is visible in the host's overlay upper layer (what it changed, nothing else)
        assert (web1.root / "upper/etc/lab-test").read_text().strip() == marker
        # the machine's /etc is the lower layer: its files are there, unchanged
        assert (
            ssh(lab.info, web2.address, "cat /etc/debian_version").stdout
            == Path("/etc/debian_version").read_text()
        )

    def test_iptables_are_per_host(self, lab: Lab) -> None:
        web1, web2 = lab.info.host("web1"), lab.info.host("web2")
        ruleset = textwrap.dedent(
            """\
            *filter
            :INPUT ACCEPT [0:0]
            :FORWARD ACCEPT [0:0]
            :OUTPUT ACCEPT [0:0]
            -A INPUT -p tcp --dport 8123 -m comment --comment labtest -j DROP
            COMMIT
            """
        )
        r = ssh(lab.info, web1.address, "iptables-restore", input=ruleset.encode())
        assert r.returncode == 0, r.stderr
        assert "labtest" in ssh(lab.info, web1.address, "iptables-save").stdout
        assert "labtest" not in ssh(lab.info, web2.address, "iptables-save").stdout
        root = subprocess.run(["iptables-save"], capture_output=True, text=True).stdout
        assert "labtest" not in root

    def test_xfrm_state_is_per_host(self, lab: Lab) -> None:
        web1, web2 = lab.info.host("web1"), lab.info.host("web2")
        add = (f"ip xfrm policy add src {web1.address}/32 dst {web2.address}/32 proto tcp dport 9999 "
               "dir out tmpl proto esp mode transport level required")  # fmt: skip
        r = ssh(lab.info, web1.address, add)
        assert r.returncode == 0, r.stderr
        assert "dport 9999" in ssh(lab.info, web1.address, "ip xfrm policy").stdout
        assert "dport 9999" not in ssh(lab.info, web2.address, "ip xfrm policy").stdout
        root = subprocess.run(["ip", "xfrm", "policy"], capture_output=True, text=True).stdout
        assert "dport 9999" not in root

    def test_hosts_reach_each_other_and_the_bridge_only(self, lab: Lab) -> None:
        r = lab.exec("web1", ["ping", "-c", "1", "-W", "2", "192.0.2.21"])
        assert r.returncode == 0, r.stdout + r.stderr
        r = lab.exec("web1", ["ping", "-c", "1", "-W", "2", "192.0.2.254"])
        assert r.returncode == 0
        routes = lab.exec("web1", ["ip", "-4", "route"]).stdout.decode()
        assert "default" not in routes  # nothing beyond the lab subnet is reachable

    def test_charon_runs_per_host_and_answers_on_its_vici_socket(self, lab: Lab) -> None:
        db1, web2 = lab.info.host("db1"), lab.info.host("web2")
        r = ssh(lab.info, db1.address, "setsid -f /usr/lib/ipsec/charon </dev/null >/dev/null 2>&1")
        assert r.returncode == 0, r.stderr
        deadline = time.monotonic() + 20
        out = ""
        while time.monotonic() < deadline:
            rr = ssh(lab.info, db1.address, "swanctl --stats 2>/dev/null")
            out = rr.stdout
            if rr.returncode == 0 and "uptime" in out:
                break
            time.sleep(0.2)
        assert "uptime" in out and "IKE_SAs" in out
        assert ssh(lab.info, db1.address, "test -S /run/charon.vici").returncode == 0
        assert ssh(lab.info, web2.address, "test -e /run/charon.vici").returncode != 0
        # the daemon lives in the host's PID namespace: killing it there ends it
        assert lab.exec("db1", ["pkill", "-x", "charon"]).returncode == 0

    def test_apache_serves_from_a_lab_host(self, lab: Lab) -> None:
        web1 = lab.info.host("web1")
        r = ssh(lab.info, web1.address, "apache2ctl start")
        assert r.returncode == 0, r.stderr
        code = ""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            c = subprocess.run(
                ["curl", "--noproxy", "*", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "3",
                 f"http://{web1.address}/"],
                capture_output=True, text=True, timeout=10,
            )  # fmt: skip
            code = c.stdout
            if code == "200":
                break
            time.sleep(0.2)
        assert code == "200"
        # web2 runs no Apache: connection refused there
        c2 = subprocess.run(["curl", "--noproxy", "*", "-s", "--max-time", "3", "http://192.0.2.12/"],
                            capture_output=True, timeout=10)  # fmt: skip
        assert c2.returncode == 7
        ssh(lab.info, web1.address, "apache2ctl stop")

    def test_capability_probes_match_what_the_hosts_can_do(self, lab: Lab) -> None:
        caps = probe_capabilities()
        r = lab.exec("web2", ["ip", "link", "add", "labt0", "type", "ipip", "remote", "192.0.2.11"])
        assert (r.returncode == 0) == caps.has("ipip"), caps.reason("ipip")
        r = lab.exec("web2", ["ip", "tuntap", "add", "dev", "labt1", "mode", "tun"])
        assert (r.returncode == 0) == caps.has("tun"), caps.reason("tun")
        for c in caps.items:
            assert c.reason and "\n" not in c.reason

    def test_kernel_esp_sa_when_the_kernel_has_it(self, lab: Lab) -> None:
        caps = probe_capabilities()
        if not caps.has("kernel_esp"):
            skip_kernel_feature(caps.reason("kernel_esp"))
        r = lab.exec("web2", ["ip", "xfrm", "state", "add", "src", "192.0.2.12", "dst", "192.0.2.11", "proto",
                              "esp", "spi", "0x200", "mode", "transport", "enc", "cbc(aes)", "0x" + "33" * 16,
                              "auth", "hmac(sha256)", "0x" + "44" * 32])  # fmt: skip
        assert r.returncode == 0, r.stderr

    def test_exec_runs_inside_the_host(self, lab: Lab) -> None:
        r = lab.exec("db1", ["sh", "-c", "hostname; echo $$; cat /proc/1/comm"])
        name, pid, init = r.stdout.decode().split()
        assert (name, init) == ("db1", "sshd")
        assert int(pid) < 1000  # the host's own PID namespace
        with pytest.raises(LabError):
            lab.exec("nosuch", ["true"])


def _release_labs_of_this_process() -> None:
    """A lab another module of this session left up would make our subprocesses wait for it."""
    from reconciler.lab.lab import _down_live_labs

    _down_live_labs()


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "reconciler", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)  # fmt: skip


def test_cli_fleet_lab_up_status_down() -> None:
    _release_labs_of_this_process()
    with _timeout_paused():  # it may wait in line for the machine-wide lab lock
        up = _cli("lab", "up", "--fleet", str(REPO / "fleet-repo-example"), "--json", timeout=900)
    assert up.returncode == 0, up.stderr
    info = json.loads(up.stdout)
    prefix = info["prefix"]
    try:
        hosts = {h["name"]: h["address"] for h in info["hosts"]}
        assert hosts == {"db1": "192.0.2.21", "db2": "192.0.2.22", "web1": "192.0.2.11", "web2": "192.0.2.12"}
        current = Lab.current()
        assert current is not None and current.prefix == prefix
        st = _cli("lab", "status", "--json")
        status = json.loads(st.stdout)
        assert status["current"]["prefix"] == prefix
        assert "kernel_esp" in status["capabilities"]
        kh = Path(info["known_hosts"]).read_text().splitlines()
        assert sorted(line.split()[0] for line in kh) == sorted(hosts.values())
        r = subprocess.run(
            ssh_argv(current, "192.0.2.22", "hostname"), capture_output=True, text=True, timeout=30
        )
        assert r.stdout.strip() == "db2"
        # a hand edit through `lab exec` lands on that host only
        ex = _cli("lab", "exec", "web1", "--", "sh", "-c", "echo hand-edit >> /etc/motd; hostname")
        assert ex.returncode == 0 and ex.stdout.strip() == "web1", ex.stderr
        seen = subprocess.run(
            ssh_argv(current, "192.0.2.12", "cat /etc/motd"), capture_output=True, text=True, timeout=30
        )
        assert "hand-edit" not in seen.stdout
        assert _cli("lab", "exec", "nosuch", "--", "true").returncode == 1
    finally:
        down = _cli("lab", "down", "--prefix", prefix)
    assert down.returncode == 0, down.stderr
    assert_gone(prefix)
    assert Lab.current() is None


CRASHER = """
import sys, time
from reconciler import log
from reconciler.lab import Lab, LabHostSpec
log.configure(json=True, level="WARNING")  # logs on stderr; stdout carries only UP
lab = Lab.up([LabHostSpec("c1", "192.0.2.31"), LabHostSpec("c2", "192.0.2.32")], prefix=sys.argv[1])
print("UP", flush=True)
time.sleep(120)
"""


def _start_crasher(prefix: str) -> subprocess.Popen[str]:
    """A separate Python that brings a lab up and then waits to be killed."""
    p = subprocess.Popen(
        [sys.executable, "-c", CRASHER, prefix],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert p.stdout is not None and p.stderr is not None
    deadline = time.monotonic() + 900  # it may wait for other labs to release the lock
    with _timeout_paused():
        while time.monotonic() < deadline:
            ready, _, _ = select.select([p.stdout], [], [], 1.0)
            if ready:
                line = p.stdout.readline()
                if line.strip() == "UP":
                    return p
                if line == "":
                    break
    p.kill()
    _, err = p.communicate(timeout=30)
    raise AssertionError(f"the crasher did not bring its lab up: {err[-2000:]}")


def test_crashed_lab_is_removed_by_lab_down() -> None:
    _release_labs_of_this_process()
    prefix = f"rclk{os.getpid() % 0xFFFF:x}"[:8]
    p = _start_crasher(prefix)
    p.send_signal(signal.SIGKILL)  # the python that made the lab dies without cleaning up
    p.wait()
    assert subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.count(prefix) == 2
    assert leftovers(prefix) != []
    down = _cli("lab", "down", "--prefix", prefix)
    assert down.returncode == 0, down.stderr
    assert_gone(prefix)


def test_lock_waits_for_a_live_lab_and_breaks_a_dead_ones(lab_factory: LabFactory) -> None:
    _release_labs_of_this_process()
    prefix = f"rclw{os.getpid() % 0xFFFF:x}"[:8]
    p = _start_crasher(prefix)
    try:
        t0 = time.monotonic()
        with pytest.raises(LabError, match=prefix):
            Lab.up([LabHostSpec("w1", "192.0.2.41")], lock_timeout=1.5)
        assert time.monotonic() - t0 >= 1.5
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    # the owner is dead: the next lab breaks its lock and removes its leftovers first
    lab = lab_factory([LabHostSpec("w1", "192.0.2.41")], lock_timeout=30)
    try:
        assert_gone(prefix)
        assert lab.exec("w1", ["hostname"]).stdout.decode().strip() == "w1"
    finally:
        mine = lab.info.prefix
        lab.down()
        assert_gone(mine)


def test_hosts_on_both_lab_networks_reach_the_apt_proxy_their_apt_names(lab_factory: LabFactory) -> None:
    """A big lab's host (198.18.0.0/15, `lab up --hosts N`) next to a documentation-range one:
    apt in each reads a proxy on its own network's bridge address and reaches the lab's proxy
    there (a foreign host is refused by it: no network needed). Before, only 192.0.2.254 was
    served and a 198.18 host had no route to it."""
    _release_labs_of_this_process()
    lab = lab_factory([LabHostSpec("big1", "198.18.0.11"), LabHostSpec("doc1", "192.0.2.41")])
    try:
        for name, bridge in (("big1", "198.19.255.254"), ("doc1", "192.0.2.254")):
            seen = lab.exec(name, ["apt-config", "shell", "P", "Acquire::http::Proxy"]).stdout.decode()
            assert seen.strip() == f"P='http://{bridge}:3142/'", (name, seen)
            client = (
                "import socket,sys\n"
                "s=socket.create_connection((sys.argv[1],3142),timeout=10)\n"
                "s.sendall(b'GET http://evil.example/x HTTP/1.1\\r\\n\\r\\n')\n"
                "sys.stdout.buffer.write(s.recv(4096))\n"
            )
            out = lab.exec(name, ["python3", "-c", client, bridge]).stdout
            assert out.startswith(b"HTTP/1.1 403") and b"reconciler lab apt proxy" in out, (name, out)
    finally:
        mine = lab.info.prefix
        lab.down()
        assert_gone(mine)
