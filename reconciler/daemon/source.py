"""The fleet repo: fetch into a private mirror, verify signatures, pick the newest good commit.

- The repo is fetched (``file://``, ``ssh://``/``user@host:path``, ``https://``) with the git
  CLI, argv lists only, into a bare mirror under the state directory; a work tree the user owns
  is never touched. git runs with the user's global and system config ignored, so nothing there
  (an allowed-signers file, a credential helper, hooks) changes what we trust.
- Signature verification (optional): every commit reachable from the branch head but not from
  the last good commit (nor from ``source.signed_after``) must carry a good signature from an
  allowed key. SSH signatures are checked with ``git verify-commit`` against
  ``gpg.ssh.allowedSignersFile`` and ``gpg.minTrustLevel=fully``; OpenPGP signatures against a
  private keyring built from ``source.openpgp_keys``. The signature kind must match the mode
  (an OpenPGP-signed commit never passes in SSH mode and vice versa).
- Trust only moves forward: a new good commit must descend from the current good one (the
  applied commit, persisted as ``refs/reconciler/good``). A head that does not (a force-push
  back to an older signed commit, a rewritten history, an unsigned commit on top of an old
  one) is refused as ``rollback``, whatever its signatures. Going back is either a revert
  commit (a descendant, so just forward) or an explicit ``rollback()`` by an admin
  (``reconciler sync --allow-rollback COMMIT``): the commit must be on the fetched branch and
  verify like any new commit; who asked and when is recorded by the daemon.
- The newest good commit is the newest commit on the head's first-parent chain that descends
  from the good commit and whose whole new history verified. An unsigned or wrongly signed head
  is never used: the last good commit stays, and the refusal (commit, kind, reason) is reported
  once per commit and not evaluated again while the good commit stays.
- The fleet at a commit is read with ``git archive`` (size capped) and given to the loader, then
  to the optional ``vet`` hook (the daemon renders every host there, under limits); only a
  commit that loads and passes it becomes good.
"""

from __future__ import annotations

import asyncio
import re
import shlex
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from reconciler.daemon.config import SourceConfig, VerifyMode
from reconciler.daemon.signatures import SourceConfigError as SourceConfigError
from reconciler.daemon.signatures import Verdict as Verdict
from reconciler.daemon.signatures import build_keyring, verify_signature
from reconciler.daemon.signatures import check_allowed_signers as check_allowed_signers
from reconciler.daemon.source_types import (
    Refusal,
    Rejection,
    Rollback,
    RollbackRefused,
    SourceError,
    SourceState,
    SourceTrustError,
    Vet,
)
from reconciler.daemon.tree import files_from_tar
from reconciler.errors import FleetInvalid, Problem
from reconciler.fleet.load import load_fleet_files
from reconciler.fleet.model import Fleet
from reconciler.gitrepo import (
    GitRepo,
    OutputTooLarge,
    first_line,
    init_bare,
    isolated_env,
    redact_url,
)
from reconciler.log import get_logger

log = get_logger(__name__)

GOOD_REF = "refs/reconciler/good"
MAX_ARCHIVE_BYTES = 64 << 20
MAX_VERIFY = 2000  # commits verified in one refresh at most
FleetLoader = Callable[[Mapping[str, bytes]], Fleet]
_HEX = re.compile(r"^[0-9a-f]{7,64}$")


_COMMIT_ID = re.compile(r"^[0-9a-f]{7,64}$")


# ---------------------------------------------------------------- the source


def default_loader(files: Mapping[str, bytes]) -> Fleet:
    """Load the fleet with reconciler.fleet.load, in memory."""
    return load_fleet_files(files)


