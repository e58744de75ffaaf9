"""Path safety on a real lab host, attacked by real unprivileged users (issue #14).

- ``deploy`` replaces ``~/.ssh`` with a link to /etc/update-motd.d or to /root/.ssh before the
  apply of a managed ``/home/deploy/.ssh/authorized_keys``: plan shows the refusal (no diff of
  the link's target), apply refuses it (failed, with the reason) while an independent file
  still applies; nothing lands in the link's target, root's keys stay as they were and a new
  SSH connection as root still works;
- ``app`` swaps a link to /etc/shadow into ``/srv/app/app.ini`` and into its staged temp at the
  exact moment between observation and swap (test hook) and in a racing loop during 30
  applies: /etc/shadow keeps its owner, mode and content, no file outside /srv/app becomes
  ``app``'s;
- a link as a directory component of a prune path: nothing deleted, reported;
- an unknown owner is named in the plan; backups left by a cut during the reloads are removed
  by the next apply.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest

from reconciler.engine import apply as apply_mod
from reconciler.engine import transaction as transaction_mod
from reconciler.engine.apply import ApplyResult, apply_host
from reconciler.engine.observe import observe_host
from reconciler.engine.plan import INTERRUPTED, plan_host
from reconciler.host.connection import ConnectionLost, ConnectionPool, SshTarget
from reconciler.kinds.actions import ActionKind, HostPlan
from reconciler.kinds.resources import Desired, Domain, FileResource, Handler, Validator
from reconciler.lab import Lab, LabHostSpec

pytestmark = [pytest.mark.lab, pytest.mark.slow]

HOST = "ps1"
USERS = ("deploy", "app")
KEY = b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDeployDeployDeployDeployDeployDeployDeploy deploy@fleet\n"
CANARY = "# canary-2f6e1c: root's own key file\n"


@pytest.fixture(scope="module")
def lab(lab_factory: Any) -> Iterator[Lab]:
    lab = lab_factory([LabHostSpec(HOST, "192.0.2.71")], lock_timeout=3000)
    try:
        for u in USERS:
            out = sh(lab, f"useradd -m -s /bin/sh {u} && id -u {u}")
            assert out.strip().isdigit(), out
        # the attacks aim at these: root's key file (the lab logs in with it) and /etc/shadow
        sh(lab, f"printf '%s' '{CANARY}' >> /root/.ssh/authorized_keys")
        yield lab
    finally:
        for u in USERS:
            sh(lab, f"pkill -KILL -u {u}; userdel -r {u} 2>/dev/null; true")
        lab.down()


@pytest.fixture(autouse=True)
def fresh_records(lab: Lab) -> None:
    """Each test starts without an inventory or a reload journal of an earlier one (a file an
    earlier test managed would otherwise be pruned, or refused, here)."""
    sh(lab, "rm -f /var/lib/reconciler/inventory.json /var/lib/reconciler/pending-reloads")


def sh(lab: Lab, script: str, timeout: float = 60) -> str:
    res = lab.exec(HOST, ["sh", "-c", script], timeout=timeout)
    return res.stdout.decode(errors="replace") + res.stderr.decode(errors="replace")


def as_user(lab: Lab, user: str, script: str) -> str:
    """Run ``script`` on the host as ``user`` (not root: real uid, gid and groups)."""
    argv = ["env", f"HOME=/home/{user}", "setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups"]
    res = lab.exec(HOST, [*argv, "sh", "-c", script], timeout=60)
    return res.stdout.decode(errors="replace") + res.stderr.decode(errors="replace")


def state(lab: Lab, path: str) -> str:
    """Owner, group, mode and sha256 of a path (the link itself if it is one)."""
    return sh(lab, f"stat -c '%U:%G %a %F' {path}; sha256sum {path} 2>/dev/null | cut -c1-64")


def pool_for(lab: Lab) -> ConnectionPool:
    h = lab.info.hosts[0]
    target = SshTarget(
        host=h.name,
        address=h.address,
        known_hosts=str(lab.info.known_hosts),
        client_keys=(str(lab.info.client_key),),
    )
    return ConnectionPool({h.name: target}, connect_timeout=10)


async def plan_of(pool: ConnectionPool, desired: Desired) -> HostPlan:
    return plan_host(desired, await observe_host(await pool.get(HOST), desired))


def keys_file(*, controlled: bool = True) -> FileResource:
    return FileResource(
        "/home/deploy/.ssh/authorized_keys",
        KEY,
        Domain.FILES,
        mode=0o600,
        owner="deploy",
        group="deploy",
        controlled_dir="/home/deploy" if controlled else None,
        controlled_by="deploy" if controlled else None,
    )


INDEPENDENT = FileResource("/etc/pathsafe-independent.conf", b"independent\n", Domain.FILES)


def outcome(result: ApplyResult, path: str) -> tuple[str, str]:
    o = next(o for o in result.outcomes if o.action.path == path)
    return o.status, o.message


@pytest.mark.parametrize("target", ["/etc/update-motd.d", "/root/.ssh"])
async def test_symlinked_ssh_directory_is_refused(lab: Lab, target: str) -> None:
    before = sh(lab, f"ls -la {target}; sha256sum {target}/* 2>/dev/null")
    root_keys = state(lab, "/root/.ssh/authorized_keys")
    sh(lab, f"rm -f {INDEPENDENT.path}")
    as_user(lab, "deploy", f"rm -rf ~/.ssh; ln -s {target} ~/.ssh")
    assert sh(lab, "readlink /home/deploy/.ssh").strip() == target  # the attack is in place
    desired = Desired(host=HOST, files=(keys_file(), INDEPENDENT))
    async with pool_for(lab) as pool:
        plan = await plan_of(pool, desired)
        refused = [a for a in plan.actions if a.kind is ActionKind.REFUSED]
        assert [a.path for a in refused] == ["/home/deploy/.ssh/authorized_keys"], plan.actions
        assert f"/home/deploy/.ssh is a symlink to {target}" in refused[0].reason
        assert refused[0].diff == ""  # never a diff of the link's target
        assert "canary-2f6e1c" not in json.dumps(plan.as_dict())
        result = await apply_host(pool, HOST, plan, desired)
    assert not result.ok and not result.converged
    status, message = outcome(result, "/home/deploy/.ssh/authorized_keys")
    assert status == "failed" and f"is a symlink to {target}" in message
    assert outcome(result, INDEPENDENT.path)[0] == "done"  # the independent change still applied
    assert sh(lab, f"cat {INDEPENDENT.path}") == "independent\n"
    assert sh(lab, f"ls -la {target}; sha256sum {target}/* 2>/dev/null") == before
    assert state(lab, "/root/.ssh/authorized_keys") == root_keys
    # root can still log in (a fresh connection with the lab's key)
    async with pool_for(lab) as pool:
        res = await (await pool.get(HOST)).run(["id", "-u"])
        assert res.stdout == b"0\n"
    as_user(lab, "deploy", "rm -f ~/.ssh; mkdir -m 700 ~/.ssh")


async def test_a_home_directory_not_declared_as_controlled_is_refused(lab: Lab) -> None:
    uid = sh(lab, "id -u deploy").strip()
    desired = Desired(host=HOST, files=(keys_file(controlled=False),))
    async with pool_for(lab) as pool:
        plan = await plan_of(pool, desired)
    assert [(a.kind, a.reason) for a in plan.actions] == [
        (
            ActionKind.REFUSED,
            f"refused: /home/deploy is writable by uid {uid} (deploy); nothing read or changed through it",
        )
    ]


async def test_declared_home_directory_is_written_through_the_walk(lab: Lab) -> None:
    as_user(lab, "deploy", "rm -rf ~/.ssh")
    desired = Desired(host=HOST, files=(keys_file(),))
    async with pool_for(lab) as pool:
        plan = await plan_of(pool, desired)
        assert [a.kind for a in plan.actions] == [ActionKind.CREATE]
        result = await apply_host(pool, HOST, plan, desired)
        assert result.ok and result.converged, result.messages
        assert (await plan_of(pool, desired)).actions == ()
    assert state(lab, "/home/deploy/.ssh/authorized_keys").startswith("deploy:deploy 600 regular file")
    assert sh(lab, "stat -c '%U %a' /home/deploy/.ssh") == "root 755\n"  # made by the walk


def app_files() -> tuple[FileResource, FileResource]:
    ini = FileResource(
        "/srv/app/app.ini",
        b"[app]\nport = 8080\n",
        Domain.FILES,
        mode=0o640,
        owner="app",
        group="app",
        controlled_dir="/srv/app",
        controlled_by="app",
    )
    # a validator keeps the staged temp on disk for a round trip (staging, validation, swap)
    ini2 = FileResource(
        "/srv/app/app2.ini",
        b"[app2]\n",
        Domain.FILES,
        mode=0o640,
        owner="app",
        group="app",
        validators=(Validator(("grep", "-q", "app2", "{path}")),),
        controlled_dir="/srv/app",
        controlled_by="app",
    )
    return ini, ini2


SHADOW = "/etc/shadow"


def protected(lab: Lab) -> str:
    """What must never change: /etc/shadow, root's keys, and no file outside /srv/app or the
    users' homes owned by them."""
    return (
        state(lab, SHADOW)
        + state(lab, "/root/.ssh/authorized_keys")
        + sh(
            lab, "find /etc /root /srv /var/lib \\( -user app -o -user deploy \\) ! -path '/srv/app*' -print"
        )
    )


