"""AppArmor for real, on the db1 guest (its kernel has the AppArmor LSM, enforcing).

The seed's case: MariaDB's datadir moved to /data/var/mysql by an admin. The fleet (the
example, plus MariaDB and its own enforcing profile for Debian 12's /usr/sbin/mariadbd: the
profile Debian ships is empty on purpose) is applied without the override: the kernel denies
the new datadir, MariaDB does not start and apply says so with the journal. The drift scan
reads the kernel's denials from the journal and mails them with the rules that fix them. The
fleet's override (``moved_directories``) applied by the reconciler lets MariaDB start on the
moved datadir, and no new denial comes. Last, a broken profile change is refused by
validation (nothing swapped, the service keeps running).
"""

from __future__ import annotations

import asyncio
import dataclasses
import email
import json
import shutil
import socket
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from vm_fleet import FIREWALL_WINDOW, apply, converge, pool_for, sh

from reconciler.drift.history import HistoryRepo
from reconciler.drift.scan import DriftScanner, HostDrift
from reconciler.engine.fleet import APPLIED, FAILED
from reconciler.fleet.load import load_fleet
from reconciler.fleet.model import DriftPolicy, Fleet, MailSettings, Notifications, SmtpSettings
from reconciler.lab import Lab
from reconciler.notify.outbox import Outbox

pytestmark = [pytest.mark.lab, pytest.mark.vm, pytest.mark.timeout(1800)]

# An enforcing profile for Debian 12's MariaDB 10.11 (the seed's mysqld profile, for the
# binary Debian runs, with what 10.11 needs under systemd). Its datadir is /var/lib/mysql;
# a moved datadir belongs in local/usr.sbin.mariadbd (moved_directories).
MARIADBD_PROFILE = """\
abi <abi/3.0>,

include <tunables/global>

/usr/sbin/mariadbd flags=(attach_disconnected) {
  include <abstractions/base>
  include <abstractions/nameservice>
  include <abstractions/user-tmp>
  include <abstractions/mysql>

  capability dac_override,
  capability setgid,
  capability setuid,
  capability sys_resource,
  capability ipc_lock,
  capability sys_nice,

  network tcp,
  network udp,

  /etc/hosts.allow r,
  /etc/hosts.deny r,
  /etc/group m,
  /etc/passwd m,
  /etc/mysql/ r,
  /etc/mysql/** r,
  /usr/sbin/mariadbd mr,
  /usr/share/mysql/** r,
  /usr/share/mariadb/** r,
  /usr/lib/mysql/plugin/ r,
  /usr/lib/mysql/plugin/*.so mr,
  /var/lib/mysql/ r,
  /var/lib/mysql/** rwk,
  /var/log/mysql/ r,
  /var/log/mysql/* rw,
  /{,var/}run/mysqld/ rw,
  /{,var/}run/mysqld/** rwk,
  /{,var/}run/systemd/notify w,
  /sys/devices/system/cpu/ r,
  /sys/devices/system/node/ r,
  /sys/devices/system/node/** r,
  /sys/block/ r,
  /sys/devices/**/queue/* r,
  @{PROC}/@{pid}/cgroup r,
  @{PROC}/@{pid}/status r,
  @{PROC}/@{pid}/task/ r,
  @{PROC}/sys/kernel/core_pattern r,
  @{PROC}/sys/fs/aio-max-nr r,

  include if exists <local/usr.sbin.mariadbd>
}
"""


