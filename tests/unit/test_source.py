"""The fleet source against real git repos and real SSH (and OpenPGP) commit signatures."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from reconciler.daemon.config import SourceConfig, VerifyMode
from reconciler.daemon.source import (
    FleetSource,
    SourceConfigError,
    check_allowed_signers,
)
from reconciler.errors import FleetInvalid, Problem, Terminal, Transient

GIT_ENV = {
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_AUTHOR_NAME": "Admin",
    "GIT_AUTHOR_EMAIL": "admin@example.org",
    "GIT_COMMITTER_NAME": "Admin",
    "GIT_COMMITTER_EMAIL": "admin@example.org",
}


def git(repo: Path, *args: str, env: Mapping[str, str] | None = None) -> str:
    full_env = {**os.environ, **GIT_ENV, **(env or {})}
    out = subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, env=full_env)
    return out.stdout.decode().strip()


def fake_loader(files: Mapping[str, bytes]) -> dict[str, str]:
    """Stands in for reconciler.fleet.load: 'invalid' in fleet.yaml is a validation error."""
    text = files.get("fleet.yaml", b"").decode()
    if "invalid" in text:
        raise FleetInvalid([Problem("fleet.yaml", 1, 1, "name", "invalid fleet")])
    return {k: v.decode() for k, v in files.items()}


class Repo:
    """The admins' fleet repo (a normal work tree, fetched over file://)."""

    def __init__(self, path: Path, keys: Path) -> None:
        self.path = path
        self.keys = keys
        path.mkdir()
        git(path, "init", "-q", "-b", "main")
        self.n = 0

    def commit(self, content: str | None = None, *, key: str | None = None, gpg: str | None = None) -> str:
        self.n += 1
        (self.path / "fleet.yaml").write_text(content if content is not None else f"name: fleet{self.n}\n")
        git(self.path, "add", "-A")
        args = ["commit", "-q", "-m", f"change {self.n}"]
        cfg: list[str] = []
        env: dict[str, str] = {}
        if key is not None:
            cfg = ["-c", "gpg.format=ssh", "-c", f"user.signingkey={self.keys / key}"]
            args.append("-S")
        elif gpg is not None:
            cfg = ["-c", "gpg.format=openpgp", "-c", f"user.signingkey={gpg}"]
            env = {"GNUPGHOME": str(self.keys / "gnupg")}
            args.append("-S")
        git(self.path, *cfg, *args, env=env)
        return git(self.path, "rev-parse", "HEAD")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("keys")
    for name in ("admin", "intruder"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(d / name)], check=True
        )
    pub = (d / "admin.pub").read_text().split()
    (d / "allowed_signers").write_text(f'admin@example.org namespaces="git" {pub[0]} {pub[1]}\n')
    return d


@pytest.fixture
def repo(tmp_path: Path, keys: Path) -> Repo:
    return Repo(tmp_path / "fleet", keys)


def make_source(
    tmp_path: Path, repo: Repo, keys: Path, *, verify: VerifyMode = VerifyMode.SSH, **kw: object
) -> FleetSource:
    cfg = SourceConfig(
        url=f"file://{repo.path}",
        branch="main",
        verify=verify,
        allowed_signers=keys / "allowed_signers" if verify is VerifyMode.SSH else None,
        **kw,  # type: ignore[arg-type]
    )
    return FleetSource(cfg, tmp_path / "state" / "mirror.git", loader=fake_loader)


async def test_good_signature_is_used_and_loaded(tmp_path: Path, repo: Repo, keys: Path) -> None:
    c1 = repo.commit(key="admin")
    before = git(repo.path, "status", "--porcelain")
    src = make_source(tmp_path, repo, keys)
    st = await src.refresh()
    assert st.good == st.head == c1 and st.changed and st.rejection is None
    assert st.fleet["fleet.yaml"] == "name: fleet1\n"
    again = await src.refresh()
    assert not again.changed and again.good == c1
    # The admins' work tree is untouched: no checkout, no new files.
    assert git(repo.path, "status", "--porcelain") == before
    assert git(repo.path, "rev-parse", "HEAD") == c1


async def test_unsigned_head_is_never_used(tmp_path: Path, repo: Repo, keys: Path) -> None:
    c1 = repo.commit(key="admin")
    src = make_source(tmp_path, repo, keys)
    await src.refresh()
    c2 = repo.commit("name: sneaky\n")
    st = await src.refresh()
    assert st.head == c2 and st.good == c1 and not st.changed
    assert st.fleet["fleet.yaml"] == "name: fleet1\n"
    assert st.rejection is not None and st.rejection.kind == "unsigned"
    assert c2[:12] in st.rejection.reason and "not signed" in st.rejection.reason
    assert st.rejection.key == f"source:{c2}:unsigned"


