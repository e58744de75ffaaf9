"""Daemon configuration: a YAML file, then environment variables (for containers), typed.

Precedence: built-in defaults < the YAML file < environment variables. Every setting has an
environment variable named ``RECONCILER_<SECTION>_<KEY>`` in upper case (for example
``source.url`` -> ``RECONCILER_SOURCE_URL``, ``state_dir`` -> ``RECONCILER_STATE_DIR``).
Secrets (webhook secret, GitLab token, sync, read and metrics tokens, SMTP password) may also be
read from a file named by ``<VAR>_FILE`` (Docker/Kubernetes secrets). Secrets are held in
:class:`Secret`, whose ``repr``/``str`` never show the value; they are never logged and never
shown in /status.

See docs/DEPLOY.md for the full reference.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from reconciler.daemon.config_values import (
    ConfigError as ConfigError,
)
from reconciler.daemon.config_values import (
    Parser,
    parse_body_size,
    parse_bool,
    parse_enum,
    parse_int,
    parse_list,
    parse_log_level,
    parse_opt_bool,
    parse_opt_path,
    parse_path,
    parse_port,
    parse_positive_int,
    parse_secret,
    parse_str,
    positive_duration,
    sized,
)
from reconciler.daemon.config_values import (
    Secret as Secret,
)
from reconciler.daemon.config_values import (
    parse_duration as parse_duration,
)
from reconciler.daemon.config_values import (
    parse_size as parse_size,
)
from reconciler.domains.render_limits import MIB, RenderLimits
from reconciler.fleet.model import SmtpSecurity
from reconciler.fleet.yamlsafe import load_documents
from reconciler.gitrepo import redact_url

ENV_PREFIX = "RECONCILER_"


class VerifyMode(StrEnum):
    NONE = "none"  # no signature check (not recommended outside a lab)
    SSH = "ssh"  # SSH signatures checked against an allowed-signers file
    OPENPGP = "openpgp"  # OpenPGP signatures checked against a keyring of allowed public keys


class HistoryBranches(StrEnum):
    MAIN = "main"  # push the history repo's main (one replica)
    HOST = "host"  # push one branch per host, refs/heads/hosts/<host> (several replicas, one remote)


class RunMode(StrEnum):
    APPLY = "apply"  # converge hosts
    PLAN = "plan"  # observe and plan only; never change a host


@dataclass(frozen=True)
class SourceConfig:
    url: str = ""  # file:///path, ssh://git@host/repo.git, git@host:repo.git, https://host/repo.git
    branch: str = "main"
    poll_interval: float = 60.0  # seconds; 0 disables polling (webhooks and `sync` only)
    verify: VerifyMode = VerifyMode.NONE
    allowed_signers: Path | None = None  # OpenSSH allowed-signers file (verify: ssh)
    openpgp_keys: Path | None = None  # armored public keys, one file (verify: openpgp)
    # Every commit after this one must be signed; it and its ancestors are trusted as they are.
    # Empty: every commit reachable from the branch head must be signed.
    signed_after: str = ""
    ssh_key: Path | None = None  # private key for ssh:// fetch URLs
    ssh_known_hosts: Path | None = None  # known_hosts for the git server (never accept-new)
    fetch_timeout: float = 120.0


@dataclass(frozen=True)
class ServerConfig:
    listen: str = "127.0.0.1"
    port: int = 8080
    webhook_secret: Secret = field(default_factory=lambda: Secret(""))  # GitHub and Gitea HMAC key
    gitlab_token: Secret = field(default_factory=lambda: Secret(""))  # GitLab X-Gitlab-Token
    sync_token: Secret = field(default_factory=lambda: Secret(""))  # bearer token for POST /sync
    # Bearer (or Basic password) for /status, / and /metrics. Required to start on an address
    # beyond loopback unless public_status is true; when set it is required on loopback too.
    read_token: Secret = field(default_factory=lambda: Secret(""))
    metrics_token: Secret = field(default_factory=lambda: Secret(""))  # also accepted by /metrics
    public_status: bool = False  # serve /status, / and /metrics to anyone (no read token)
    max_body_bytes: int = 1 << 20

    @property
    def loopback(self) -> bool:
        return is_loopback(self.listen)


@dataclass(frozen=True)
class SshConfig:
    known_hosts: Path | None = None  # host keys when the fleet gives none (never "accept any")
    identity: tuple[Path, ...] = ()  # private keys used to log in to hosts
    connect_timeout: float = 10.0
    command_timeout: float = 60.0
    netns: str = ""  # dial hosts from inside this network namespace (a VM lab; docs/LAB.md)


@dataclass(frozen=True)
class SmtpConfig:
    host: str = ""  # empty: mail only queued in the outbox, never sent
    port: int = 25
    security: SmtpSecurity = SmtpSecurity.NONE
    username: str = ""
    password: Secret = field(default_factory=lambda: Secret(""))
    sender: str = "reconciler@localhost"
    to: tuple[str, ...] = ()
    timeout: float = 30.0


@dataclass(frozen=True)
class ShardConfig:
    """Sharding over the replicas of a StatefulSet (reconciler/daemon/shard.py, docs/DEPLOY.md)."""

    replicas: int = 1  # N; 1 = not sharded
    name: str = ""  # this replica's name, "<base>-<ordinal>" (the pod name); required when N > 1
    # a peer's base URL; {name} and {ordinal} are replaced: http://{name}.reconciler:8080
    peer_url: str = ""
    peer_timeout: float = 5.0  # one peer request at most


@dataclass(frozen=True)
class Config:
    source: SourceConfig = field(default_factory=SourceConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    ssh: SshConfig = field(default_factory=SshConfig)
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    render: RenderLimits = field(default_factory=RenderLimits)
    shard: ShardConfig = field(default_factory=ShardConfig)
    state_dir: Path = Path("/var/lib/reconciler")
    history_repo: Path | None = None  # default: <state_dir>/history
    # push the history repo here after drift scans that recorded something (git URL; "": never)
    history_remote: str = ""
    # what goes to history_remote; None: host when sharded (shard.replicas > 1), else main
    history_branches: HistoryBranches | None = None
    concurrency: int = 50  # hosts reconciled at once
    # seconds between drift scans of every host; None = the fleet's drift.interval_seconds; 0 = off
    drift_interval: float | None = None
    mode: RunMode = RunMode.APPLY
    shutdown_grace: float = 30.0  # seconds in-flight reconciles get after SIGTERM
    backoff_base: float = 2.0  # first retry delay after a transient failure (seconds)
    backoff_max: float = 300.0
    log_level: str = "INFO"
    log_json: bool | None = None  # None: JSON when stderr is not a terminal
    # hosts the daemon may take over when their /etc/reconciler/identity names another fleet or
    # host name (the CLI's --adopt); remove them once adopted (docs/ENGINE.md, "Host identity")
    adopt: tuple[str, ...] = ()

    @property
    def history_dir(self) -> Path:
        return self.history_repo if self.history_repo is not None else self.state_dir / "history"

    @property
    def history_push_branches(self) -> HistoryBranches:
        """``history_branches``, or its default: one branch per host when sharded."""
        if self.history_branches is not None:
            return self.history_branches
        return HistoryBranches.HOST if self.shard.replicas > 1 else HistoryBranches.MAIN

    def redacted(self) -> dict[str, Any]:
        """A JSON-able view with every secret replaced by whether it is set."""
        out: dict[str, Any] = _redact(self)
        return out


_SOURCE: dict[str, Parser] = {
    "url": parse_str,
    "branch": parse_str,
    "poll_interval": parse_duration,
    "verify": lambda v, w: parse_enum(VerifyMode, v, w),
    "allowed_signers": parse_opt_path,
    "openpgp_keys": parse_opt_path,
    "signed_after": parse_str,
    "ssh_key": parse_opt_path,
    "ssh_known_hosts": parse_opt_path,
    "fetch_timeout": parse_duration,
}
_SERVER: dict[str, Parser] = {
    "listen": parse_str,
    "port": parse_port,
    "webhook_secret": parse_secret,
    "gitlab_token": parse_secret,
    "sync_token": parse_secret,
    "read_token": parse_secret,
    "metrics_token": parse_secret,
    "public_status": parse_bool,
    "max_body_bytes": parse_body_size,
}
_RENDER: dict[str, Parser] = {
    "timeout": positive_duration,
    "memory": sized(128 * MIB, 64 << 30),
    "max_file_bytes": sized(1024, 1 << 30),
    "max_host_bytes": sized(1024, 8 << 30),
}
_SSH: dict[str, Parser] = {
    "known_hosts": parse_opt_path,
    "identity": lambda v, w: tuple(Path(p).expanduser() for p in parse_list(v, w)),
    "connect_timeout": parse_duration,
    "command_timeout": parse_duration,
    "netns": parse_str,
}
_SMTP: dict[str, Parser] = {
    "host": parse_str,
    "port": parse_port,
    "security": lambda v, w: parse_enum(SmtpSecurity, v, w),
    "username": parse_str,
    "password": parse_secret,
    "sender": parse_str,
    "to": parse_list,
    "timeout": parse_duration,
}
_SHARD: dict[str, Parser] = {
    "replicas": lambda v, w: parse_int(v, w, 1, 1000),
    "name": parse_str,
    "peer_url": parse_str,
    "peer_timeout": positive_duration,
}
_TOP: dict[str, Parser] = {
    "state_dir": parse_path,
    "history_repo": parse_opt_path,
    "history_remote": lambda v, w: _parse_git_url(parse_str(v, w), w),
    "history_branches": lambda v, w: None if v is None or v == "" else parse_enum(HistoryBranches, v, w),
    "concurrency": parse_positive_int,
    "drift_interval": lambda v, w: None if v is None or v == "" else parse_duration(v, w),
    "mode": lambda v, w: parse_enum(RunMode, v, w),
    "shutdown_grace": parse_duration,
    "backoff_base": parse_duration,
    "backoff_max": parse_duration,
    "log_level": parse_log_level,
    "log_json": parse_opt_bool,
    "adopt": parse_list,
}
_SECTIONS: dict[str, tuple[dict[str, Parser], type[Any]]] = {
    "source": (_SOURCE, SourceConfig),
    "server": (_SERVER, ServerConfig),
    "ssh": (_SSH, SshConfig),
    "smtp": (_SMTP, SmtpConfig),
    "render": (_RENDER, RenderLimits),
    "shard": (_SHARD, ShardConfig),
}
SECRET_KEYS = frozenset(
    {
        "server.webhook_secret",
        "server.gitlab_token",
        "server.sync_token",
        "server.read_token",
        "server.metrics_token",
        "smtp.password",
    }
)


def env_name(dotted: str) -> str:
    """``source.url`` -> ``RECONCILER_SOURCE_URL``."""
    return ENV_PREFIX + dotted.replace(".", "_").upper()


def all_settings() -> list[str]:
    """Every dotted setting name, for docs and tests."""
    names = [f"{sec}.{key}" for sec, (parsers, _) in _SECTIONS.items() for key in parsers]
    return names + list(_TOP)


# ---------------------------------------------------------------- YAML (the fleet's safe loader)


def _read_yaml(path: Path) -> dict[str, Any]:
    """The config file through fleet/yamlsafe.py, the one YAML loader: size cap, strict UTF-8,
    no tags, aliases or merge keys beyond the core schema, duplicate keys refused, marks kept."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from None
    docs, problems = load_documents(str(path), raw)
    if problems:
        p = problems[0]
        where = f"{path}:{p.line}" if p.line else str(path)
        field_ = f" {p.field}:" if p.field else ""
        raise ConfigError(f"{where}:{field_} invalid YAML: {p.message}")
    if len(docs) > 1:
        raise ConfigError(f"{path}:{docs[1].line}: one YAML document expected, found {len(docs)}")
    data = docs[0].data if docs else None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config file must be a mapping of settings")
    return data