def reset_app(lab: Lab) -> None:
    sh(lab, "rm -rf /srv/app && mkdir -p /srv/app && chown app:app /srv/app && chmod 755 /srv/app")


async def with_hook(hook: Callable[[str], Awaitable[None]], desired: Desired, lab: Lab) -> ApplyResult:
    transaction_mod.FAULT_BEFORE_SWAP = hook
    try:
        async with pool_for(lab) as pool:
            plan = await plan_of(pool, desired)
            return await apply_host(pool, HOST, plan, desired)
    finally:
        transaction_mod.FAULT_BEFORE_SWAP = None


async def test_link_swapped_into_the_target_before_a_chown(lab: Lab) -> None:
    reset_app(lab)
    ini, _ = app_files()
    sh(lab, "printf '[app]\\nport = 8080\\n' > /srv/app/app.ini && chmod 640 /srv/app/app.ini")  # root's
    before = protected(lab)

    async def swap_in_link(host: str) -> None:
        as_user(lab, "app", f"ln -s {SHADOW} /srv/app/l && mv -fT /srv/app/l /srv/app/app.ini")

    result = await with_hook(swap_in_link, Desired(host=HOST, files=(ini,)), lab)
    chown = next(o for o in result.outcomes if o.action.kind is ActionKind.CHOWN)
    assert chown.status == "failed" and f"is a symlink now (to {SHADOW}): not changed" in chown.message
    assert not result.ok
    assert protected(lab) == before