def variant(base: Path, tmp: Path, *, moved: bool, profile: str = MARIADBD_PROFILE) -> Path:
    """The example fleet (with its collected keys) + MariaDB on a moved datadir on db hosts."""
    repo = tmp / f"fleet-apparmor-{'moved' if moved else 'plain'}-{abs(hash(profile)) % 10_000}"
    if repo.exists():
        shutil.rmtree(repo)
    shutil.copytree(base, repo)
    (repo / "roles" / "db.yaml").write_text(
        "apiVersion: reconciler/v1\nkind: Role\nname: db\n"
        "packages: [mariadb-server]\nservices: [mariadb]\n"
        "ports:\n  - {name: mysql, port: 3306, protocol: tcp, sources: [10.99.0.0/24]}\n"
        "apparmor: [usr.sbin.mariadbd]\nfiles: [motd, mariadb-datadir]\n"
    )
    (repo / "files" / "mariadb-datadir.yaml").write_text(
        "apiVersion: reconciler/v1\nkind: ManagedFile\nname: mariadb-datadir\n"
        "path: /etc/mysql/mariadb.conf.d/90-datadir.cnf\n"
        'content: "# the datadir was moved by the admin\\n[mysqld]\\ndatadir = /data/var/mysql\\n"\n'
        "package: mariadb-server\n"
    )
    doc = "apiVersion: reconciler/v1\nkind: AppArmorProfile\nname: usr.sbin.mariadbd\n"
    if moved:
        doc += "moved_directories:\n  - {from: /var/lib/mysql, to: /data/var/mysql}\n"
    doc += "content: |\n" + "".join(f"  {line}\n" if line else "\n" for line in profile.splitlines())
    (repo / "apparmor" / "usr.sbin.mariadbd.yaml").write_text(doc)
    return repo


# ---------------------------------------------------------------- SMTP sink on loopback


class _Sink:
    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        self.messages.append(email.message_from_bytes(envelope.content))
        return "250 OK"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _body(m: Message) -> str:
    parts = [p.get_payload(decode=True) for p in m.walk() if p.get_content_type() == "text/plain"]
    return "\n".join(p.decode(errors="replace") for p in parts if isinstance(p, bytes))


class Drift:
    """A drift scanner of db1 with its own history, outbox and SMTP sink."""

    def __init__(self, tmp: Path, lab: Lab, fleet: Fleet) -> None:
        self.sink = _Sink()
        self.port = _free_port()
        self.controller = Controller(self.sink, hostname="127.0.0.1", port=self.port)
        self.controller.start()
        mail = MailSettings(to=("ops@example.com",), sender="reconciler@example.com",
                            smtp=SmtpSettings(host="127.0.0.1", port=self.port))  # fmt: skip
        self.fleet = dataclasses.replace(fleet, notifications=Notifications(mail=mail), drift=DriftPolicy())
        self.lab = lab
        state = tmp / "drift-state"
        self.history = HistoryRepo.open(tmp / "history", state)
        self.outbox = Outbox.in_state_dir(state, backoff_base=0)
        self.state = state

    async def scan(self) -> HostDrift:
        scanner = DriftScanner(self.fleet, self.history, self.outbox, self.state, fleet_commit="vm")
        async with pool_for(self.fleet, self.lab) as pool:
            [res] = await scanner.scan(pool, ["db1"])
        assert res.ok, res.error
        return res

    async def mails(self) -> list[Message]:
        mail = self.fleet.notifications.mail
        assert mail is not None
        await self.outbox.deliver_due(mail.smtp, timeout=10)
        out, self.sink.messages = self.sink.messages, []
        return out

    def stop(self) -> None:
        self.controller.stop()


def _host_result(result: Any, host: str) -> Any:
    [h] = [h for h in result.hosts if h.host == host]
    return h


def _why(h: Any) -> str:
    """Everything the engine said about a host (error, per-action messages), as text."""
    return json.dumps(h.as_dict())