# ---------------------------------------------------------------- loading


def _read_secret_file(var: str, file_path: str) -> str:
    try:
        return Path(file_path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        raise ConfigError(f"{var}_FILE: cannot read the secret file") from None


def _collect(path: Path | None, environ: Mapping[str, str]) -> dict[str, tuple[object, str]]:
    """Dotted setting -> (raw value, where it came from)."""
    raw: dict[str, tuple[object, str]] = {}
    if path is not None:
        data = _read_yaml(path)
        for key, value in data.items():
            if key in _SECTIONS:
                parsers = _SECTIONS[key][0]
                if value is None:
                    continue
                if not isinstance(value, dict):
                    raise ConfigError(f"{path}: {key}: expected a mapping")
                for sub, subval in value.items():
                    if sub not in parsers:
                        known = ", ".join(sorted(parsers))
                        raise ConfigError(f"{path}: {key}.{sub}: unknown setting (known: {known})")
                    raw[f"{key}.{sub}"] = (subval, f"{path}: {key}.{sub}")
            elif key in _TOP:
                raw[str(key)] = (value, f"{path}: {key}")
            else:
                known = ", ".join(sorted([*_SECTIONS, *_TOP]))
                raise ConfigError(f"{path}: {key}: unknown setting (known: {known})")
    for dotted in all_settings():
        var = env_name(dotted)
        if var in environ:
            raw[dotted] = (environ[var], var)
        if dotted in SECRET_KEYS and f"{var}_FILE" in environ:
            if var in environ:
                raise ConfigError(f"{var} and {var}_FILE are both set; set only one")
            raw[dotted] = (_read_secret_file(var, environ[f"{var}_FILE"]), f"{var}_FILE")
    return raw


def load_config(path: Path | str | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read the YAML file (if any), overlay the environment, parse and check every value."""
    env = os.environ if environ is None else environ
    if path is None and env.get(ENV_PREFIX + "CONFIG"):
        path = env[ENV_PREFIX + "CONFIG"]
    raw = _collect(Path(path) if path is not None else None, env)

    section_values: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    top_values: dict[str, Any] = {}
    for dotted, (value, where) in raw.items():
        if "." in dotted:
            sec, key = dotted.split(".", 1)
            section_values[sec][key] = _SECTIONS[sec][0][key](value, where)
        else:
            top_values[dotted] = _TOP[dotted](value, where)
    sections = {name: cls(**section_values[name]) for name, (_, cls) in _SECTIONS.items()}
    cfg = Config(**sections, **top_values)
    _check(cfg)
    return cfg


_SCHEMES = ("file://", "ssh://", "https://", "http://")
_SCP_LIKE = re.compile(r"^[A-Za-z0-9._-]+@[A-Za-z0-9.-]+:[^/].*$")
_BRANCH = re.compile(r"^[A-Za-z0-9._/-]{1,200}$")


def _parse_git_url(url: str, where: str) -> str:
    if url and (url.startswith("-") or not (url.startswith(_SCHEMES) or _SCP_LIKE.match(url))):
        raise ConfigError(f"{where}: expected file://, ssh://, https:// or user@host:path")
    return url


def _check(cfg: Config) -> None:
    src = cfg.source
    if src.url and not (src.url.startswith(_SCHEMES) or _SCP_LIKE.match(src.url)):
        raise ConfigError(
            "source.url: expected file://, ssh://, https:// or user@host:path, got a different scheme"
        )
    if src.url.startswith("-"):
        raise ConfigError("source.url: must not start with '-'")
    if not _BRANCH.match(src.branch) or ".." in src.branch or src.branch.startswith(("-", "/")):
        raise ConfigError(f"source.branch: not a valid branch name: {src.branch!r}")
    if src.verify is VerifyMode.SSH and src.allowed_signers is None:
        raise ConfigError("source.allowed_signers: required when source.verify is ssh")
    if src.verify is VerifyMode.OPENPGP and src.openpgp_keys is None:
        raise ConfigError("source.openpgp_keys: required when source.verify is openpgp")
    if src.signed_after and not re.fullmatch(r"[0-9a-f]{7,64}", src.signed_after):
        raise ConfigError("source.signed_after: expected a commit id (hex)")
    if cfg.backoff_max < cfg.backoff_base:
        raise ConfigError("backoff_max: must be at least backoff_base")
    if cfg.render.max_host_bytes < cfg.render.max_file_bytes:
        raise ConfigError("render.max_host_bytes: must be at least render.max_file_bytes")


def is_loopback(address: str) -> bool:
    """127.0.0.0/8, ::1 and localhost; anything else (0.0.0.0, ::, a name) is not."""
    text = address.strip().strip("[]").lower()
    if text == "localhost":
        return True
    try:
        return ipaddress.ip_address(text).is_loopback
    except ValueError:
        return False


def require_runnable(cfg: Config) -> None:
    """Settings `reconciler run` cannot do without."""
    if not cfg.source.url:
        raise ConfigError(f"source.url: required (config file or {env_name('source.url')})")
    srv = cfg.server
    if not srv.loopback and not srv.read_token and not srv.public_status:
        raise ConfigError(
            f"server.read_token: required when server.listen is {srv.listen!r} (beyond loopback): "
            f"/status, / and /metrics show host names, commits and errors. Set "
            f"{env_name('server.read_token')} (or ..._FILE), or server.public_status: true "
            f"({env_name('server.public_status')}=true) to serve them to anyone"
        )


def _redact(obj: object) -> Any:
    if isinstance(obj, Secret):
        return {"set": bool(obj)}
    if isinstance(obj, StrEnum):
        return obj.value
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, tuple):
        return [_redact(v) for v in obj]
    if is_dataclass(obj) and not isinstance(obj, type):
        out = {f.name: _redact(getattr(obj, f.name)) for f in fields(obj)}
        if isinstance(obj, SourceConfig):
            out["url"] = redact_url(obj.url)
        if isinstance(obj, Config):
            out["history_remote"] = redact_url(obj.history_remote)
        return out
    return obj