async def test_link_swapped_into_the_staged_temp_before_the_swap(lab: Lab) -> None:
    reset_app(lab)
    ini, ini2 = app_files()
    sh(lab, "echo old > /srv/app/app.ini; echo old > /srv/app/app2.ini; chown app:app /srv/app/*.ini")
    before = protected(lab)
    seen: list[str] = []

    async def swap_temps(host: str) -> None:
        seen.append(
            as_user(
                lab,
                "app",
                "for t in /srv/app/.app*.ini.reconciler-*; do "
                f'ln -s {SHADOW} /srv/app/l && mv -fT /srv/app/l "$t" && echo "$t"; done',
            )
        )

    result = await with_hook(swap_temps, Desired(host=HOST, files=(ini, ini2)), lab)
    assert seen and seen[0].count("/srv/app/.app") == 2, seen  # both temps were swapped for links
    for f in (ini, ini2):
        status, message = outcome(result, f.path)
        assert status == "failed" and f"(a symlink to {SHADOW}): not swapped" in message, message
    assert sh(lab, "cat /srv/app/app.ini /srv/app/app2.ini") == "old\nold\n"
    assert sh(lab, "ls -A /srv/app") == "app.ini\napp2.ini\n"  # the planted links were removed
    assert protected(lab) == before


async def test_link_swapped_into_a_parent_before_the_swap(lab: Lab) -> None:
    as_user(lab, "deploy", "rm -rf ~/.ssh ~/.ssh.old; mkdir -m 700 ~/.ssh; echo old > ~/.ssh/authorized_keys")
    before = protected(lab)

    async def swap_parent(host: str) -> None:
        as_user(lab, "deploy", "mv ~/.ssh ~/.ssh.old && ln -s /root/.ssh ~/.ssh")

    result = await with_hook(swap_parent, Desired(host=HOST, files=(keys_file(),)), lab)
    status, message = outcome(result, "/home/deploy/.ssh/authorized_keys")
    assert status == "failed" and "refused: /home/deploy/.ssh is a symlink to /root/.ssh" in message
    assert protected(lab) == before
    as_user(lab, "deploy", "rm -f ~/.ssh; mv ~/.ssh.old ~/.ssh")


