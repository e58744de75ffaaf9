"""audit.py against denials as Debian 12's kernel (6.1) writes them to the journal
(`journalctl -k -o cat`), copied from the VM tier's db1 guest (tests/vm/test_vm_2_apparmor.py)."""

from __future__ import annotations

from reconciler.drift.audit import parse_denial, suggest

REAL = [
    'audit: type=1400 audit(1796302157.763:16): apparmor="DENIED" operation="mknod" '
    'profile="/usr/sbin/mariadbd" name="/data/var/mysql/ddl_recovery.log" pid=2895 comm="mariadbd" '
    'requested_mask="c" denied_mask="c" fsuid=100 ouid=100',
    'audit: type=1400 audit(1796302157.855:17): apparmor="DENIED" operation="mknod" '
    'profile="/usr/sbin/mariadbd" name="/data/var/mysql/db1.lower-test" pid=2895 comm="mariadbd" '
    'requested_mask="c" denied_mask="c" fsuid=100 ouid=100',
    'audit: type=1400 audit(1796302160.001:18): apparmor="DENIED" operation="open" '
    'profile="/usr/sbin/mariadbd" name="/proc/3116/cgroup" pid=3116 comm="mariadbd" '
    'requested_mask="r" denied_mask="r" fsuid=100 ouid=100',
]


def test_real_kernel_denials_parse() -> None:
    denials = [parse_denial(line) for line in REAL]
    assert all(d is not None for d in denials)
    d = denials[0]
    assert d is not None
    assert (d.profile, d.operation, d.name) == (
        "/usr/sbin/mariadbd",
        "mknod",
        "/data/var/mysql/ddl_recovery.log",
    )


def test_a_created_file_asks_for_its_directory_and_proc_pids_are_generic() -> None:
    denials = [d for d in (parse_denial(line) for line in REAL) if d is not None]
    [s] = suggest(denials)
    assert s.local_file == "/etc/apparmor.d/local/usr.sbin.mariadbd"
    # the seed's fix for the moved datadir (MariaDB's first denied file is one of many), and a
    # /proc rule that holds for the next PID too
    assert s.rules == ("/data/var/mysql/ r,", "/data/var/mysql/** rwk,", "@{PROC}/@{pid}/cgroup r,")