async def test_unknown_key_is_refused(tmp_path: Path, repo: Repo, keys: Path) -> None:
    c1 = repo.commit(key="admin")
    src = make_source(tmp_path, repo, keys)
    await src.refresh()
    repo.commit("name: intruder\n", key="intruder")
    st = await src.refresh()
    assert st.good == c1
    assert st.rejection is not None and st.rejection.kind == "untrusted-key"


async def test_unknown_key_first_fetch_no_good_commit(tmp_path: Path, repo: Repo, keys: Path) -> None:
    repo.commit(key="intruder")
    src = make_source(tmp_path, repo, keys)
    st = await src.refresh()
    assert st.good == "" and st.fleet is None
    assert st.rejection is not None and st.rejection.kind == "untrusted-key"


@pytest.mark.parametrize(
    ("content", "expect"),
    [
        ("admin@example.org ssh-ed25519 not-base64!!\n", "not valid base64"),
        ("just-one-token\n", "expected 'PRINCIPALS"),
        ("", "no keys"),
    ],
)
async def test_malformed_allowed_signers_is_a_config_error(
    tmp_path: Path, repo: Repo, keys: Path, content: str, expect: str
) -> None:
    bad = tmp_path / "allowed_bad"
    bad.write_text(content)
    repo.commit(key="admin")
    cfg = SourceConfig(url=f"file://{repo.path}", verify=VerifyMode.SSH, allowed_signers=bad)
    src = FleetSource(cfg, tmp_path / "state" / "mirror.git", loader=fake_loader)
    with pytest.raises(SourceConfigError) as err:
        await src.refresh()
    assert expect in str(err.value) and str(bad) in str(err.value)
    assert isinstance(err.value, Terminal)


def test_key_type_mismatch_in_allowed_signers(tmp_path: Path, keys: Path) -> None:
    blob = (keys / "admin.pub").read_text().split()[1]
    f = tmp_path / "allowed"
    f.write_text(f"# comment\nadmin@example.org ssh-rsa {blob}\n")
    with pytest.raises(SourceConfigError, match=r":2: key type mismatch"):
        check_allowed_signers(f)
    assert check_allowed_signers(keys / "allowed_signers") == 1


async def test_signed_head_on_unsigned_history(tmp_path: Path, repo: Repo, keys: Path) -> None:
    base = repo.commit()  # history from before signing was required
    repo.commit()
    head = repo.commit(key="admin")
    src = make_source(tmp_path, repo, keys)
    st = await src.refresh()
    assert st.good == "" and st.rejection is not None
    assert st.rejection.kind == "unsigned" and f"in the history of {head[:12]}" in st.rejection.reason
    # With the old history trusted up to a named commit, only the rest must be signed.
    mid = git(repo.path, "rev-parse", "HEAD~1")
    trusted = make_source(tmp_path / "t", repo, keys, signed_after=mid)
    st2 = await trusted.refresh()
    assert st2.good == head and st2.rejection is None
    too_early = make_source(tmp_path / "e", repo, keys, signed_after=base)
    st3 = await too_early.refresh()
    assert st3.good == "" and st3.rejection is not None


async def test_newest_good_commit_before_a_bad_one_is_used(tmp_path: Path, repo: Repo, keys: Path) -> None:
    repo.commit(key="admin")
    src = make_source(tmp_path, repo, keys)
    await src.refresh()
    c2 = repo.commit(key="admin")
    bad = repo.commit("name: unsigned\n")
    repo.commit(key="admin")  # signed on top of the unsigned one: still refused
    st = await src.refresh()
    assert st.good == c2 and st.changed
    assert st.rejection is not None and bad[:12] in st.rejection.reason


async def test_invalid_fleet_keeps_last_good(tmp_path: Path, repo: Repo, keys: Path) -> None:
    c1 = repo.commit(key="admin")
    src = make_source(tmp_path, repo, keys)
    await src.refresh()
    c2 = repo.commit("name: invalid\n", key="admin")
    st = await src.refresh()
    assert st.good == c1 and st.head == c2
    assert st.rejection is not None and st.rejection.kind == "invalid-fleet"
    assert "fleet.yaml:1" in st.rejection.reason
    c3 = repo.commit("name: fixed\n", key="admin")
    st = await src.refresh()
    assert st.good == c3 and st.rejection is None and st.fleet["fleet.yaml"] == "name: fixed\n"