class FleetSource:
    """Fetches the fleet repo and keeps the newest good commit and its loaded fleet."""

    def __init__(
        self,
        config: SourceConfig,
        mirror_dir: Path,
        *,
        loader: FleetLoader = default_loader,
        last_good: str = "",
        vet: Vet | None = None,
    ) -> None:
        self.config = config
        self.mirror_dir = mirror_dir
        self._loader = loader
        self._vet = vet
        self._git = GitRepo(mirror_dir, env=isolated_env(self._transport_env()), error=SourceError)
        self._verified: dict[str, Verdict] = {}
        self._refused: dict[str, tuple[str, Rejection]] = {}  # head -> (good then, why refused)
        self._invalid: dict[str, Refusal] = {}  # commit -> why it cannot be used (load, vet)
        self._good = last_good
        self._fleet: Fleet | None = None
        self._head = ""
        self._last_rejection: Rejection | None = None
        self._gnupg_home = mirror_dir.parent / (mirror_dir.name + ".gnupg")
        self._lock = asyncio.Lock()
        self._prepared = False

    # ------------------------------------------------------------ set-up

    def _transport_env(self) -> dict[str, str]:
        cfg = self.config
        argv = ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=15"]
        if cfg.ssh_known_hosts is not None:
            argv += ["-o", f"UserKnownHostsFile={cfg.ssh_known_hosts}"]
        if cfg.ssh_key is not None:
            argv += ["-o", "IdentitiesOnly=yes", "-i", str(cfg.ssh_key)]
        return {"GIT_SSH_COMMAND": " ".join(shlex.quote(a) for a in argv), "GIT_SSH_VARIANT": "ssh"}

    async def prepare(self) -> None:
        """``setup()``, then load (and vet) the last good commit if there is one."""
        await self.setup()
        async with self._lock:
            await self._load_good()

    async def _load_good(self) -> None:
        good = self._good
        if not good or self._fleet is not None or good in self._invalid:
            return
        if not await self._git.exists(good):
            return  # not fetched yet (a new mirror): loaded once the fetch brings it
        refusal = await self._usable(good)
        if refusal is None:
            return
        # The last good commit must stay usable; say so loudly. It stays the floor of trust.
        log.error(
            "the last good commit cannot be used", commit=good, kind=refusal.kind, reason=refusal.reason
        )
        rejection = Rejection(good, refusal.kind, refusal.reason, good)
        self._refused[good] = (good, rejection)
        self._last_rejection = rejection

    async def setup(self) -> None:
        """Create the mirror, check the verification setup, read the last good commit (cheap:
        configuration errors surface here, before the daemon serves anything)."""
        if self._prepared:
            return
        self.mirror_dir.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not (self.mirror_dir / "HEAD").exists():
            await asyncio.to_thread(init_bare, self.mirror_dir, env=self._git.env)
        if self.config.verify is VerifyMode.SSH:
            assert self.config.allowed_signers is not None
            check_allowed_signers(self.config.allowed_signers)
        elif self.config.verify is VerifyMode.OPENPGP:
            assert self.config.openpgp_keys is not None
            await build_keyring(self.config.openpgp_keys, self._gnupg_home, self._git.env)
        self._prepared = True
        ref = await self._git.resolve(GOOD_REF) or ""
        if self._good and ref and self._good != ref and await self._is_ancestor(self._good, ref):
            self._good = ref  # the ref moved on and the state store did not follow (a crash)
        if not self._good:
            self._good = ref
        if self._good:
            # the mirror was lost: the floor must not be (trust on first use)
            if not await self._git.exists(self._good):
                log.error("the last good commit is not in the mirror; waiting for it to be fetched",
                          commit=self._good)  # fmt: skip

    # ------------------------------------------------------------ state

    @property
    def good(self) -> str:
        return self._good

    @property
    def fleet(self) -> Fleet | None:
        return self._fleet

    @property
    def head(self) -> str:
        return self._head

    @property
    def rejection(self) -> Rejection | None:
        return self._last_rejection

    def state(self, changed: bool = False) -> SourceState:
        return SourceState(self._head, self._good, self._fleet, self._last_rejection, changed)

    # ------------------------------------------------------------ refresh

    async def refresh(self) -> SourceState:
        """Fetch, pick the newest good commit, load it. Raises ``SourceError`` if fetch fails."""
        async with self._lock:
            await self.setup()
            head = await self.fetch()
            self._head = head
            await self._load_good()
            if head == self._good and self._fleet is not None:
                self._last_rejection = None
                return self.state()
            known = self._refused.get(head)
            if known is not None and known[0] == self._good:
                self._last_rejection = known[1]  # same head, same outcome: no re-verify, no re-load
                return self.state()
            changed = False
            if self._good and head != self._good and not await self._is_ancestor(self._good, head):
                rejection: Rejection | None = await self._not_descendant(head)
            else:
                candidate, rejection = await self._newest_verified(head)
                if candidate and (candidate != self._good or self._fleet is None):
                    refusal = await self._usable(candidate)
                    changed = refusal is None
                    # A head refused for its signature keeps that reason; else why it is unusable.
                    if refusal is not None and rejection is None:
                        rejection = Rejection(head, refusal.kind, refusal.reason)
            if rejection is not None:
                rejection = replace(rejection, good=self._good)
                self._refused[head] = (self._good, rejection)
                log.warning(
                    "commit refused", commit=rejection.commit, kind=rejection.kind, reason=rejection.reason
                )
            self._last_rejection = rejection
            return self.state(changed)

    async def _usable(self, commit: str) -> Refusal | None:
        """Load ``commit`` and vet it; on success it becomes the good commit. A refusal is
        remembered (a commit is never loaded or rendered twice to be refused twice)."""
        refusal = self._invalid.get(commit)
        if refusal is not None:
            return refusal
        try:
            fleet = await self.load_at(commit)
        except FleetInvalid as exc:
            refusal = Refusal("invalid-fleet", f"commit {commit[:12]}: {exc}")
        else:
            refusal = await self._vet(commit, fleet) if self._vet is not None else None
            if refusal is None:
                await self._set_good(commit, fleet)
                return None
        self._invalid[commit] = refusal
        return refusal

    async def _not_descendant(self, head: str) -> Rejection:
        good = self._good
        if await self._is_ancestor(head, good):
            what = f"is older than the applied commit {good[:12]} (the branch was moved back)"
        else:
            what = f"does not descend from the applied commit {good[:12]} (the branch history was rewritten)"
        unsigned = ""
        if self.config.verify is not VerifyMode.NONE:
            verdict = await self.verify_commit(head)
            if not verdict.ok:
                unsigned = f"; it is also refused on its own: {verdict.reason}"
        reason = (
            f"commit {head[:12]} {what}{unsigned}. Hosts stay on {good[:12]}. To go back on purpose, "
            f"push a revert commit, or run `reconciler sync --allow-rollback {head[:12]}`"
        )
        return Rejection(head, "rollback", reason, good)

    async def rollback(self, target: str) -> Rollback:
        """Make ``target`` (a commit id, at least 7 hex digits) the good commit although it does
        not descend from the current one. It must be on the fetched branch (the head or one of
        its ancestors), verify like a new commit (itself and every commit of its history that
        the current good commit does not have) and load and vet. Raises ``RollbackRefused``."""
        if not _HEX.match(target):
            raise RollbackRefused(f"{target[:80]!r} is not a commit id (7 to 64 hex digits)")
        async with self._lock:
            await self.setup()
            head = await self.fetch()
            self._head = head
            resolved = await self._git.resolve(target)
            if resolved is None:
                raise RollbackRefused(f"commit {target} is not in the fetched repo (or the id is ambiguous)")
            commit = resolved
            previous = self._good
            if commit == previous:
                raise RollbackRefused(f"commit {commit[:12]} is already the applied commit")
            if not await self._is_ancestor(commit, head):
                raise RollbackRefused(
                    f"commit {commit[:12]} is not on branch {self.config.branch} (head {head[:12]}); "
                    "push it there first"
                )
            if previous and await self._is_ancestor(previous, commit):
                raise RollbackRefused(
                    f"commit {commit[:12]} descends from the applied commit {previous[:12]}: this is not "
                    "a rollback (`reconciler sync` applies it if it verifies)"
                )
            verdict = await self._verify_history(commit)
            if verdict is not None:
                raise RollbackRefused(f"commit {commit[:12]} cannot be trusted: {verdict.reason}")
            fleet: Fleet | None = None
            refusal = self._invalid.get(commit)
            if refusal is None:
                try:
                    fleet = await self.load_at(commit)
                except FleetInvalid as exc:
                    refusal = Refusal("invalid-fleet", f"commit {commit[:12]}: {exc}")
                else:
                    refusal = await self._vet(commit, fleet) if self._vet is not None else None
                if refusal is not None:
                    self._invalid[commit] = refusal
            if refusal is not None:
                raise RollbackRefused(
                    f"commit {commit[:12]} cannot be used ({refusal.kind}): {refusal.reason}"
                )
            await self._set_good(commit, fleet, rollback=True)
            self._last_rejection = None
            self._refused.pop(head, None)
            log.warning("rolled back on request", commit=commit, previous=previous, head=head)
            return Rollback(commit, previous, head)

    async def _verify_history(self, commit: str) -> Verdict | None:
        """The first failing verdict of ``commit`` or of its history that the good commit does
        not have (nor ``signed_after``); None when everything verifies (or verify is off)."""
        if self.config.verify is VerifyMode.NONE:
            return None
        exclude = [self._good] if self._good else []
        trusted = ""
        if self.config.signed_after:
            resolved = await self._git.resolve(self.config.signed_after)
            if resolved is None:
                return Verdict(
                    False, "bad-config", f"source.signed_after {self.config.signed_after} is not in the repo"
                )
            trusted = resolved
            exclude.append(trusted)
        commits = await self._rev_list(commit, exclude)
        if len(commits) > MAX_VERIFY:
            return Verdict(False, "bad-config", f"{len(commits)} commits to verify (limit {MAX_VERIFY})")
        if commit not in commits and not (trusted and await self._is_ancestor(commit, trusted)):
            commits.append(commit)  # an ancestor of the good commit: its own signature still counts
        for c in commits:
            verdict = await self.verify_commit(c)
            if not verdict.ok:
                return verdict
        return None

    async def fetch(self) -> str:
        """Fetch the branch into the mirror; returns its head commit id."""
        cfg = self.config
        ref = f"refs/remotes/origin/{cfg.branch}"
        res = await self._git.run(
            [
                "fetch",
                *self._upload_pack_args(),
                "--quiet",
                "--no-tags",
                "--prune",
                "--force",
                "--",
                cfg.url,
                f"+refs/heads/{cfg.branch}:{ref}",
            ],
            timeout=cfg.fetch_timeout,
        )
        if res.code != 0:
            raise SourceError(f"fetch of {redact_url(cfg.url)} failed: {_redact_bytes(res.stderr, cfg.url)}")
        head = await self._git.resolve(ref)
        if head is None:
            raise SourceError(f"fetch of {redact_url(cfg.url)}: no branch {cfg.branch}")
        return head

    def _upload_pack_args(self) -> list[str]:
        """For a file:// repo owned by another user (a mounted volume in a container), trust
        that one path for reading: git refuses "dubious ownership" otherwise. Only the path
        the operator configured is trusted, and only for upload-pack (read-only)."""
        url = self.config.url
        if not url.startswith("file://"):
            return []
        path = urllib.parse.unquote(urllib.parse.urlsplit(url).path).rstrip("/") or "/"
        argv = ["git"]
        for p in (path, f"{path}/.git"):
            argv += ["-c", f"safe.directory={p}"]
        argv.append("upload-pack")
        return ["--upload-pack", " ".join(shlex.quote(a) for a in argv)]

    async def _set_good(self, commit: str, fleet: Fleet | None, *, rollback: bool = False) -> None:
        """The one place the good commit moves: forward only, unless an admin asked."""
        old = self._good
        if old and commit != old and not rollback and not await self._is_ancestor(old, commit):
            raise SourceTrustError(
                f"refusing to move the good commit from {old[:12]} to {commit[:12]}: not a descendant"
            )
        if commit != old:
            await self._git.check(["update-ref", GOOD_REF, commit])
        self._good, self._fleet = commit, fleet
        log.info("new good commit", commit=commit)

    async def _is_ancestor(self, a: str, b: str) -> bool:
        return await self._git.is_ancestor(a, b)

    async def _rev_list(self, tip: str, exclude: Sequence[str], *, first_parent: bool = False) -> list[str]:
        args = ["rev-list", "--topo-order"]
        if first_parent:
            args.append("--first-parent")
        args.append(tip)
        args += [f"^{e}" for e in exclude if e]
        args.append("--")
        out = await self._git.check(args)
        return out.decode().split()

    async def _newest_verified(self, head: str) -> tuple[str, Rejection | None]:
        """The newest first-parent ancestor of ``head`` whose new history all verifies."""
        if self.config.verify is VerifyMode.NONE:
            return head, None
        exclude = [self._good] if self._good else []
        if self.config.signed_after:
            trusted = await self._git.resolve(self.config.signed_after)
            if trusted is None:
                rej = Rejection(
                    head, "bad-config", f"source.signed_after {self.config.signed_after} is not in the repo"
                )
                return self._good, rej
            exclude.append(trusted)
        new = await self._rev_list(head, exclude)
        if len(new) > MAX_VERIFY:
            reason = f"{len(new)} new commits to verify (limit {MAX_VERIFY}); set source.signed_after"
            return self._good, Rejection(head, "bad-config", reason)
        bad: dict[str, Verdict] = {}
        for commit in new:
            verdict = await self.verify_commit(commit)
            if not verdict.ok:
                bad[commit] = verdict
        if not bad:
            return head, None
        newest_bad = next(c for c in new if c in bad)
        verdict = bad[newest_bad]
        where = "" if newest_bad == head else f", in the history of {head[:12]}"
        rejection = Rejection(head, verdict.kind, f"{verdict.reason}{where}")
        for candidate in await self._rev_list(head, exclude, first_parent=True):
            if self._good and not await self._is_ancestor(self._good, candidate):
                continue  # on a side branch merged later: not forward from the good commit
            history = await self._rev_list(candidate, exclude)
            if not any(c in bad for c in history):
                return candidate, rejection
        return self._good, rejection

    async def commit_summary(self, commit: str) -> dict[str, str]:
        """Subject, author and signature (as the trust check found it) of a fetched commit, for
        the status page; {} if the mirror does not have it."""
        if not _COMMIT_ID.match(commit):
            return {}
        config: list[tuple[str, str]] = []
        if self.config.verify is VerifyMode.SSH and self.config.allowed_signers is not None:
            config.append(("gpg.ssh.allowedSignersFile", str(self.config.allowed_signers)))
        res = await self._git.run(
            ["log", "-1", "--format=%s%x00%an <%ae>%x00%GS%x00%GK", commit, "--"],
            config=config,
            env={"GNUPGHOME": str(self._gnupg_home)},
            timeout=10,
        )
        if res.code != 0:
            return {}
        fields = res.stdout.decode("utf-8", "replace").strip().split("\0")
        subject, author, who, key = (fields + ["", "", ""])[:4]
        verdict = self._verified.get(commit)
        signer = ""
        if self.config.verify is not VerifyMode.NONE and verdict is not None and verdict.ok:
            signer = f"{who or 'a trusted key'} ({self.config.verify.value} key {key})" if key else who
        return {"subject": subject[:200], "author": author[:200], "signer": signer[:300]}

    async def verify_commit(self, commit: str) -> Verdict:
        cached = self._verified.get(commit)
        if cached is not None:
            return cached
        verdict = await verify_signature(self._git, commit, self.config, self._gnupg_home)
        self._verified[commit] = verdict
        return verdict

    # ------------------------------------------------------------ loading

    async def read_tree(self, commit: str) -> dict[str, bytes]:
        """Every regular file of the commit's tree (path -> bytes), via ``git archive``."""
        try:
            data = await self._git.check(["archive", "--format=tar", commit], max_output=MAX_ARCHIVE_BYTES)
        except OutputTooLarge:
            raise FleetInvalid(
                [Problem("", 0, 0, "", f"the repo tree is larger than {MAX_ARCHIVE_BYTES} bytes")]
            ) from None
        return files_from_tar(data)

    async def load_at(self, commit: str) -> Fleet:
        files = await self.read_tree(commit)
        return await asyncio.to_thread(self._loader, files)


def _redact_bytes(stderr: bytes, url: str) -> str:
    line = first_line(stderr)
    return line.replace(url, redact_url(url)) if url else line