# the attacker's loop; the test switches its two attacks on and off with flag files in /tmp
RACE = r"""
i=0; hits=0
while [ ! -e /tmp/race.stop ] && [ $i -lt 5000000 ]; do
  i=$((i+1))
  if [ -e /tmp/race.temps-on ]; then
    for t in /srv/app/.app*.ini.reconciler-*; do
      case $t in *-bak-*|*'*') continue ;; esac
      if ln -s /etc/shadow /srv/app/.race 2>/dev/null && mv -fT /srv/app/.race "$t" 2>/dev/null; then
        hits=$((hits+1)); echo "temp $hits" > /tmp/race.temps
      fi
    done
  fi
  if [ -e /tmp/race.target-on ] && [ $((i % 7)) -eq 0 ] && ln -s /etc/shadow /srv/app/.race 2>/dev/null; then
    mv -fT /srv/app/.race /srv/app/app.ini 2>/dev/null && echo "$i" > /tmp/race.target
  fi
  rm -f /srv/app/.race
done
"""


async def test_racing_user_during_repeated_applies(lab: Lab) -> None:
    """A background loop as ``app`` swaps links to /etc/shadow into the target and into every
    staged temp it sees, starting right after each observation, while the reconciler applies 32
    times: in turn no attack, the target only, the temps only, both. The desired mode, owner
    and content change from one apply to the next, so the plans are creates, updates, chmods
    and chowns (the test itself never writes into /srv/app while the loop runs)."""
    reset_app(lab)
    base_ini, base_ini2 = app_files()
    # the validator keeps app2.ini's staged temp on disk for 50 ms: long enough to be caught
    slow = Validator(("sh", "-c", 'sleep 0.05; grep -q app2 "$1"', "sh", "{path}"))
    before = protected(lab)
    sh(lab, "rm -f /tmp/race.stop /tmp/race.temps /tmp/race.target /tmp/race.*-on")
    lab.exec(HOST, ["sh", "-c", "cat > /tmp/race.sh && chmod 644 /tmp/race.sh"], input=RACE.encode())
    pid = sh(
        lab,
        "setpriv --reuid=app --regid=app --init-groups sh /tmp/race.sh </dev/null >/dev/null 2>&1 & echo $!",
    )
    assert pid.strip().isdigit(), pid
    kinds: dict[str, int] = {}
    quiet: list[ApplyResult] = []
    failed: list[str] = []
    try:
        async with pool_for(lab) as pool:
            for n in range(32):
                attack = n % 4  # 0: none, 1: the target, 2: the temps, 3: both
                owner = "app" if n % 3 else "root"
                ini = replace(base_ini, mode=0o640 if n % 2 else 0o600, owner=owner, group=owner)
                ini2 = replace(base_ini2, content=f"[app2]\nround = {n}\n".encode(), validators=(slow,))
                desired = Desired(host=HOST, files=(ini, ini2))
                sh(lab, "rm -f /tmp/race.*-on")
                plan = await plan_of(pool, desired)
                for a in plan.actions:
                    kinds[f"{a.kind} {a.path}"] = kinds.get(f"{a.kind} {a.path}", 0) + 1
                # the attack starts after the observation: it races the apply
                if attack in (1, 3):
                    sh(lab, "touch /tmp/race.target-on")
                if attack in (2, 3):
                    sh(lab, "touch /tmp/race.temps-on")
                result = await apply_host(pool, HOST, plan, desired)
                assert not result.ok or result.converged
                failed += [o.message for o in result.outcomes if o.status == "failed"]
                if attack == 0:
                    quiet.append(result)
                assert protected(lab) == before, f"apply {n}"
    finally:
        sh(
            lab,
            f"touch /tmp/race.stop; sleep 0.5; kill -9 {pid.strip()} 2>/dev/null; rm -f /tmp/race.*-on; true",
        )
    temps = sh(lab, "cat /tmp/race.temps 2>/dev/null || echo 'temp 0'")
    print(f"race: {temps.strip()} temps swapped for links; plans {kinds}; {len(failed)} failed at apply time")
    # positive evidence that the attacker really raced (links in the target and in staged temps,
    # met by the plans and by the apply), and that without the attack the applies converge
    assert sh(lab, "cat /tmp/race.target").strip().isdigit()
    assert int(temps.split()[1]) > 0, "the loop never caught a staged temp"
    assert kinds.get("update /srv/app/app.ini", 0) > 0, kinds
    assert kinds.get("chmod /srv/app/app.ini", 0) + kinds.get("chown /srv/app/app.ini", 0) > 0, kinds
    assert any("replaced" in m for m in failed) and any("symlink" in m for m in failed), failed
    assert sum(1 for r in quiet if r.ok) >= len(quiet) // 2, [r.messages for r in quiet]
    assert protected(lab) == before


