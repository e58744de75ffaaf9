#!/usr/bin/env python3
"""The main job on the local default: the example fleet, converged on local lab hosts by the
reconciler daemon, a git push converging, a hand edit mailed as drift.

Steps (each printed as it runs):
  1. a bare "remote" fleet repo made from fleet-repo-example (mesh switched to tunnel +
     libipsec, which this kernel can run) and an admin's clone of it
  2. one lab host per fleet host (`reconciler lab up --fleet`), an SMTP sink (aiosmtpd)
  3. first converge (`reconciler apply`): firewall, key pairs made on the hosts, Apache...;
     `reconciler keys collect` brings the public keys into the repo; commit + push
  4. `reconciler run` (the daemon) on the bare remote; wait until every host is Ready
  5. `reconciler verify`: the mesh really carries encrypted traffic
  6. a change pushed + a signed webhook: time until every host runs the new commit
  7. /etc/hosts edited by hand on web1: a drift commit and a mail in the sink
At the end the daemon is stopped and the lab removed (DEMO_KEEP_LAB=1 keeps it up).

DEMO_VM=1: the same demo on QEMU guests with a Debian 12 kernel (`reconciler lab up --vm`), with
the fleet exactly as shipped: IP-IP tunnels inside transport-mode kernel ESP (the lab's own
kernel has neither). Slower: the guests are emulated (docs/LAB.md).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import mailbox
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = Path(os.environ.get("DEMO_DIR", "/tmp/reconciler-demo"))
HTTP_PORT = int(os.environ.get("DEMO_HTTP_PORT", "8780"))
SMTP_PORT = int(os.environ.get("DEMO_SMTP_PORT", "8025"))
SECRET = "demo-webhook-secret"  # a demo value, not a real secret
SYNC_TOKEN = "demo-sync-token"  # a demo value, not a real secret
VM = os.environ.get("DEMO_VM", "") == "1"
SLOW = 5 if VM else 1  # emulated guests: every wait is longer
GIT_ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "Demo Admin",
    "GIT_AUTHOR_EMAIL": "admin@example.com",
    "GIT_COMMITTER_NAME": "Demo Admin",
    "GIT_COMMITTER_EMAIL": "admin@example.com",
    "GIT_CONFIG_GLOBAL": "/dev/null",
}


def step(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m" if sys.stdout.isatty() else f"\n==> {text}", flush=True)


def run(*argv: str | Path, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    args = [str(a) for a in argv]
    print("$ " + " ".join(args), flush=True)
    proc = subprocess.run(args, cwd=cwd, env=GIT_ENV, text=True, check=False)
    if check and proc.returncode != 0:
        sys.exit(f"demo: `{' '.join(args)}` failed with exit {proc.returncode}")
    return proc


def git(*argv: str, cwd: Path) -> str:
    return subprocess.run(
        ["git", *argv], cwd=cwd, env=GIT_ENV, text=True, check=True, capture_output=True
    ).stdout.strip()


def http_json(path: str) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{HTTP_PORT}{path}", timeout=5) as resp:  # noqa: S310
        return json.loads(resp.read())  # type: ignore[no-any-return]


def wait_for(what: str, probe, timeout: float) -> float:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if probe():
                return time.monotonic() - start
        except OSError:
            pass
        time.sleep(0.2)
    sys.exit(f"demo: timed out after {timeout:.0f} s waiting for {what}")


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def make_fleet_repos() -> tuple[Path, Path]:
    src = WORK / "fleet-checkout"
    remote = WORK / "fleet.git"
    shutil.copytree(ROOT / "fleet-repo-example", src)
    fleet_yaml = src / "fleet.yaml"
    text = fleet_yaml.read_text()
    if not VM:
        # This kernel has no IP-IP and no kernel ESP: the lab runs the mesh as tunnel-mode IPsec
        # with strongSwan's userspace ESP (libipsec). Everything else is the example as shipped.
        # (DEMO_VM=1: QEMU guests have a kernel with both; the fleet stays as shipped.)
        text = text.replace("mode: ipip ", "mode: tunnel ").replace("datapath: kernel", "datapath: libipsec")
    text = text.replace("port: 8025", f"port: {SMTP_PORT}")
    fleet_yaml.write_text(text)
    git("init", "-q", "-b", "main", cwd=src)
    git("add", "-A", cwd=src)
    what = "as shipped (ipip + kernel ESP), on VMs" if VM else "lab variant (tunnel + libipsec)"
    git("commit", "-q", "-m", f"example fleet, {what}", cwd=src)
    run("git", "clone", "-q", "--bare", src, remote)
    git("remote", "add", "origin", str(remote), cwd=src)
    git("fetch", "-q", "origin", cwd=src)
    git("branch", "-q", "--set-upstream-to=origin/main", "main", cwd=src)
    return src, remote


def push(src: Path, message: str) -> str:
    git("add", "-A", cwd=src)
    git("commit", "-q", "-m", message, cwd=src)
    git("push", "-q", "origin", "main", cwd=src)
    return git("rev-parse", "HEAD", cwd=src)


def signed_webhook() -> int:
    body = json.dumps({"ref": "refs/heads/main"}).encode()
    sig = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    req = urllib.request.Request(  # noqa: S310
        f"http://127.0.0.1:{HTTP_PORT}/hooks/github",
        data=body,
        headers={
            "Content-Type": "application/json",
            "X-Hub-Signature-256": sig,
            "X-GitHub-Event": "push",
            "X-GitHub-Delivery": f"demo-{time.time_ns()}",
        },
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310
        return resp.status


def all_hosts_on(commit: str, hosts: list[str]) -> bool:
    status = http_json("/status")
    by_name = {h["name"]: h for h in status.get("hosts", [])}  # type: ignore[union-attr]
    return all(
        by_name.get(h, {}).get("state") == "Ready" and by_name.get(h, {}).get("applied_commit") == commit
        for h in hosts
    )


def mails(maildir: Path) -> list[mailbox.MaildirMessage]:
    if not (maildir / "new").exists():
        return []
    return list(mailbox.Maildir(maildir, create=False))


def main() -> int:
    if os.geteuid() != 0:
        sys.exit("demo: run as root (the lab uses network and mount namespaces)")
    for port in (HTTP_PORT, SMTP_PORT):
        if not port_free(port):
            sys.exit(f"demo: port {port} on 127.0.0.1 is taken (set DEMO_HTTP_PORT / DEMO_SMTP_PORT)")
    step(f"fresh demo directory {WORK}; an earlier demo's lab is removed")
    run("reconciler", "lab", "down", check=False)
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True, mode=0o700)

    step("the fleet repo: a bare remote and the admin's checkout")
    src, remote = make_fleet_repos()
    run("reconciler", "validate", src)

    if VM:
        step("lab hosts for the fleet: QEMU guests, each with its own Debian 12 kernel and systemd")
        run("reconciler", "lab", "up", "--vm", "--fleet", src)
    else:
        step("lab hosts for the fleet (network namespaces, each with its own sshd and /etc)")
        run("reconciler", "lab", "up", "--fleet", src)
    lab = json.loads(
        subprocess.run(
            ["reconciler", "lab", "status", "--json"], capture_output=True, text=True, check=True
        ).stdout
    )["current"]
    known_hosts, identity = lab["known_hosts"], lab["client_key"]
    hosts = [h["name"] for h in lab["hosts"]]

    step(f"an SMTP sink on 127.0.0.1:{SMTP_PORT} (aiosmtpd) delivering to {WORK / 'mail'}")
    maildir = WORK / "mail"
    smtp = subprocess.Popen(  # noqa: S603
        [
            sys.executable,
            "-m",
            "aiosmtpd",
            "-n",
            "-l",
            f"127.0.0.1:{SMTP_PORT}",
            "-c",
            "aiosmtpd.handlers.Mailbox",
            str(maildir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    daemon: subprocess.Popen[bytes] | None = None
    try:
        wait_for("the SMTP sink", lambda: not port_free(SMTP_PORT), 15)

        step("first converge: firewall, key pairs made on each host, Apache, AppArmor, files")
        # emulated guests: the firewall confirmation (a NEW SSH connection) takes seconds
        run("reconciler", "apply", src, "--lab", "--yes", *(["--firewall-window", "60"] if VM else []))
        step("collect the hosts' public keys into the fleet repo, then push")
        run("reconciler", "keys", "collect", src, "--lab")
        keyed = push(src, "keys: public keys collected from the hosts")
        print(f"pushed {keyed[:12]}")

        step("start the daemon on the bare remote (webhooks, polling, drift schedule)")
        config = WORK / "reconciler.yaml"
        config.write_text(
            "source:\n"
            f"  url: file://{remote}\n"
            "  branch: main\n"
            "  poll_interval: 30s\n"
            "server:\n"
            "  listen: 127.0.0.1\n"
            f"  port: {HTTP_PORT}\n"
            "ssh:\n"
            f"  known_hosts: {known_hosts}\n"
            f"  identity: [{identity}]\n"
            + (f"  netns: {lab['ssh_netns']}\n" if lab.get("ssh_netns") else "")
            + f"state_dir: {WORK / 'state'}\n"
            # emulated guests: a drift scan takes ~10 s each; scanning every 10 s would keep
            # the hosts Reconciling (never Ready) most of the time
            f"drift_interval: {'60s' if VM else '10s'}\n"
        )
        env = {
            **os.environ,
            "RECONCILER_SERVER_WEBHOOK_SECRET": SECRET,
            "RECONCILER_SERVER_SYNC_TOKEN": SYNC_TOKEN,
            "RECONCILER_LOG_JSON": "1",
        }
        log = (WORK / "daemon.log").open("wb")
        daemon = subprocess.Popen(
            ["reconciler", "run", "--config", str(config)],  # noqa: S603,S607
            env=env,
            stdout=log,
            stderr=log,
        )
        took = wait_for("every host Ready on the pushed commit", lambda: all_hosts_on(keyed, hosts), 300 * SLOW)
        print(f"every host converged on {keyed[:12]} in {took:.1f} s (mesh with peer keys)")

        step("prove the mesh: reconciler verify (IKE/child SAs, ping over the mesh, capture shows ESP)")
        # The pairs come up as each side loads its peers' keys; a pair whose first attempt
        # met a peer that had not loaded yet is started again by the daemon's next reconcile.
        def mesh_ok() -> bool:
            proc = subprocess.run(["reconciler", "verify", str(src), "--lab", "--json"],  # noqa: S603,S607
                                  capture_output=True, check=False)
            return proc.returncode == 0
        took = wait_for("reconciler verify to pass on every pair", mesh_ok, 120 * SLOW)
        print(f"mesh verified after {took:.1f} s more")
        run("reconciler", "verify", src, "--lab")

        step("a push: change the motd template, push, send a signed GitHub webhook")
        motd = src / "templates" / "motd.j2"
        motd.write_text(motd.read_text() + "Demo change pushed at step 6.\n")
        t0 = time.monotonic()
        changed = push(src, "motd: say hello from the demo")
        print(f"webhook answered {signed_webhook()}")
        wait_for("every host on the new commit", lambda: all_hosts_on(changed, hosts), 120 * SLOW)
        print(f"push-to-converged: {time.monotonic() - t0:.2f} s for {len(hosts)} hosts")

        step("a hand edit on web1 (/etc/hosts): the drift scan commits it and mails the diff")
        before = len(mails(maildir))
        subprocess.run(
            [
                "reconciler",
                "lab",
                "exec",
                "web1",
                "--",
                "sh",
                "-c",
                "echo '10.99.0.99 added-by-hand' >> /etc/hosts",
            ],
            check=True,
        )
        wait_for("a drift mail", lambda: len(mails(maildir)) > before, 120 * SLOW)
        msg = mails(maildir)[-1]
        print(f"mail: {msg['Subject']}")
        body = (
            msg.get_payload(decode=True)
            if not msg.is_multipart()
            else msg.get_payload(0).get_payload(decode=True)
        )
        print("\n".join(body.decode(errors="replace").splitlines()[:25]))

        step("status")
        print(json.dumps(http_json("/status").get("hosts"), indent=1)[:3000])
        print(
            f"\nDone. Status page was http://127.0.0.1:{HTTP_PORT}/ ; mail in {maildir};"
            f" history repo in {WORK / 'state' / 'history'}."
        )
        return 0
    finally:
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=40)
            except subprocess.TimeoutExpired:
                daemon.kill()
        smtp.terminate()
        smtp.wait(timeout=10)
        if os.environ.get("DEMO_KEEP_LAB") == "1":
            print("The lab hosts are still up (DEMO_KEEP_LAB=1): `reconciler lab status`, `reconciler lab down`.")
        else:
            # the lab owns 192.0.2.0/24 while up: free it for tests and other labs
            run("reconciler", "lab", "down", check=False)


if __name__ == "__main__":
    sys.exit(main())
