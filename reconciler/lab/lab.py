"""``Lab``: bring lab hosts up (in parallel), run commands inside them, take them down."""

from __future__ import annotations

import atexit
import os
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from reconciler.lab import aptproxy, cleanup, host, limits, lock, network, procs, vm_lab
from reconciler.lab.init_script import INIT_SCRIPT
from reconciler.lab.model import LabError, LabFleet, LabHost, LabHostSpec, LabInfo, network_of
from reconciler.lab.state import (
    HostRecord,
    LabState,
    atomic_write,
    check_prefix,
    ensure_root,
    lab_dir,
    load_state,
    new_prefix,
)
from reconciler.log import get_logger

log = get_logger(__name__)

# what this 2-CPU, 24 GiB machine can hold (1,000 hosts measured: docs/LAB.md, "Big labs")
MAX_HOSTS = 4000

REQUIRED_TOOLS = ("ip", "unshare", "nsenter", "pivot_root", "/usr/sbin/sshd", "mount")

_live: dict[str, Lab] = {}
_live_mutex = threading.Lock()


def _down_live_labs() -> None:
    """atexit / signal path: take down every lab this process brought up and did not down."""
    with _live_mutex:
        labs = list(_live.values())
    for lab in labs:
        try:
            lab.down()
        except Exception as exc:  # noqa: BLE001 - best effort at exit
            log.warning("lab.exit_cleanup_failed", prefix=lab.info.prefix, error=str(exc))


atexit.register(_down_live_labs)


def _validate_specs(specs: Sequence[LabHostSpec]) -> None:
    if not specs:
        raise LabError("a lab needs at least one host")
    if len(specs) > MAX_HOSTS:
        raise LabError(f"a lab has at most {MAX_HOSTS} hosts, not {len(specs)}")
    names = [s.name for s in specs]
    addrs = [s.address for s in specs]
    addrs6 = [s.address_v6 for s in specs]
    if network.VOID_ADDRESS in addrs:
        raise LabError(f"lab hosts: {network.VOID_ADDRESS} is kept free (the lab's unreachable address)")
    for label, values in (("name", names), ("address", addrs), ("IPv6 address", addrs6)):
        dup = sorted({v for v in values if values.count(v) > 1})
        if dup:
            raise LabError(f"lab hosts: duplicate {label} {', '.join(dup)}")


def _info_from_state(state: LabState) -> LabInfo:
    d = lab_dir(state.prefix)
    hosts = tuple(
        LabHost(
            name=h.name,
            address=h.address,
            netns=h.netns,
            pid=h.pid,
            root=d / "hosts" / h.name,
            init_pid=h.init_pid,
            veth=h.veth,
        )
        for h in state.hosts
    )
    return LabInfo(
        prefix=state.prefix,
        state_dir=d,
        known_hosts=d / "known_hosts",
        client_key=d / "client_key",
        hosts=hosts,
        bridge=state.bridge,
        kind=state.kind,
        ssh_netns=str(state.vm.get("netns", "")) if state.kind == "vm" else "",
        fleet=LabFleet(state.fleet["name"], state.fleet["id"]) if state.fleet else None,
    )


