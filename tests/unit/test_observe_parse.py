"""Observation parsers, from outputs recorded on lab hosts, and the framing run by a real sh."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from reconciler.engine.observe import (
    build_script,
    content_wanted,
    parse_inventory,
    parse_observation,
    parse_pending_reloads,
)
from reconciler.host.connection import Connection, SshTarget
from reconciler.host.script import Section, new_nonce, split_sections
from reconciler.kinds.filestate import file_states, parse_find_records, parse_sha256
from reconciler.kinds.ipsec import parse_charon, parse_xfrm_policies
from reconciler.kinds.ipsec_state import ViciParseError, loaded_conns, up_names
from reconciler.kinds.packages import parse_dpkg
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
from reconciler.kinds.services import parse_service
from reconciler.kinds.tunnels import parse_kernel, parse_links

# Recorded on a lab host (strongSwan 5.9.8, kernel-libipsec), `swanctl --list-conns --pretty`
# (abridged: the keys observe does not read are left out).
LIST_CONNS = """\
list-conn event {
  h1-h2 {
    local_addrs = [
      192.0.2.11
    ]
    remote_addrs = [
      192.0.2.12
    ]
    version = IKEv2
    local-1 {
      id = 192.0.2.11
      class = public key
    }
    remote-1 {
      id = 192.0.2.12
      class = public key
    }
    children {
      h1-h2-net {
        mode = TUNNEL
        local-ts = [
          10.99.0.11/32
        ]
        remote-ts = [
          10.99.0.12/32
        ]
      }
    }
  }
}
"""
# `swanctl --list-sas --pretty` on the same host a few seconds later (abridged), and a second
# IKE SA still connecting.
LIST_SAS = """\
list-sa event {
  h1-h2 {
    uniqueid = 1
    version = 2
    state = ESTABLISHED
    local-host = 192.0.2.11
    remote-host = 192.0.2.12
    child-sas {
      h1-h2-net-1 {
        name = h1-h2-net
        uniqueid = 1
        state = INSTALLED
        mode = TUNNEL
        protocol = ESP
        encap = yes
        spi-in = a24484d8
        spi-out = 2772d342
      }
    }
  }
}
list-sa event {
  h1-h3 {
    uniqueid = 2
    version = 2
    state = CONNECTING
    local-host = 192.0.2.11
    remote-host = 192.0.2.13
    child-sas {
    }
  }
}
"""
# `ip xfrm policy` in a namespace (iproute2 6.1 prints no JSON for xfrm), with charon's socket
# bypass policies as they appear when charon runs with the kernel datapath.
XFRM = """\
src 10.99.0.11/32 dst 10.99.0.12/32 \n\tdir in priority 0 ptype main \n\ttmpl src 192.0.2.12 dst 192.0.2.11
\t\tproto esp reqid 1 mode tunnel
src 192.0.2.11/32 dst 192.0.2.12/32 proto ipencap \n\tdir out priority 0 ptype main \n\
\ttmpl src 0.0.0.0 dst 0.0.0.0
\t\tproto esp reqid 0 mode transport
\ttmpl src 0.0.0.0 dst 0.0.0.0
\t\tproto ah reqid 0 mode transport
src 0.0.0.0/0 dst 0.0.0.0/0 \n\tsocket in priority 0 ptype main \n
"""
# `ip -d -j addr show` on a lab host with charon (libipsec TUN ipsec0) and the internal /32 on lo,
# plus a point-to-point address as an ipip tunnel would carry it (abridged).
IP_ADDR = (
    '[{"ifindex":1,"ifname":"lo","flags":["LOOPBACK","UP","LOWER_UP"],"link_type":"loopback",'
    '"addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8},'
    '{"family":"inet","local":"10.99.0.11","prefixlen":32,"scope":"global","label":"lo"}]},'
    '{"ifindex":2,"link_index":24,"ifname":"eth0","flags":["BROADCAST","MULTICAST","UP","LOWER_UP"],'
    '"link_type":"ether","linkinfo":{"info_kind":"veth"},'
    '"addr_info":[{"family":"inet","local":"192.0.2.11","prefixlen":24}]},'
    '{"ifindex":3,"ifname":"ipsec0","flags":["POINTOPOINT","MULTICAST","NOARP","UP","LOWER_UP"],'
    '"link_type":"none","linkinfo":{"info_kind":"tun","info_data":{"type":"tun"}},"addr_info":[]},'
    '{"ifindex":4,"ifname":"tun-h2","flags":["POINTOPOINT","NOARP"],"link_type":"ipip",'
    '"linkinfo":{"info_kind":"ipip","info_data":{"remote":"192.0.2.12","local":"192.0.2.11","ttl":0}},'
    '"addr_info":[{"family":"inet","local":"10.99.0.11","address":"10.99.0.12","prefixlen":32},'
    '{"family":"inet6","local":"fe80::1","prefixlen":64}]}]'
)


def test_swanctl_conns_and_sas() -> None:
    assert loaded_conns(LIST_CONNS) == ("h1-h2",)
    assert up_names(LIST_SAS) == (("h1-h2",), ("h1-h2-net",))
    with pytest.raises(ViciParseError):  # cut off: never half a view
        up_names(LIST_SAS[:200])


def test_xfrm_policies_skip_socket_bypass() -> None:
    pols = parse_xfrm_policies(XFRM)
    assert [(p.src, p.dst, p.dir, p.proto, p.tmpl) for p in pols] == [
        ("10.99.0.11/32", "10.99.0.12/32", "in", None, ("esp/tunnel",)),
        ("192.0.2.11/32", "192.0.2.12/32", "out", "ipencap", ("esp/transport", "ah/transport")),
    ]


def test_links_kinds_endpoints_and_addresses() -> None:
    links = {lk.name: lk for lk in parse_links(IP_ADDR)}
    assert links["lo"].addresses == ("10.99.0.11/32", "127.0.0.1/8")
    assert links["eth0"].kind == "veth" and links["eth0"].up
    assert links["ipsec0"].kind == "tun"
    tun = links["tun-h2"]
    assert (tun.kind, tun.local, tun.remote, tun.up) == ("ipip", "192.0.2.11", "192.0.2.12", False)
    assert tun.addresses == ("10.99.0.11/32 peer 10.99.0.12/32",)


def test_charon_pidfile_wins_over_process_scan() -> None:
    assert parse_charon("pidfile 34\npidcomm charon\nproc 34\n")
    assert not parse_charon("pidfile 34\npidcomm bash\n")  # stale pid file, pid reused
    assert not parse_charon("pidfile 34\nproc 99\n")
    assert parse_charon("proc 99\n")  # started without a pid file
    assert not parse_charon("")


def test_dpkg_states() -> None:
    text = (
        "openssh-server\tii \t1:9.2p1-2+deb12u10\napache2\trc \t2.4.62-1\n"
        "strongswan\tiU \t5.9.8\ncharon\thi \t5.9.8\n"
    )
    got = parse_dpkg(text, ["openssh-server", "apache2", "strongswan", "charon", "nginx"])
    assert got["openssh-server"].installed and got["openssh-server"].version == "1:9.2p1-2+deb12u10"
    assert not got["apache2"].installed  # removed, config files left
    assert not got["strongswan"].installed  # unpacked, never configured
    assert got["charon"].installed  # on hold, installed
    assert not got["nginx"].installed and got["nginx"].version is None


def test_services_with_and_without_systemd() -> None:
    assert parse_service("a", "status 0\n").running
    assert not parse_service("a", "status 3\n").running
    s = parse_service("a", "active active\nenabled enabled\n")
    assert s.running and s.enabled
    s = parse_service("a", "active inactive\nenabled disabled\n")
    assert not s.running and s.enabled is False


def test_kernel_facts() -> None:
    facts = parse_kernel(
        "ipip absent\nesp4 module\nah4 absent\nxfrm_user loaded\nvxlan loaded\ntun absent\ndevtun present\n"
    )
    assert facts == {"ipip": False, "esp": True, "ah": False, "xfrm": True, "vxlan": True, "tun": True}


def test_inventory() -> None:
    assert parse_inventory(b'[\n "/etc/a",\n "/etc/b"\n]\n') == (("/etc/a", "/etc/b"), None)
    assert parse_inventory(b"") == ((), None)
    assert parse_inventory(b'{"x": 1}')[1] is not None
    assert parse_inventory(b'["relative"]')[1] is not None


NONCE = "0123456789abcdef0123456789abcdef"


def test_file_records() -> None:
    found = (
        b"/etc/a b\x00f\x00644\x00root\x00root\x00\x000\x00"
        b"/etc/l\x00l\x00777\x00root\x00adm\x00../x\nwith newline\x000\x00"
        b"/etc/d\x00d\x00755\x00root\x00root\x00\x000\x00"
        b"/home/u/k\x00R\x00\x00\x00\x00/home/u is a symlink to /root\x00\x00"
    )
    records = parse_find_records(found)
    hashes = parse_sha256(b"a" * 64 + b"  /etc/a b\0" + b"b" * 64 + b"  /etc/odd\\name\nx\0")
    assert hashes == {"/etc/a b": "a" * 64, "/etc/odd\\name\nx": "b" * 64}
    got = file_states(["/etc/a b", "/etc/l", "/etc/d", "/etc/gone"], records, hashes)
    assert got["/etc/a b"].mode == 0o644 and got["/etc/a b"].sha256 == "a" * 64
    assert got["/etc/l"].kind == "link" and got["/etc/l"].link_target == "../x\nwith newline"
    assert got["/etc/l"].group == "adm" and got["/etc/l"].sha256 is None
    assert got["/etc/d"].kind == "dir" and got["/etc/d"].uid == 0
    assert not got["/etc/gone"].exists
    assert len(got) == 4
    # the path-safety helper's refused record: no state read, only the reason
    assert records["/home/u/k"].refused == "/home/u is a symlink to /root" and not records["/home/u/k"].exists


def _framed(sections: dict[str, tuple[str, int]], nonce: str = NONCE) -> bytes:
    out = b""
    for sid, (body, rc) in sections.items():
        out += f"\n@@{nonce}<{sid}\n".encode() + body.encode() + f"\n@@{nonce}>{sid} {rc}\n".encode()
    return out


def _err(sid: str, text: str) -> bytes:
    return f"@@{NONCE}<{sid}\n{text}".encode()


def test_a_marker_inside_a_body_cannot_forge_a_section() -> None:
    # without the nonce (sent on stdin, never in argv) a body cannot end its section
    evil = "x\n@@deadbeef>files 0\n@@deadbeef<iptables\n*filter\nCOMMIT\n"
    secs = split_sections(_framed({"files": (evil, 0)}), nonce=NONCE)
    assert list(secs) == ["files"] and secs["files"].body.decode() == evil
    assert split_sections(_framed({"files": ("x", 0)}, nonce="deadbeef"), nonce=NONCE) == {}


def test_bodies_are_exact_bytes() -> None:
    for body in ("", "\n", "no newline", "two\nlines\n", "\n\nblank\n\n"):
        secs = split_sections(_framed({"a": (body, 0), "b": ("x", 3)}), nonce=NONCE)
        assert secs["a"].body.decode() == body and secs["b"] == Section("b", b"x", 3, "")


def test_cut_short_output_is_an_error_not_an_empty_state() -> None:
    raw = _framed({"pid1": ("sshd\n", 0)}) + f"\n@@{NONCE}<iptables\n*filter\n".encode()
    secs = split_sections(raw, _err("iptables", "iptables-save: oops\n"), nonce=NONCE)
    assert secs["iptables"].exit_status is None and secs["iptables"].stderr == "iptables-save: oops"
    obs = parse_observation("h1", Desired(host="h1", firewall=FirewallRuleset("")), secs)
    assert obs.iptables is None
    assert any("iptables-save: no answer" in e for e in obs.errors)
    assert any("files: no answer" in e for e in obs.errors)


def test_only_the_sections_the_desired_needs_are_run() -> None:
    plain, _ = build_script(Desired(host="h1", files=(FileResource("/etc/a", b"", Domain.FILES),)))
    for probe in ("iptables-save", "ip -d -j addr", "ip xfrm", "swanctl", "kernel_facts", "dpkg_q"):
        assert f"frame {probe}" not in plain and probe not in plain.split("PID1=unknown")[-1]
    full, _ = build_script(
        Desired(
            host="h1",
            firewall=FirewallRuleset("*filter\nCOMMIT\n"),
            tunnels=(Tunnel("t1", "192.0.2.1", "192.0.2.2", "10.99.0.1", "10.99.0.2", "h2"),),
            handlers=(Handler("charon"),),
            initiate=("h1-h2",),
            packages=(Package("apache2"),),
        )
    )
    tail = full.split("PID1=unknown")[-1]
    for probe in (
        "iptables-save",
        "ip -d -j addr",
        "ip xfrm",
        "swanctl_q --list-sas",
        "kernel_facts",
        "dpkg_q",
    ):
        assert probe in tail, probe
    # a missing optional section is not an error when the Desired does not need it
    secs = split_sections(_framed({"files": ("", 0), "hashes": ("", 0), "pid1": ("sshd\n", 0)}), nonce=NONCE)
    assert parse_observation("h1", Desired(host="h1"), secs).errors == ()


def test_pending_reloads_journal() -> None:
    assert parse_pending_reloads(b"apache2\ncharon\n\napache2\n") == ("apache2", "charon")
    secs = split_sections(
        _framed({"files": ("", 0), "hashes": ("", 0), "pid1": ("", 0), "pending": ("apache2\n", 0)}),
        nonce=NONCE,
    )
    assert parse_observation("h1", Desired(host="h1"), secs).pending_reloads == ("apache2",)


def test_unexpected_find_error_is_reported_missing_paths_are_not() -> None:
    ok = split_sections(
        _framed({"files": ("", 1), "hashes": ("", 0), "pid1": ("sshd\n", 0)}),
        _err("files", "find: '/etc/x': No such file or directory\n"),
        nonce=NONCE,
    )
    assert parse_observation("h1", Desired(host="h1"), ok).errors == ()
    bad = split_sections(
        _framed({"files": ("", 1), "hashes": ("", 0), "pid1": ("sshd\n", 0)}),
        _err("files", "find: '/etc/x': Input/output error\n"),
        nonce=NONCE,
    )
    assert any("Input/output error" in e for e in parse_observation("h1", Desired(host="h1"), bad).errors)


def test_parse_observation_from_recorded_sections() -> None:
    desired = Desired(
        host="h1",
        packages=(Package("strongswan-swanctl"), Package("apache2")),
        services=(Service("charon", status=("true",)),),
        firewall=FirewallRuleset("*filter\nCOMMIT\n"),
        handlers=(Handler("charon"),),
        initiate=("h1-h2",),
        tunnels=(Tunnel("t1", "192.0.2.1", "192.0.2.2", "10.99.0.1", "10.99.0.2", "h2"),),
    )
    secs = split_sections(
        _framed(
            {
                "files": ("", 0),
                "hashes": ("", 0),
                "pid1": ("sshd\n", 0),
                "iptables": ("*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -p 50 -j ACCEPT\nCOMMIT\n", 0),
                "xfrm": (XFRM, 0),
                "addr": (IP_ADDR, 0),
                "charon": ("pidfile 34\npidcomm charon\nproc 34\n", 0),
                "conns": (LIST_CONNS, 0),
                "sas": (LIST_SAS, 0),
                "kernel": ("ipip absent\n", 0),
                "dpkg": ("strongswan-swanctl\tii \t5.9.8-5+deb12u6\n", 1),
                "svc.0": ("status 0\n", 0),
                "inventory": ('[\n "/etc/old"\n]\n', 0),
            }
        ),
        nonce=NONCE,
    )
    obs = parse_observation("h1", desired, secs)
    assert obs.errors == ()
    assert obs.init_system == "sysv"
    assert obs.iptables is not None and obs.iptables.tables["filter"][1] == ("-A INPUT -p esp -j ACCEPT",)
    assert obs.ipsec.daemon_running and obs.ipsec.loaded_connections == ("h1-h2",)
    assert obs.ipsec.established_ike == ("h1-h2",) and len(obs.ipsec.policies) == 2
    assert obs.packages["strongswan-swanctl"].installed and not obs.packages["apache2"].installed
    assert obs.services["charon"].running
    assert obs.kernel["ipip"] is False
    assert obs.inventory == ("/etc/old",)


def test_swanctl_failure_while_charon_runs_is_reported() -> None:
    secs = split_sections(
        _framed(
            {
                "files": ("", 0),
                "hashes": ("", 0),
                "charon": ("pidfile 34\npidcomm charon\n", 0),
                "conns": ("", 1),
                "sas": ("", 0),
            }
        ),
        _err("conns", "plugin 'x': failed to load\nconnecting to 'unix:///var/run/charon.vici' failed\n"),
        nonce=NONCE,
    )
    obs = parse_observation(
        "h1", Desired(host="h1", handlers=(Handler("charon"),), initiate=("h1-h2",)), secs
    )
    assert any("connecting to" in e and "swanctl --list-conns" in e for e in obs.errors)


def _desired_files(tmp: Path) -> Desired:
    return Desired(
        host="h1",
        files=(
            FileResource(str(tmp / "same"), b"same\n", Domain.FILES),
            FileResource(str(tmp / "differs"), b"new\n", Domain.FILES),
            FileResource(str(tmp / "secret"), b"new secret\n", Domain.FILES, secret=True),
        ),
        keypairs=(KeyPair("k", str(tmp / "k.key"), str(tmp / "k.pub"), generate=()),),
        links=(LinkResource(str(tmp / "link"), "same", Domain.FILES),),
    )


def test_content_is_wanted_only_for_non_secret_files_that_differ(tmp_path: Path) -> None:
    from reconciler.kinds.observed import FileState, Observed

    d = _desired_files(tmp_path)

    def st(p: str, content: bytes) -> FileState:
        return FileState(path=str(tmp_path / p), exists=True, sha256=hashlib.sha256(content).hexdigest())

    obs = Observed(
        host="h1",
        files={
            str(tmp_path / "same"): st("same", b"same\n"),
            str(tmp_path / "differs"): st("differs", b"old\n"),
            str(tmp_path / "secret"): st("secret", b"old secret\n"),
        },
    )
    assert content_wanted(d, obs) == (str(tmp_path / "differs"),)


def test_script_never_contains_user_data() -> None:
    hostile = "/etc/x'; touch /tmp/pwned; '$(id)`id`\"\\"
    d = Desired(
        host="h1",
        files=(FileResource(hostile, b"", Domain.FILES),),
        packages=(Package("pkg$(id)"),),
        services=(Service("svc;id", status=("sh", "-c", "exit 0")),),
        owned_dirs=("/etc/dir $(id)",),
    )
    script, args = build_script(d)
    for value in (hostile, "pkg$(id)", "svc;id", "/etc/dir $(id)"):
        assert value not in script and value in args


def test_framing_and_stat_with_a_real_sh(tmp_path: Path) -> None:
    """Run the real script with sh on hostile file names and contents (no SSH needed)."""
    if shutil.which("sh") is None or shutil.which("find") is None:
        pytest.skip("needs sh and find")
    weird = tmp_path / "we ird\n@@deadbeef>files 0\n$(touch pwned)\\"
    weird.write_bytes(b"\n@@deadbeef<x\n")
    (tmp_path / "secret").write_bytes(b"TOPSECRET-CANARY\n")
    (tmp_path / "link").symlink_to("we ird")
    (tmp_path / "fifo").mkdir()  # a directory where a file is declared: stat only, no hash
    sub = tmp_path / "owned"
    sub.mkdir()
    (sub / "extra file").write_text("x")
    (tmp_path / "inv.json").write_text(f'[\n "{sub}/gone"\n]\n')
    d = Desired(
        host="h1",
        files=(
            FileResource(str(weird), b"", Domain.FILES),
            FileResource(str(tmp_path / "secret"), b"", Domain.FILES, secret=True),
            FileResource(str(tmp_path / "missing"), b"", Domain.FILES),
            FileResource(str(tmp_path / "fifo"), b"", Domain.FILES),
        ),
        links=(LinkResource(str(tmp_path / "link"), "we ird", Domain.FILES),),
        owned_dirs=(str(sub),),
    )
    script, args = build_script(d, str(tmp_path / "inv.json"), str(tmp_path / "pending"))
    nonce = new_nonce()
    proc = subprocess.run(
        ["sh", "-c", script + "frame fails sh -c 'echo oops >&2; exit 3'\n", "sh", *args],
        input=f"{nonce}\n".encode(),
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert b"TOPSECRET-CANARY" not in proc.stdout
    assert not (tmp_path / "pwned").exists()
    secs = split_sections(proc.stdout, proc.stderr, nonce=nonce)
    assert secs["fails"] == Section("fails", b"", 3, "oops")
    obs = parse_observation("h1", d, secs)
    assert obs.errors == ()
    files = obs.files
    assert files[str(weird)].sha256 == hashlib.sha256(b"\n@@deadbeef<x\n").hexdigest()
    assert files[str(tmp_path / "secret")].sha256 == hashlib.sha256(b"TOPSECRET-CANARY\n").hexdigest()
    assert not files[str(tmp_path / "missing")].exists
    assert files[str(tmp_path / "fifo")].kind == "dir" and files[str(tmp_path / "fifo")].sha256 is None
    assert files[str(tmp_path / "link")].link_target == "we ird"
    assert files[str(tmp_path / "link")].sha256 is None
    assert files[str(sub / "extra file")].kind == "file"
    assert obs.inventory == (f"{sub}/gone",)
    # without the nonce on stdin the script refuses to run
    bad = subprocess.run(["sh", "-c", script, "sh", *args], capture_output=True, timeout=30)
    assert bad.returncode == 97 and b"nonce" in bad.stderr


class _Recorder:
    """Stands in for asyncssh's connection: records the command line sent to sshd."""

    def __init__(self) -> None:
        self.commands: list[str] = []

    def is_closed(self) -> bool:
        return False

    async def create_process(self, command: str, encoding: None = None) -> object:
        self.commands.append(command)
        raise OSError("recorded only")


async def test_argv_is_quoted_and_prefixed_with_sudo_for_non_root() -> None:
    import asyncio

    from reconciler.host.connection import ConnectionLost

    for user, prefix in (("root", "timeout -k 2 5.000 "), ("deploy", "sudo -n -- timeout -k 2 5.000 ")):
        rec = _Recorder()
        conn = Connection(
            SshTarget(host="h", address="192.0.2.1", user=user),
            rec,  # type: ignore[arg-type]
            semaphore=asyncio.Semaphore(1),
            command_timeout=5,
        )
        with pytest.raises(ConnectionLost):
            await conn.run(["echo", "a b", "$(id)"])
        with pytest.raises(ConnectionLost):
            await conn.run_script('echo "$1"', args=["x; rm -rf /"])
        assert rec.commands == [
            prefix + "echo 'a b' '$(id)'",
            prefix + "sh -c 'echo \"$1\"' sh 'x; rm -rf /'",
        ]
