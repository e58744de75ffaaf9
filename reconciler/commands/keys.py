"""`reconciler keys collect [REPO] [--host NAME ...]`: read each host's PUBLIC key back.

Key pairs are made on the hosts by `reconciler apply` (the private key never leaves its host).
This command reads each host's public key file (``KeyPair.public_path``, the first key pair the
host renders) over SSH and writes it to the fleet repo as ``keys/<host>.pub`` (atomically). It
does not commit: review the change with ``git diff keys/`` and commit it yourself (signed, as
every fleet commit), so a public key enters the fleet only through the normal review path.
A file that looks like a private key is refused and never written. The same round trip reads
the host's identity (/etc/reconciler/identity): a host that is not this fleet's host of that
name (another fleet's, or never applied) is refused, so a wrong address never brings another
fleet's key into this one.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

from reconciler.commands import Subcommands
from reconciler.commands.plan import Reach, add_connection_args, load, make_pool, reach_from_args
from reconciler.engine.identity import IDENTITY_PATH, SeenIdentity, Verdict, claim_for, judge, parse_section
from reconciler.errors import FleetInvalid, ReconcilerError
from reconciler.fleet.keys import KeyFileError, parse_public_key
from reconciler.fleet.model import Fleet
from reconciler.host.script import Pool, Runner
from reconciler.kinds.resources import Desired

MAX_KEY_BYTES = 16 * 1024


def register(sub: Subcommands) -> None:
    p = sub.add_parser("keys", help="manage the hosts' IPsec public keys")
    ksub = p.add_subparsers(dest="keys_command", metavar="ACTION")
    ksub.required = True
    c = ksub.add_parser("collect", help="read each host's public key into keys/<host>.pub (no commit)")
    add_connection_args(c)
    c.set_defaults(func=run)


_PRIVATE_MARKS = (b"PRIVATE KEY", b"PRIVATEEXPONENT", b"PRIVATE-LINES", b": RSA")


def check_public_key(text: bytes) -> str | None:
    """Why ``text`` is not acceptable as a public key file (None when it is): only a file that
    parses as a public key (``parse_public_key``: one PEM ``PUBLIC KEY`` block or one racoon
    ``: PUB 0s...`` line) is accepted, and anything that looks like private key material
    (PEM/OpenSSH/PuTTY private keys, racoon's ``: RSA {...}`` block), in any case, is refused
    by name even where it would also fail to parse."""
    if not text.strip():
        return "empty"
    if len(text) > MAX_KEY_BYTES:
        return f"larger than {MAX_KEY_BYTES} bytes"
    upper = text.upper()
    if any(mark in upper for mark in _PRIVATE_MARKS):
        return "looks like a PRIVATE key: refused (private keys never leave the host)"
    try:
        text.decode("ascii")
    except UnicodeDecodeError:
        return "not ASCII text"
    try:
        parse_public_key(text)
    except KeyFileError as err:
        return f"not a public key: {err}"
    return None


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


async def read_key(conn: Runner, path: str) -> tuple[SeenIdentity | None, bytes | None, str]:
    """One round trip: the host's identity and the public key file (a regular file, never
    through a symlink). (identity, key or None, why the key could not be read)."""
    from reconciler.engine.observe import PRELUDE
    from reconciler.host.script import ScriptBuilder, run_framed

    b = ScriptBuilder()
    b.add(f"frame identity ident {b.ref(IDENTITY_PATH)}")
    b.add(f"frame key file_head {b.ref(path)} {MAX_KEY_BYTES + 1}")
    sections = (await run_framed(conn, b.script(PRELUDE), b.args, timeout=30)).sections
    ident = sections.get("identity")
    seen = parse_section(ident.body) if ident is not None and ident.exit_status == 0 else None
    key = sections.get("key")
    if key is None or key.exit_status != 0:
        why = (key.stderr if key is not None else "") or "missing, or not a regular file"
        return seen, None, why
    return seen, key.body, ""


async def collect(fleet: Fleet, hosts: list[str], pool: Pool, repo: Path) -> list[tuple[str, str, bool]]:
    """(host, message, ok) per host; writes keys/<host>.pub for each key read."""
    from reconciler.domains.bounded_render import RenderRejected, render_bounded
    from reconciler.domains.render_limits import RenderLimits
    from reconciler.engine.fleet import select_hosts

    rendered = await render_bounded(fleet, select_hosts(fleet, hosts), RenderLimits())  # out of process

    async def one(name: str) -> tuple[str, str, bool]:
        desired = rendered.reason if isinstance(rendered, RenderRejected) else rendered[name]
        if not isinstance(desired, Desired):
            return name, f"render: {desired}", False
        if not desired.keypairs:
            return name, "no key pair for this host (no IPsec peers): nothing to collect", True
        kp = desired.keypairs[0]
        try:
            conn = await pool.get(name)
            seen, key, err_text = await read_key(conn, kp.public_path)
        except ReconcilerError as err:
            return name, str(err), False
        verdict = judge(claim_for(fleet, name), seen, adopt=False)
        if verdict.verdict is Verdict.FIRST:
            return name, "no identity on the host yet: run `reconciler apply` first", False
        if verdict.verdict is not Verdict.MATCH:
            return name, f"refused: {verdict.message.replace('; use --adopt', '; apply with --adopt')}", False
        if key is None:
            return name, f"cannot read {kp.public_path} ({err_text}); run `reconciler apply` first", False
        problem = check_public_key(key)
        if problem:
            return name, f"{kp.public_path}: {problem}", False
        dest = repo / "keys" / f"{name}.pub"
        if dest.exists() and dest.read_bytes() == key:
            return name, f"keys/{name}.pub unchanged", True
        write_atomic(dest, key)
        return name, f"wrote keys/{name}.pub from {kp.public_path}", True

    names = select_hosts(fleet, hosts)
    return list(await asyncio.gather(*(one(n) for n in names)))


def run(args: argparse.Namespace) -> int:
    try:
        fleet = load(args.repo)
        reach: Reach = reach_from_args(args, fleet)
    except FleetInvalid as err:
        print(f"fleet {args.repo} does not validate:\n{err}", file=sys.stderr)
        return 1
    except ReconcilerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

    async def main() -> list[tuple[str, str, bool]]:
        async with make_pool(fleet, reach, args) as pool:
            return await collect(fleet, args.host, pool, Path(args.repo))

    try:
        results = asyncio.run(main())
    except ReconcilerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    ok = True
    for host, message, good in results:
        print(f"{host}: {message}")
        ok = ok and good
    wrote = [h for h, m, g in results if m.startswith("wrote")]
    if wrote:
        print(
            f"\nReview and commit: git -C {args.repo} diff -- keys/ && git -C {args.repo} commit -S -- keys/"
        )
    return 0 if ok else 1
