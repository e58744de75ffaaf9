"""Commit signatures of the fleet repo: the allowed-signers file checked line by line, the
private OpenPGP keyring, and one commit's verdict (``git verify-commit``: GitPython has no
signature verification)."""

from __future__ import annotations

import asyncio
import base64
import shlex
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from reconciler.daemon.config import SourceConfig, VerifyMode
from reconciler.errors import Terminal
from reconciler.gitrepo import GitRepo, UnreadableObject, first_line

SSH_SIG_BEGIN = "-----BEGIN SSH SIGNATURE-----"
PGP_SIG_BEGIN = "-----BEGIN PGP SIGNATURE-----"
SSH_KEY_TYPES = frozenset(
    {
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    }
)


class SourceConfigError(Terminal):
    """The verification setup itself is wrong (e.g. a malformed allowed-signers file)."""


@dataclass(frozen=True)
class Verdict:
    ok: bool
    kind: str = ""
    reason: str = ""


def check_allowed_signers(path: Path) -> int:
    """Parse an OpenSSH allowed-signers file; returns how many keys it holds.

    Raises ``SourceConfigError`` (naming the file and line) for a malformed line, an unknown key
    type, a key blob that is not base64, or a blob whose embedded type differs from the type
    written before it (the "key type mismatch" case).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        raise SourceConfigError(f"{path}: cannot read the allowed-signers file") from None
    keys = 0
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            tokens = shlex.split(line, comments=False, posix=True)
        except ValueError:
            raise SourceConfigError(f"{path}:{lineno}: unbalanced quotes") from None
        idx = next((i for i, t in enumerate(tokens) if t in SSH_KEY_TYPES), None)
        if idx is None or idx == 0 or idx + 1 >= len(tokens):
            raise SourceConfigError(f"{path}:{lineno}: expected 'PRINCIPALS [OPTIONS] KEYTYPE BASE64KEY'")
        keytype, blob = tokens[idx], tokens[idx + 1]
        try:
            data = base64.b64decode(blob, validate=True)
            n = int.from_bytes(data[:4], "big")
            embedded = data[4 : 4 + n].decode("ascii")
        except (ValueError, UnicodeDecodeError):
            raise SourceConfigError(f"{path}:{lineno}: the key is not valid base64") from None
        if embedded != keytype:
            raise SourceConfigError(
                f"{path}:{lineno}: key type mismatch: line says {keytype}, key is {embedded}"
            )
        keys += 1
    if keys == 0:
        raise SourceConfigError(f"{path}: no keys in the allowed-signers file")
    return keys


async def build_keyring(keys_path: Path, home: Path, base_env: Mapping[str, str]) -> None:
    """A private GnuPG home holding exactly the allowed OpenPGP keys, each trusted fully."""
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(mode=0o700, parents=True)
    env = {**base_env, "GNUPGHOME": str(home)}
    try:
        keys = keys_path.read_bytes()
    except OSError:
        raise SourceConfigError(f"{keys_path}: cannot read the OpenPGP keys") from None
    proc = await asyncio.create_subprocess_exec(
        "gpg", "--batch", "--quiet", "--import", env=env,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate(keys)
    if proc.returncode != 0:
        raise SourceConfigError(f"{keys_path}: gpg cannot import: {first_line(err)}")
    proc = await asyncio.create_subprocess_exec(
        "gpg", "--batch", "--with-colons", "--list-keys", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    out, _ = await proc.communicate()
    fprs: list[str] = []
    primary = False
    for line in out.decode().splitlines():
        parts = line.split(":")
        if parts[0] == "pub":
            primary = True
        elif parts[0] == "fpr" and primary:
            fprs.append(parts[9])
            primary = False
    if not fprs:
        raise SourceConfigError(f"{keys_path}: no OpenPGP public keys found")
    trust = "".join(f"{f}:6:\n" for f in fprs).encode()
    proc = await asyncio.create_subprocess_exec(
        "gpg", "--batch", "--quiet", "--import-ownertrust", env=env,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    await proc.communicate(trust)


async def verify_signature(git: GitRepo, commit: str, config_: SourceConfig, gnupg_home: Path) -> Verdict:
    """Whether ``commit`` carries a good signature of the kind and from a key the source allows."""
    short = commit[:12]
    try:
        signature = (await git.commit(commit)).signature.lstrip()
    except UnreadableObject:
        return Verdict(False, "bad-signature", f"commit {short} cannot be parsed")
    sig_kind = ""
    if signature:
        sig_kind = (
            "ssh"
            if signature.startswith(SSH_SIG_BEGIN)
            else "openpgp"
            if signature.startswith(PGP_SIG_BEGIN)
            else "x509"
        )
    if not sig_kind:
        return Verdict(False, "unsigned", f"commit {short} is not signed")
    mode = config_.verify
    if sig_kind != mode.value:
        return Verdict(
            False,
            "wrong-signature-kind",
            f"commit {short} has an {sig_kind} signature; {mode.value} is required",
        )
    config: list[tuple[str, str]] = [("gpg.minTrustLevel", "fully")]
    env = {"GNUPGHOME": str(gnupg_home)}
    if mode is VerifyMode.SSH:
        assert config_.allowed_signers is not None
        config.append(("gpg.ssh.allowedSignersFile", str(config_.allowed_signers)))
    res = await git.run(["verify-commit", "--raw", commit], config=config, env=env, timeout=30)
    if res.code == 0:
        return Verdict(True)
    text = res.stderr.decode("utf-8", "replace")
    if "No principal matched" in text or "[GNUPG:] NO_PUBKEY" in text or "TRUST_UNDEFINED" in text:
        return Verdict(False, "untrusted-key", f"commit {short} is signed by a key that is not allowed")
    return Verdict(False, "bad-signature", f"commit {short} has a signature that does not verify")