async def test_restart_resumes_from_last_good(tmp_path: Path, repo: Repo, keys: Path) -> None:
    c1 = repo.commit(key="admin")
    src = make_source(tmp_path, repo, keys)
    await src.refresh()
    repo.commit("name: not-signed\n")
    again = make_source(tmp_path, repo, keys)  # a new process, same state dir
    await again.prepare()
    assert again.good == c1 and again.fleet["fleet.yaml"] == "name: fleet1\n"
    st = await again.refresh()
    assert st.good == c1 and st.rejection is not None


async def test_no_verification_uses_head(tmp_path: Path, repo: Repo, keys: Path) -> None:
    repo.commit()
    c2 = repo.commit()
    src = make_source(tmp_path, repo, keys, verify=VerifyMode.NONE)
    st = await src.refresh()
    assert st.good == c2


async def test_fetch_failure_is_transient_and_hides_credentials(tmp_path: Path, keys: Path) -> None:
    cfg = SourceConfig(url="https://user:hunter2@127.0.0.1:9/fleet.git", fetch_timeout=20)
    src = FleetSource(cfg, tmp_path / "mirror.git", loader=fake_loader)
    with pytest.raises(Transient) as err:
        await src.refresh()
    assert "hunter2" not in str(err.value)


async def test_missing_branch_is_transient(tmp_path: Path, repo: Repo, keys: Path) -> None:
    repo.commit()
    cfg = SourceConfig(url=f"file://{repo.path}", branch="nope")
    src = FleetSource(cfg, tmp_path / "mirror.git", loader=fake_loader)
    with pytest.raises(Transient, match="fetch"):
        await src.refresh()


async def test_symlink_leaving_the_repo_is_invalid(tmp_path: Path, repo: Repo, keys: Path) -> None:
    repo.commit()
    (repo.path / "hosts").mkdir()
    (repo.path / "hosts" / "ok.yaml").symlink_to("../fleet.yaml")
    (repo.path / "hosts" / "evil.yaml").symlink_to("/etc/shadow")
    c2 = repo.commit()
    src = make_source(tmp_path, repo, keys, verify=VerifyMode.NONE)
    st = await src.refresh()
    assert st.good == "" and st.rejection is not None and st.rejection.kind == "invalid-fleet"
    assert "hosts/evil.yaml" in st.rejection.reason and "ok.yaml" not in st.rejection.reason
    with pytest.raises(FleetInvalid):
        await src.read_tree(c2)


async def test_in_repo_symlink_resolves(tmp_path: Path, repo: Repo, keys: Path) -> None:
    repo.commit()
    (repo.path / "alias.yaml").symlink_to("fleet.yaml")
    c2 = repo.commit()
    src = make_source(tmp_path, repo, keys, verify=VerifyMode.NONE)
    await src.refresh()
    files = await src.read_tree(c2)
    assert files["alias.yaml"] == files["fleet.yaml"]


def kill_gpg_agents(under: Path) -> None:
    """Stop the gpg-agent of every GnuPG home under ``under`` (gpg starts one per home and
    leaves it running after the test; ``gpgconf --kill`` ends exactly that home's agent)."""
    homes = [p for p in under.rglob("*") if p.is_dir() and (p.name == "gnupg" or p.name.endswith(".gnupg"))]
    for home in homes:
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True, timeout=30)


@pytest.fixture(autouse=True)
def _no_gpg_agent_left(tmp_path: Path) -> Iterator[None]:
    yield
    kill_gpg_agents(tmp_path)  # a Source in OpenPGP mode imports keys into its own GnuPG home


@pytest.fixture(scope="module")
def gpg_key(keys: Path) -> Iterator[str]:
    home = keys / "gnupg"
    home.mkdir(mode=0o700)
    env = {**os.environ, "GNUPGHOME": str(home)}
    subprocess.run(
        ["gpg", "--batch", "--quiet", "--passphrase", "", "--quick-gen-key", "Admin <admin@example.org>",
         "ed25519", "sign", "never"],
        check=True, env=env, capture_output=True,
    )  # fmt: skip
    out = subprocess.run(["gpg", "--with-colons", "--list-keys"], check=True, env=env, capture_output=True)
    fpr = next(line.split(":")[9] for line in out.stdout.decode().splitlines() if line.startswith("fpr"))
    armored = subprocess.run(["gpg", "--armor", "--export", fpr], check=True, env=env, capture_output=True)
    (keys / "openpgp.asc").write_bytes(armored.stdout)
    try:
        yield fpr
    finally:
        kill_gpg_agents(keys)