async def test_prune_through_a_symlinked_directory_deletes_nothing(lab: Lab) -> None:
    sh(lab, "rm -rf /etc/prunetest /etc/prunecanary; mkdir -p /etc/prunetest/conf.d /etc/prunecanary")
    old = FileResource("/etc/prunetest/conf.d/old.conf", b"old\n", Domain.FILES)
    async with pool_for(lab) as pool:
        d1 = Desired(host=HOST, files=(old, INDEPENDENT))
        assert (await apply_host(pool, HOST, await plan_of(pool, d1), d1)).ok
        # the directory is swapped for a link (to a directory with a file of the same name)
        sh(
            lab,
            "echo canary > /etc/prunecanary/old.conf; rm -rf /etc/prunetest/conf.d; "
            "ln -s /etc/prunecanary /etc/prunetest/conf.d",
        )
        d2 = Desired(host=HOST, files=(INDEPENDENT,))
        plan = await plan_of(pool, d2)
        assert [(a.kind, a.path) for a in plan.actions] == [(ActionKind.REFUSED, old.path)]
        assert "not deleted: /etc/prunetest/conf.d is a symlink to /etc/prunecanary" in plan.actions[0].reason
        result = await apply_host(pool, HOST, plan, d2)
    assert not result.ok and outcome(result, old.path)[0] == "failed"
    assert sh(lab, "cat /etc/prunecanary/old.conf") == "canary\n"
    # the inventory still lists it: the refusal is shown again until the link is gone
    assert old.path in sh(lab, "cat /var/lib/reconciler/inventory.json")


async def test_unknown_owner_is_named_in_the_plan(lab: Lab) -> None:
    bad = FileResource("/etc/pathsafe-owner.conf", b"x\n", Domain.FILES, owner="nosuchuser")
    sh(lab, f"rm -f {bad.path} {INDEPENDENT.path}")
    desired = Desired(host=HOST, files=(bad, INDEPENDENT))
    async with pool_for(lab) as pool:
        plan = await plan_of(pool, desired)
        refused = [a for a in plan.actions if a.kind is ActionKind.REFUSED]
        assert [a.reason for a in refused] == [
            "no user nosuchuser on this host (owner nosuchuser:root); nothing changed"
        ]
        result = await apply_host(pool, HOST, plan, desired)
    assert outcome(result, bad.path) == ("failed", refused[0].reason)
    assert outcome(result, INDEPENDENT.path)[0] == "done"
    assert sh(lab, f"test -e {bad.path} && echo there || echo absent") == "absent\n"


async def test_backups_left_by_a_cut_before_the_reload_are_removed_by_the_next_apply(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    sh(lab, "rm -rf /etc/bapp && mkdir /etc/bapp && echo v1 > /etc/bapp/app.conf")
    conf = FileResource("/etc/bapp/app.conf", b"v2\n", Domain.FILES, handler="bapp")
    desired = Desired(host=HOST, files=(conf,), handlers=(Handler("bapp", reload=("true",)),))

    async def cut(host: str) -> None:
        lab.exec(host, ["sh", "-c", "for p in $(pgrep -f 'sshd: root'); do kill -9 $p; done"])
        raise ConnectionLost(f"host {host}: connection lost (SSH session killed by the test)")

    monkeypatch.setattr(apply_mod, "FAULT_AFTER_SWAP", cut)
    async with pool_for(lab) as pool:
        await apply_host(pool, HOST, await plan_of(pool, desired), desired, verify=False)
    monkeypatch.setattr(apply_mod, "FAULT_AFTER_SWAP", None)
    left = sh(lab, "ls -A /etc/bapp")
    assert ".app.conf.reconciler-bak-" in left  # the interrupted apply's backup (old content)
    time.sleep(0.2)
    async with pool_for(lab) as pool:
        plan = await plan_of(pool, desired)
        assert [(a.kind, a.reason) for a in plan.actions] == [(ActionKind.RELOAD, INTERRUPTED)]
        result = await apply_host(pool, HOST, plan, desired)
    assert result.ok and result.converged, result.messages
    assert sh(lab, "ls -A /etc/bapp") == "app.conf\n"
