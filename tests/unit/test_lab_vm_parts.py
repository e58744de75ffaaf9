"""The VM lab's pure parts: image key, QEMU command line, MACs, namespace names, state, the
connection layer's netns option, verify's view of clear IP-IP. (The live tier: tests/vm/.)"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
from pathlib import Path

import pytest

from reconciler.fleet.load import load_fleet
from reconciler.host import netns
from reconciler.host.connection import targets_for
from reconciler.lab import vm_guest, vm_image, vm_net
from reconciler.lab.model import LabError
from reconciler.lab.state import HostRecord, LabState
from reconciler.lab.vm_accel import Accel
from reconciler.verify.datapath import pair_traffic, parse_capture

EXAMPLE = Path(__file__).resolve().parents[2] / "fleet-repo-example"


def test_image_key_follows_the_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    key = vm_image.image_key()
    assert key == vm_image.image_key() and len(key) == 16
    monkeypatch.setattr(vm_image, "PACKAGES", (*vm_image.PACKAGES, "htop"))
    assert vm_image.image_key() != key
    monkeypatch.undo()
    monkeypatch.setattr(vm_image, "CUSTOMIZE_SCRIPT", vm_image.CUSTOMIZE_SCRIPT + "true\n")
    assert vm_image.image_key() != key


def test_customize_script_keeps_no_build_secret_and_disables_what_the_engine_starts() -> None:
    script = vm_image.CUSTOMIZE_SCRIPT
    assert 'rm -f "$R"/etc/ssh/ssh_host_*' in script  # every guest gets its own host key
    assert "rules.v4" in script  # no firewall rules saved from the build machine
    for unit in ("apache2.service", "mariadb.service", "strongswan-starter.service"):
        assert unit in script
    assert "UsePAM no" in vm_image.SSHD_CONF and "PasswordAuthentication no" in vm_image.SSHD_CONF


def _spec(
    tmp_path: Path, name: str = "web1", address: str = "192.0.2.11", index: int = 0
) -> vm_guest.GuestSpec:
    return vm_guest.GuestSpec(name, address, index, tmp_path / name)


def _image(tmp_path: Path) -> vm_image.BaseImage:
    return vm_image.BaseImage(
        "k", tmp_path, tmp_path / "base.img", tmp_path / "vmlinuz", tmp_path / "initrd.img"
    )


def test_qemu_argv_tcg_and_kvm(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    argv = vm_guest.qemu_argv(spec, _image(tmp_path), Accel("tcg", "test"))
    assert argv[0] == "qemu-system-x86_64"
    assert argv[argv.index("-accel") + 1] == "tcg,thread=multi" and argv[argv.index("-cpu") + 1] == "max"
    assert "-nodefaults" in argv and argv[argv.index("-m") + 1] == "512"
    assert "tap,id=n0,ifname=tap0,script=no,downscript=no" in argv  # no helper script runs
    assert f"file:{spec.directory / 'console.log'}" in argv
    assert any(a.startswith("virtio-net-pci,netdev=n0,mac=52:54:00:00:02:0b") for a in argv)
    assert "net.ifnames=0" in argv[argv.index("-append") + 1]  # the fleet's interface is eth0
    kvm = vm_guest.qemu_argv(spec, _image(tmp_path), Accel("kvm", "test"))
    assert kvm[kvm.index("-accel") + 1] == "kvm" and kvm[kvm.index("-cpu") + 1] == "host"


def test_qemu_argv_refuses_a_path_with_a_comma(tmp_path: Path) -> None:
    bad = tmp_path / "a,b"
    with pytest.raises(LabError, match="comma"):
        vm_guest.qemu_argv(_spec(bad), _image(tmp_path), Accel("tcg", "test"))


def test_mac_and_names() -> None:
    assert vm_net.mac_address("192.0.2.11") == "52:54:00:00:02:0b"
    assert vm_net.mac_address("192.0.2.254") != vm_net.mac_address("192.0.2.11")
    # the namespace matches the lab's "<prefix>-*" names, so lab down removes it
    assert vm_net.netns_name("rcl1a2b") == "rcl1a2b-vmnet"
    assert vm_net.tap_name(3) == "tap3"


def test_state_round_trip_keeps_the_vm_fields() -> None:
    state = LabState(
        prefix="rcl1a2b",
        bridge="br0",
        owner_pid=1,
        owner_start=2,
        hosts=[HostRecord(name="web1", address="192.0.2.11", netns="rcl1a2b-vmnet", veth="tap0", pid=5)],
        kind="vm",
        vm={"netns": "rcl1a2b-vmnet", "image": "abc", "accel": "tcg"},
    )
    back = LabState.from_json(state.to_json())
    assert back.kind == "vm" and back.vm["netns"] == "rcl1a2b-vmnet" and back.hosts[0].pid == 5
    old = state.to_json().replace('"kind": "vm"', '"kindx": 1')  # a state file of an older version
    assert LabState.from_json(old).kind == "netns"


def test_targets_carry_the_namespace() -> None:
    fleet = load_fleet(EXAMPLE)
    plain = targets_for(fleet, known_hosts="/kh", client_keys=["/k"])
    assert all(t.netns is None for t in plain.values())
    inside = targets_for(fleet, known_hosts="/kh", client_keys=["/k"], netns="rcl1a2b-vmnet")
    assert {t.netns for t in inside.values()} == {"rcl1a2b-vmnet"}
    assert dataclasses.replace(plain["web1"], netns="rcl1a2b-vmnet") == inside["web1"]


@pytest.mark.parametrize("name", ["../etc", "a/b", "", "-x", "x" * 80, "a b"])
def test_netns_names_are_checked_before_any_path_is_opened(name: str) -> None:
    with pytest.raises(netns.NetnsError):
        netns.socket_in(name)


def test_netns_socket_missing_namespace_is_an_error() -> None:
    with pytest.raises(netns.NetnsError, match="rclnone0-vmnet"):
        netns.socket_in("rclnone0-vmnet")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ip netns add)")
def test_a_socket_lives_in_the_namespace_it_was_made_in() -> None:
    """A listener on the machine's loopback is reachable from here but not from a socket made
    in a fresh namespace (its own loopback, down); the caller's thread never changes namespace."""
    name = f"rclq{os.getpid()}-t"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        with socket.create_server(("127.0.0.1", 0)) as server:
            port = server.getsockname()[1]
            mine = os.readlink("/proc/thread-self/ns/net")
            inside = netns.socket_in(name)
            with inside:
                inside.settimeout(2)
                with pytest.raises(OSError):
                    inside.connect(("127.0.0.1", port))
            assert os.readlink("/proc/thread-self/ns/net") == mine
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                pass
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_capture_sees_clear_ipip_and_kernel_esp() -> None:
    text = "\n".join(
        [
            "12:00:00.1 IP 192.0.2.11 > 192.0.2.12: ESP(spi=0xc1a2b3c4,seq=0x1), length 120",
            "12:00:00.2 IP 192.0.2.12 > 192.0.2.11: ESP(spi=0xc5d6e7f8,seq=0x1), length 120",
            "12:00:00.3 IP 192.0.2.12 > 192.0.2.11: IP 10.99.0.12 > 10.99.0.11: ICMP echo request, id 1, "
            "seq 1, length 32 (ipip-proto-4)",
        ]
    )
    packets = parse_capture(text)
    assert [p.kind for p in packets] == ["esp", "esp", "ipip"]
    t = pair_traffic(
        packets,
        own_public="192.0.2.11",
        peer_public="192.0.2.12",
        own_internal="10.99.0.11",
        peer_internal="10.99.0.12",
    )
    assert (t.esp_out, t.esp_in, t.esp_udp) == (1, 1, 0)  # protocol 50, not UDP 4500
    assert len(t.clear_ipip) == 1 and t.clear_icmp == ()
