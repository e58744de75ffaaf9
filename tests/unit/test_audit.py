"""AppArmor denials: parsing, rule suggestions, and the kernel log reader (real script, run
locally in a private mount namespace whose /var/log is a temp dir)."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.drift.audit import (
    CursorStore,
    parse_denial,
    parse_lines,
    path_kinds,
    profile_file,
    read_kernel_log,
    rule_perms,
    suggest,
)
from reconciler.host.fake import FakeHost, bind_supported

SEED = (
    'Nov 25 10:00:00 db1 kernel: [ 123.456] audit(1290000000.123:42): type=1503 operation="inode_create" '
    'requested_mask="w::" denied_mask="w::" fsuid=106 name="/data/var/mysql" pid=2345 '
    'profile="/usr/sbin/mysqld"'
)
MODERN = (
    'Nov 25 10:00:01 db1 kernel: [ 124.1] audit: type=1400 audit(1700000000.1:43): apparmor="DENIED" '
    'operation="open" class="file" profile="/usr/sbin/mysqld" name="/data/var/mysql/ibdata1" pid=2345 '
    'comm="mysqld" requested_mask="r" denied_mask="r" fsuid=106 ouid=106'
)


def test_parse_old_and_new_formats() -> None:
    d = parse_denial(SEED)
    assert d is not None
    assert (d.profile, d.operation, d.name, d.denied) == (
        "/usr/sbin/mysqld",
        "inode_create",
        "/data/var/mysql",
        "w::",
    )
    m = parse_denial(MODERN)
    assert m is not None and (m.operation, m.name, m.denied, m.comm) == (
        "open",
        "/data/var/mysql/ibdata1",
        "r",
        "mysqld",
    )
    assert parse_denial(MODERN.replace('"DENIED"', '"ALLOWED"')) is None
    assert parse_denial("Nov 25 kernel: eth0 link up") is None
    # audit.log encodes names with spaces in hex
    hexline = (
        'type=AVC msg=audit(1.2:3): apparmor="DENIED" operation="mkdir" profile="/usr/bin/x" '
        'name=2F612062 requested_mask="c" denied_mask="c"'
    )
    h = parse_denial(hexline)
    assert h is not None and h.name == "/a b"


def test_seed_case_gives_the_two_rules() -> None:
    [s] = suggest(parse_lines([SEED]), kinds={"/data/var/mysql": "dir"})
    assert s.local_file == "/etc/apparmor.d/local/usr.sbin.mysqld"
    assert s.rules == ("/data/var/mysql/ r,", "/data/var/mysql/** rwk,")
    # the same without looking at the host (the path does not exist there)
    [s] = suggest(parse_lines([SEED]))
    assert s.rules == ("/data/var/mysql/ r,", "/data/var/mysql/** rwk,")
    # a file seen on the host gets a file rule
    [s] = suggest(parse_lines([SEED]), kinds={"/data/var/mysql": "file"})
    assert s.rules == ("/data/var/mysql w,",)


def test_file_rule_and_merging() -> None:
    lines = [
        MODERN,
        MODERN,
        MODERN.replace('requested_mask="r" denied_mask="r"', 'requested_mask="wc" denied_mask="wc"'),
    ]
    ds = parse_lines(lines)
    assert len(ds) == 2  # the repeated line is one denial
    [s] = suggest(ds, kinds={"/data/var/mysql/ibdata1": "file"})
    assert s.rules == ("/data/var/mysql/ibdata1 rw,",)


def test_masks_and_other_kinds() -> None:
    assert rule_perms("w::") == "w"
    assert rule_perms("::rw") == "rw"
    assert rule_perms("c") == "w" and rule_perms("d") == "w"
    assert rule_perms("a") == "a" and rule_perms("wa") == "w"
    assert rule_perms("rk") == "rk" and rule_perms("l") == "l" and rule_perms("m") == "m"
    assert rule_perms("x") == "ix"
    cap = parse_denial(
        'audit: type=1400 apparmor="DENIED" operation="capable" profile="/usr/sbin/ntpd" pid=1 '
        'comm="ntpd" capability=25 capname="sys_time"'
    )
    net = parse_denial(
        'audit: type=1400 apparmor="DENIED" operation="create" profile="named" pid=1 comm="named" '
        'family="inet6" sock_type="dgram" protocol=17 requested_mask="create" denied_mask="create"'
    )
    assert cap is not None and net is not None
    out = {s.profile: s for s in suggest([cap, net])}
    assert out["/usr/sbin/ntpd"].rules == ("capability sys_time,",)
    assert out["named"].rules == ("network inet6 dgram,",)
    assert out["named"].local_file == "/etc/apparmor.d/local/named"
    assert profile_file("/usr/sbin/apache2//HANDLING_UNTRUSTED_INPUT") == "usr.sbin.apache2"
    # paths with spaces/glob characters are quoted and escaped
    weird = parse_denial(
        'apparmor="DENIED" operation="mkdir" profile="/usr/bin/x" name="/srv/a b*/" '
        'requested_mask="c" denied_mask="c"'
    )
    assert weird is not None
    [s] = suggest([weird])
    assert s.rules == ('"/srv/a b\\*/" r,', '"/srv/a b\\*/**" rwk,')


@pytest.fixture
def varlog(tmp_path: Path) -> FakeHost:
    """A fake host whose /var/log is <tmp>/root/var/log (a private bind mount per command)."""
    why = bind_supported()
    if why is not None:
        pytest.skip(why)
    host = FakeHost(tmp_path / "root", host="local", bind=("/var/log",))
    Path(host.path("/var/log")).mkdir(parents=True)
    return host


async def test_cursor_reads_only_new_lines_and_survives_rotation(varlog: FakeHost, tmp_path: Path) -> None:
    kern = Path(varlog.path("/var/log")) / "kern.log"
    kern.write_text("old boot line\n" + SEED + "\n")
    store = CursorStore(tmp_path / "state")
    # first contact: baseline at the end, nothing reported
    first = await read_kernel_log(varlog, store.load("h"))
    assert first.baseline and first.lines == ()
    store.save("h", first.cursor)
    # appended lines (one incomplete) are read once
    with kern.open("a") as f:
        f.write(MODERN + "\npartial")
    r = await read_kernel_log(varlog, store.load("h"))
    assert r.lines == (MODERN,) and r.sources == ("kern",)
    store.save("h", r.cursor)
    r = await read_kernel_log(varlog, store.load("h"))
    assert r.lines == ()
    # rotation: the rest of the old file, then the new file from its start
    with kern.open("a") as f:
        f.write(" line\n")
    kern.rename(Path(varlog.path("/var/log")) / "kern.log.1")
    kern.write_text(SEED + "\n")
    r = await read_kernel_log(varlog, store.load("h"))
    assert r.lines == ("partial line", SEED)
    store.save("h", r.cursor)
    # truncation: start again at 0
    kern.write_text("x\n")
    r = await read_kernel_log(varlog, store.load("h"))
    assert r.lines == ("x",)
    # a file that appears after the baseline is read from its start
    (Path(varlog.path("/var/log")) / "syslog").write_text(MODERN + "\n")
    r = await read_kernel_log(varlog, r.cursor)
    assert r.lines == (MODERN,) and r.sources == ("kern", "syslog")
    # tail mode (plan): recent lines, cursor unchanged
    t = await read_kernel_log(varlog, None, tail=True)
    assert MODERN in t.lines


async def test_path_kinds_runs_its_framed_script_on_a_fake_host(tmp_path: Path) -> None:
    host = FakeHost(tmp_path)
    d = tmp_path / "srv" / "a b"
    d.mkdir(parents=True)
    (d / "f.conf").write_text("x\n")
    asked = [f"{d}/", str(d / "f.conf"), str(tmp_path / "missing"), "relative/path"]
    assert await path_kinds(host, asked) == {str(d): "dir", str(d / "f.conf"): "file"}
    assert len(host.calls) == 1