def test_moved_datadir_denied_mailed_fixed_by_the_override(
    vm_lab: Lab, example_repo: Path, tmp_path: Path
) -> None:
    if not (example_repo / "keys" / "db1.pub").exists():
        converge(example_repo, vm_lab)  # the mesh module did not run first
    # the admin moves MariaDB's datadir (Debian's package made it in /var/lib/mysql)
    sh(
        vm_lab,
        "db1",
        "systemctl stop mariadb; mkdir -p /data/var; "
        "test -d /data/var/mysql || cp -a /var/lib/mysql /data/var/",
    )
    assert sh(vm_lab, "db1", "aa-enabled").strip() == "Yes"  # the LSM is on in this kernel

    plain = load_fleet(variant(example_repo, tmp_path, moved=False))
    drift = Drift(tmp_path, vm_lab, plain)
    try:
        asyncio.run(drift.scan())  # baseline: the kernel log cursor starts here
        asyncio.run(drift.mails())

        # 1. without the override: the profile is loaded, enforcing; MariaDB cannot start
        result = asyncio.run(_apply_db1(plain, vm_lab))
        db1 = _host_result(result, "db1")
        assert db1.status == FAILED, _why(db1)
        assert "mariadb failed to start" in _why(db1), _why(db1)
        status = sh(vm_lab, "db1", "aa-status")
        assert (
            "/usr/sbin/mariadbd" in status.split("profiles are in enforce mode")[1].split("profiles are")[0]
        )
        state = sh(vm_lab, "db1", "systemctl is-active mariadb || true").strip()
        assert state in ("failed", "inactive", "activating"), state
        kernel = sh(vm_lab, "db1", "journalctl -k -o cat --no-pager | grep 'apparmor=\"DENIED\"' || true")
        assert 'profile="/usr/sbin/mariadbd" name="/data/var/mysql/' in kernel, kernel

        # 2. the drift scan reads the real denials and mails the rules that fix them
        r = asyncio.run(drift.scan())
        [s] = [s for s in r.suggestions if s.profile == "/usr/sbin/mariadbd"]
        assert s.local_file == "/etc/apparmor.d/local/usr.sbin.mariadbd"
        # the seed's fix: exactly what moved_directories renders (checked after step 3)
        assert s.rules == ("/data/var/mysql/ r,", "/data/var/mysql/** rwk,"), s.rules
        mails = asyncio.run(drift.mails())
        denial_mails = [m for m in mails if "AppArmor denial" in str(m["Subject"])]
        assert denial_mails, [m["Subject"] for m in mails]
        text = _body(denial_mails[0])
        assert "/usr/sbin/mariadbd" in text and all(rule in text for rule in s.rules), text

        # 3. the fleet's override, applied: MariaDB starts on the moved datadir
        moved = load_fleet(variant(example_repo, tmp_path, moved=True))
        result = asyncio.run(_apply_db1(moved, vm_lab))
        db1 = _host_result(result, "db1")
        assert db1.status == APPLIED, _why(db1)
        local = sh(vm_lab, "db1", "cat /etc/apparmor.d/local/usr.sbin.mariadbd")
        assert all(rule in local.splitlines() for rule in s.rules), local  # the mailed rules
        assert sh(vm_lab, "db1", "systemctl is-active mariadb").strip() == "active"
        datadir = sh(vm_lab, "db1", "mariadb -N -B -e 'select @@datadir'").strip()
        assert datadir == "/data/var/mysql/"
        assert "/usr/sbin/mariadbd (" in sh(vm_lab, "db1", "aa-status")  # the daemon runs confined

        # ... and the denials stop: MariaDB wrote in /data/var/mysql, the scan finds nothing new
        sql = (
            "create database if not exists vm; "
            "create table if not exists vm.t (i int); insert into vm.t values (1)"
        )
        sh(vm_lab, "db1", f"mariadb -e '{sql}'")
        r = asyncio.run(drift.scan())
        assert [s for s in r.suggestions if s.profile == "/usr/sbin/mariadbd"] == []
        assert [m for m in asyncio.run(drift.mails()) if "AppArmor" in str(m["Subject"])] == []

        # 4. a broken profile change: validation refuses it, nothing swapped, MariaDB keeps running
        before = sh(vm_lab, "db1", "sha256sum /etc/apparmor.d/usr.sbin.mariadbd")
        broken = MARIADBD_PROFILE.replace("  /etc/mysql/ r,\n", "  /etc/mysql/ rr-x,\n")
        bad = load_fleet(variant(example_repo, tmp_path, moved=True, profile=broken))
        result = asyncio.run(_apply_db1(bad, vm_lab))
        db1 = _host_result(result, "db1")
        assert db1.status == FAILED, _why(db1)
        why = _why(db1)
        assert "apparmor_parser" in why and "usr.sbin.mariadbd" in why, why
        assert sh(vm_lab, "db1", "sha256sum /etc/apparmor.d/usr.sbin.mariadbd") == before
        assert sh(vm_lab, "db1", "systemctl is-active mariadb").strip() == "active"
    finally:
        drift.stop()


async def _apply_db1(fleet: Fleet, lab: Lab) -> Any:
    from reconciler.engine.fleet import reconcile_fleet

    async with pool_for(fleet, lab) as pool:
        return await reconcile_fleet(fleet, ["db1"], pool, apply=True, firewall_window=FIREWALL_WINDOW)


__all__ = ["apply"]