class Lab:
    """A set of lab hosts. ``Lab.up(specs)`` builds one; ``lab.down()`` removes it all."""

    def __init__(self, info: LabInfo, *, owned: bool) -> None:
        self.info = info
        self._owned = owned
        self._down = False
        # seconds: lock_wait (in line for the lab lock), network (bridge, veths, netns),
        # build (from lock acquired until every sshd answers)
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ bring-up

    @classmethod
    def up(
        cls,
        specs: Sequence[LabHostSpec],
        prefix: str | None = None,
        *,
        lock_timeout: float = 600.0,
        ready_timeout: float | None = None,
        vm: bool = False,
        progress: Callable[[str], None] | None = None,
        fleet: LabFleet | None = None,
    ) -> Lab:
        """Build the hosts and wait until every sshd answers. On any failure, remove it all.
        ``vm=True``: every host is a QEMU guest with its own kernel (``vm_lab``, docs/LAB.md);
        the base image is built first if it is not cached (minutes, once). ``fleet``: the fleet
        the lab is made for (``--lab`` refuses any other; None: no fleet)."""
        _validate_specs(specs)
        if ready_timeout is None:
            ready_timeout = vm_lab.DEFAULT_READY_TIMEOUT if vm else 120.0
        missing = [t for t in REQUIRED_TOOLS if not _which(t)]
        if vm:
            missing += vm_lab.missing_tools()
        if missing:
            raise LabError(f"the lab needs {', '.join(missing)} (not found)")
        if os.geteuid() != 0:
            raise LabError("the lab needs root (network and mount namespaces)")
        prefix = check_prefix(prefix) if prefix else new_prefix()
        ensure_root()
        if vm:  # the image build (minutes, once) does not hold the machine-wide lab lock
            vm_lab.prepare_image(progress)
        t_wait = time.monotonic()
        lock.acquire(prefix, lambda dead: cleanup.down_prefix(dead, release_lock=False), timeout=lock_timeout)
        try:
            if lab_dir(prefix).exists() or network.netns_of(prefix) or network.links_of(prefix):
                cleanup.down_prefix(prefix, release_lock=False)
            cls._remove_stale_labs(prefix)
            holder = network.address_in_use()
            if holder is not None:
                raise LabError(
                    f"the lab's bridge address {holder} is already taken (not a reconciler lab); "
                    "remove it or use another machine"
                )
            reserved = network.reserved_addresses()
            clash = [f"{s.name} ({s.address}: {reserved[s.address]})" for s in specs if s.address in reserved]
            if clash:
                raise LabError("lab host addresses used by this machine itself: " + ", ".join(clash))
            lock_wait = time.monotonic() - t_wait
            if vm:
                lab = cls._build_vm(prefix, specs, ready_timeout, progress, fleet)
            else:
                lab = cls._build(prefix, specs, ready_timeout, fleet)
            lab.timings["lock_wait"] = lock_wait
        except BaseException:
            cleanup.down_prefix(prefix, release_lock=True)
            raise
        with _live_mutex:
            _live[prefix] = lab
        return lab

    @staticmethod
    def _remove_stale_labs(mine: str) -> None:
        """Under the lock no other lab may be live: anything else left is a crash leftover."""
        for other in cleanup.all_prefixes():
            if other == mine:
                continue
            state = None
            try:
                state = load_state(other)
            except LabError:
                pass
            if state is not None and procs.is_alive(state.owner_pid, state.owner_start) and state.detached:
                continue  # pragma: no cover - cannot happen while we hold the lock
            log.warning("lab.stale.remove", prefix=other)
            cleanup.down_prefix(other, release_lock=False)

    @classmethod
    def _build(
        cls, prefix: str, specs: Sequence[LabHostSpec], ready_timeout: float, fleet: LabFleet | None = None
    ) -> Lab:
        t0 = time.monotonic()
        d = lab_dir(prefix)
        d.mkdir(mode=0o700, parents=True, exist_ok=False)
        (d / "hosts").mkdir(mode=0o700)
        me = os.getpid()
        state = LabState(
            prefix=prefix,
            bridge=network.bridge_name(prefix),
            owner_pid=me,
            owner_start=procs.start_time(me),
            hosts=[
                HostRecord(
                    name=s.name,
                    address=s.address,
                    netns=network.netns_name(prefix, s.name),
                    veth=network.veth_name(prefix, i),
                )
                for i, s in enumerate(specs)
            ],
            fleet={"name": fleet.name, "id": fleet.id} if fleet is not None else None,
        )
        state.save()  # recorded before anything exists, so a crash from here on is cleanable

        init_path = d / "init.sh"
        atomic_write(init_path, INIT_SCRIPT, 0o700)
        client = host.new_ed25519(f"reconciler-lab-{prefix}")
        atomic_write(d / "client_key", client.private_openssh, 0o600)
        atomic_write(d / "client_key.pub", client.public_line + "\n", 0o644)
        host_keys = {
            s.name: host.prepare_host_dir(d / "hosts" / s.name, s.name, client.public_line) for s in specs
        }

        network.create(prefix, [(s.name, i, s.address) for i, s in enumerate(specs)])
        state.iptables_rules = network.allow_forward(prefix)
        state.neigh_limits = network.raise_neigh_table(len(specs))
        state.neigh_limits.update(limits.raise_for(len(specs)))
        state.save()
        proxy = package_path(d, [(d / "hosts" / s.name / "upper", s.address) for s in specs])
        t_net = time.monotonic()

        popens = []
        for i, s in enumerate(specs):
            rec = state.hosts[i]
            p = host.spawn(
                init_path,
                d / "hosts" / s.name,
                rec.netns,
                s.name,
                s.address,
                network.peer_name(prefix, i),
                f"{prefix}-{s.name}",
                s.address_v6,
            )
            rec.pid = p.pid
            rec.pid_start = procs.start_time(p.pid)
            popens.append(p)
        state.save()

        def ready(i: int) -> None:
            rec = state.hosts[i]
            hdir = d / "hosts" / rec.name
            rec.init_pid = host.find_init_pid(rec.pid)
            host.wait_ready(rec.name, rec.address, hdir, rec.pid, rec.pid_start, ready_timeout, rec.init_pid)

        with ThreadPoolExecutor(max_workers=min(64, len(specs))) as pool:
            for fut in [pool.submit(ready, i) for i in range(len(specs))]:
                fut.result()
        try:
            aptproxy.wait_listening(proxy)
        except RuntimeError as err:  # the hosts work without it: only new packages cannot be fetched
            log.warning("lab.package_path.unavailable", prefix=prefix, error=str(err))

        known = "".join(f"{s.address} {host_keys[s.name]}\n" for s in specs)
        atomic_write(d / "known_hosts", known, 0o644)
        state.status = "up"
        state.save()
        log.info(
            "lab.up",
            prefix=prefix,
            hosts=len(specs),
            network_s=round(t_net - t0, 3),
            total_s=round(time.monotonic() - t0, 3),
        )
        lab = cls(_info_from_state(state), owned=True)
        lab._popens = popens
        lab.timings.update(network=t_net - t0, build=time.monotonic() - t0)
        return lab

    @classmethod
    def _build_vm(
        cls,
        prefix: str,
        specs: Sequence[LabHostSpec],
        ready_timeout: float,
        progress: Callable[[str], None] | None,
        fleet: LabFleet | None = None,
    ) -> Lab:
        state, popens, timings = vm_lab.build(prefix, specs, ready_timeout, progress=progress)
        if fleet is not None:
            state.fleet = {"name": fleet.name, "id": fleet.id}
            state.save()
        lab = cls(_info_from_state(state), owned=True)
        lab._popens = popens
        lab.timings.update(timings)
        return lab

    _popens: list[subprocess.Popen[bytes]] = []

    # ------------------------------------------------------------------ use

    def host(self, name: str) -> LabHost:
        try:
            return self.info.host(name)
        except KeyError:
            raise LabError(f"lab {self.info.prefix} has no host {name!r}") from None

    def nsenter_argv(self, host_name: str) -> list[str]:
        if self.info.kind == "vm":
            raise LabError(f"lab {self.info.prefix} is a VM lab: its hosts are reached by SSH (exec)")
        h = self.host(host_name)
        if not h.init_pid or not procs.is_alive(h.init_pid):
            raise LabError(f"lab host {host_name} is not running")
        return [
            "nsenter",
            f"--target={h.init_pid}",
            "--net",
            "--mount",
            "--uts",
            "--ipc",
            "--pid",
            "--root",
            "--wd",
        ]

    def exec(
        self,
        host_name: str,
        argv: Sequence[str],
        input: bytes | None = None,
        timeout: float = 30,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``argv`` inside the host (its namespaces and root), without SSH; on a VM lab,
        over SSH from inside the lab's namespace (strict host key, the lab's client key)."""
        if self.info.kind == "vm":
            return vm_lab.exec_in(self.info, host_name, argv, input, timeout)
        return subprocess.run(
            [*self.nsenter_argv(host_name), "--", *argv],
            input=input,
            capture_output=True,
            timeout=timeout,
            env=host.CLEAN_ENV,
            check=False,
        )

    # ------------------------------------------------------------------ teardown

    def down(self) -> list[str]:
        """Remove every host, link, namespace, rule and file of this lab; idempotent.
        Returns what could not be removed (empty on success)."""
        if self._down:
            return []
        left = cleanup.down_prefix(self.info.prefix, release_lock=True)
        for p in self._popens:
            procs.reap(p.pid)
        self._down = True
        with _live_mutex:
            _live.pop(self.info.prefix, None)
        return left

    def detach(self) -> None:
        """Leave the lab running after this process exits (``reconciler lab up``)."""
        lock.set_detached(self.info.prefix)
        state = load_state(self.info.prefix)
        if state is not None:
            state.detached = True
            state.save()
        with _live_mutex:
            _live.pop(self.info.prefix, None)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    # ------------------------------------------------------------------ lookup

    @staticmethod
    def current() -> LabInfo | None:
        """The lab left running by ``reconciler lab up``, if any (and still alive)."""
        owner = lock.read_owner()
        if owner is None or not owner.prefix or not owner.detached or not lock.owner_alive(owner):
            return None
        state = load_state(owner.prefix)
        if state is None or state.status != "up":
            return None
        return _info_from_state(state)

    @staticmethod
    def attach(prefix: str) -> Lab:
        """A handle on an existing lab (e.g. the current one) to exec into or down it."""
        state = load_state(prefix)
        if state is None:
            raise LabError(f"no lab with prefix {prefix}")
        return Lab(_info_from_state(state), owned=False)


def proxy_addresses(host_addresses: Sequence[str]) -> dict[str, str]:
    """Each lab host address -> the address of the lab's apt proxy that host reaches: the bridge's
    address on the host's own lab network (192.0.2.254 for 192.0.2.0/24, 198.19.255.254 for a
    big lab's 198.18.0.0/15; a host has a route to its own network only). Pure."""
    return {a: str(network_of(a)[1]) for a in host_addresses}


def package_path(d: Path, hosts: Sequence[tuple[Path, str]]) -> aptproxy.Starting:
    """The hosts' package path: the lab's apt proxy on the bridge address of each lab network the
    hosts are on (stopped with the lab: its pid file in the lab directory is on its command line)
    and the apt drop-in in each host root naming its own network's (``hosts``: (overlay upper
    layer, host address)). Wait for it with ``aptproxy.wait_listening`` (after the hosts started:
    it costs no bring-up time)."""
    via = proxy_addresses([address for _, address in hosts])
    starting = aptproxy.spawn(sorted(set(via.values())), d / "aptproxy.pid")
    for root, address in hosts:
        aptproxy.write_dropin(root, via[address])
    return starting


def _which(tool: str) -> bool:
    import shutil

    if tool.startswith("/"):
        return Path(tool).exists()
    return shutil.which(tool, path=host.CLEAN_ENV["PATH"]) is not None