async def test_openpgp_signature_is_refused_in_ssh_mode(
    tmp_path: Path, repo: Repo, keys: Path, gpg_key: str
) -> None:
    repo.commit(key="admin")
    src = make_source(tmp_path, repo, keys)
    await src.refresh()
    repo.commit(gpg=gpg_key)
    st = await src.refresh()
    assert st.rejection is not None and st.rejection.kind == "wrong-signature-kind"


async def test_openpgp_mode_accepts_allowed_key_only(
    tmp_path: Path, repo: Repo, keys: Path, gpg_key: str
) -> None:
    c1 = repo.commit(gpg=gpg_key)
    cfg = SourceConfig(
        url=f"file://{repo.path}", verify=VerifyMode.OPENPGP, openpgp_keys=keys / "openpgp.asc"
    )
    src = FleetSource(cfg, tmp_path / "state" / "mirror.git", loader=fake_loader)
    st = await src.refresh()
    assert st.good == c1 and st.rejection is None
    repo.commit()
    st = await src.refresh()
    assert st.good == c1 and st.rejection is not None and st.rejection.kind == "unsigned"
    repo.commit(key="admin")  # an SSH signature does not count in OpenPGP mode
    st = await src.refresh()
    assert st.good == c1 and st.rejection is not None


async def test_repo_owned_by_another_user_is_fetched(tmp_path: Path, repo: Repo, keys: Path) -> None:
    """A mounted fleet repo owned by someone else (a container volume): read, not refused."""
    if os.geteuid() != 0:
        pytest.skip("needs root to give the repo another owner")
    c1 = repo.commit()
    for root, dirs, files in os.walk(repo.path):
        for name in [*dirs, *files]:
            os.lchown(os.path.join(root, name), 10001, 10001)
    os.chown(repo.path, 10001, 10001)
    src = make_source(tmp_path, repo, keys, verify=VerifyMode.NONE)
    st = await src.refresh()
    assert st.good == c1


async def test_unsigned_head_on_top_of_an_invalid_commit_reports_unsigned(
    tmp_path: Path, repo: Repo, keys: Path
) -> None:
    c1 = repo.commit(key="admin")
    src = make_source(tmp_path, repo, keys)
    await src.refresh()
    repo.commit("name: invalid\n", key="admin")
    st = await src.refresh()
    assert st.rejection is not None and st.rejection.kind == "invalid-fleet"
    repo.commit("name: fixed-but-unsigned\n")
    st = await src.refresh()
    assert st.good == c1 and st.rejection is not None and st.rejection.kind == "unsigned"


async def test_the_real_loader_reads_the_fleet_at_the_commit_and_names_a_bad_file(
    tmp_path: Path, repo: Repo, keys: Path
) -> None:
    """No fake loader: the source's default loader (reconciler.fleet.load) reads the example
    fleet repo from the signed commit; a signed commit with a broken host file is refused as
    invalid-fleet naming the file and line, and the good fleet stays."""
    import shutil

    from reconciler.daemon.source import default_loader

    example = Path(__file__).resolve().parents[2] / "fleet-repo-example"
    shutil.copytree(example, repo.path, dirs_exist_ok=True)
    good = repo.commit((example / "fleet.yaml").read_text(), key="admin")
    cfg = SourceConfig(
        url=f"file://{repo.path}", verify=VerifyMode.SSH, allowed_signers=keys / "allowed_signers"
    )
    src = FleetSource(cfg, tmp_path / "state" / "mirror.git", loader=default_loader)
    st = await src.refresh()
    assert st.good == good and st.rejection is None
    assert sorted(st.fleet.host_names()) == ["db1", "db2", "web1", "web2"]
    host_file = repo.path / "hosts" / "web2.yaml"
    host_file.write_text(host_file.read_text().replace("public_address:", "public_adress:"))
    bad = repo.commit((example / "fleet.yaml").read_text(), key="admin")
    st = await src.refresh()
    assert st.head == bad and st.good == good
    assert st.rejection is not None and st.rejection.kind == "invalid-fleet"
    assert "hosts/web2.yaml:" in st.rejection.reason and "public_adress" in st.rejection.reason
    assert sorted(st.fleet.host_names()) == ["db1", "db2", "web1", "web2"]
