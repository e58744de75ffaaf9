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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

import yaml

from reconciler.domains.render_limits import MIB, RenderLimits
from reconciler.errors import Terminal

MAX_CONFIG_BYTES = 1 << 20
ENV_PREFIX = "RECONCILER_"


class ConfigError(Terminal):
    """The configuration is invalid; the message names the file or variable and the field."""


class Secret:
    """A secret string that never shows itself in repr/str/logs."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('***')" if self._value else "Secret('')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))


class VerifyMode(StrEnum):
    NONE = "none"  # no signature check (not recommended outside a lab)
    SSH = "ssh"  # SSH signatures checked against an allowed-signers file
    OPENPGP = "openpgp"  # OpenPGP signatures checked against a keyring of allowed public keys


class RunMode(StrEnum):
    APPLY = "apply"  # converge hosts
    PLAN = "plan"  # observe and plan only; never change a host


class SmtpSecurity(StrEnum):
    NONE = "none"
    STARTTLS = "starttls"
    TLS = "tls"


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

    def redacted(self) -> dict[str, Any]:
        """A JSON-able view with every secret replaced by whether it is set."""
        out: dict[str, Any] = _redact(self)
        return out


# ---------------------------------------------------------------- parsing helpers

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
E = TypeVar("E", bound=StrEnum)


def parse_duration(value: object, where: str) -> float:
    """Seconds from 30, 2.5, "30s", "5m", "1h", "1d", "250ms"."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a duration such as 30s, 5m or 1h, got a boolean")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        m = _DURATION.match(value)
        if not m:
            raise ConfigError(f"{where}: expected a duration such as 30s, 5m or 1h, got {value!r}")
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ConfigError(f"{where}: expected a duration such as 30s, 5m or 1h")
    if seconds < 0:
        raise ConfigError(f"{where}: must not be negative")
    return seconds


def _parse_int(value: object, where: str, lo: int, hi: int) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected an integer")
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value.strip())
    if not isinstance(value, int):
        raise ConfigError(f"{where}: expected an integer")
    if not lo <= value <= hi:
        raise ConfigError(f"{where}: must be between {lo} and {hi}, got {value}")
    return value


def _parse_bool(value: object, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigError(f"{where}: expected true or false")


def _parse_str(value: object, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ConfigError(f"{where}: expected a string")
    text = str(value)
    if "\n" in text or "\x00" in text:
        raise ConfigError(f"{where}: must not contain a newline or NUL")
    return text


def _parse_path(value: object, where: str) -> Path:
    text = _parse_str(value, where)
    if not text:
        raise ConfigError(f"{where}: must not be empty")
    return Path(text).expanduser()


def _parse_opt_path(value: object, where: str) -> Path | None:
    if value is None or value == "":
        return None
    return _parse_path(value, where)


def _parse_enum(cls: type[E], value: object, where: str) -> E:
    text = _parse_str(value, where).strip().lower()
    try:
        return cls(text)
    except ValueError:
        choices = ", ".join(m.value for m in cls)
        raise ConfigError(f"{where}: expected one of {choices}, got {text!r}") from None


def _parse_list(value: object, where: str) -> tuple[str, ...]:
    if isinstance(value, str):  # environment form: comma separated
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if isinstance(value, list):
        return tuple(_parse_str(v, f"{where}[{i}]") for i, v in enumerate(value))
    raise ConfigError(f"{where}: expected a list")


def _parse_secret(value: object, where: str) -> Secret:
    if value is None:
        return Secret("")
    return Secret(_parse_str(value, where))


_SIZE = re.compile(r"^\s*(\d+)\s*([KMG]i?B?|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(value: object, where: str) -> int:
    """Bytes from 1048576, "1M", "1MiB", "512m", "2G" (binary units)."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a size such as 1MiB, 512M or 2G")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            unit = (m.group(2) or "").lower()[:1]
            return int(m.group(1)) * _SIZE_UNITS[unit]
    raise ConfigError(f"{where}: expected a size such as 1MiB, 512M or 2G, got {value!r}")


def _sized(lo: int, hi: int) -> Parser:
    def parse(value: object, where: str) -> int:
        n = parse_size(value, where)
        if not lo <= n <= hi:
            raise ConfigError(f"{where}: must be between {lo // MIB} MiB and {hi // MIB} MiB" if lo >= MIB
                              else f"{where}: must be between {lo} and {hi} bytes")  # fmt: skip
        return n

    return parse


def _positive_duration(value: object, where: str) -> float:
    seconds = parse_duration(value, where)
    if seconds <= 0:
        raise ConfigError(f"{where}: must be more than 0")
    return seconds


def _parse_port(value: object, where: str) -> int:
    return _parse_int(value, where, 0, 65535)


def _parse_positive_int(value: object, where: str) -> int:
    return _parse_int(value, where, 1, 10_000)


def _parse_body_size(value: object, where: str) -> int:
    return _parse_int(value, where, 1024, 256 << 20)


def _parse_log_level(value: object, where: str) -> str:
    text = _parse_str(value, where).upper()
    if text not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
        raise ConfigError(f"{where}: expected DEBUG, INFO, WARNING, ERROR or CRITICAL")
    return text


def _parse_opt_bool(value: object, where: str) -> bool | None:
    if value is None or value == "" or value == "auto":
        return None
    return _parse_bool(value, where)


Parser = Callable[[object, str], Any]

_SOURCE: dict[str, Parser] = {
    "url": _parse_str,
    "branch": _parse_str,
    "poll_interval": parse_duration,
    "verify": lambda v, w: _parse_enum(VerifyMode, v, w),
    "allowed_signers": _parse_opt_path,
    "openpgp_keys": _parse_opt_path,
    "signed_after": _parse_str,
    "ssh_key": _parse_opt_path,
    "ssh_known_hosts": _parse_opt_path,
    "fetch_timeout": parse_duration,
}
_SERVER: dict[str, Parser] = {
    "listen": _parse_str,
    "port": _parse_port,
    "webhook_secret": _parse_secret,
    "gitlab_token": _parse_secret,
    "sync_token": _parse_secret,
    "read_token": _parse_secret,
    "metrics_token": _parse_secret,
    "public_status": _parse_bool,
    "max_body_bytes": _parse_body_size,
}
_RENDER: dict[str, Parser] = {
    "timeout": _positive_duration,
    "memory": _sized(128 * MIB, 64 << 30),
    "max_file_bytes": _sized(1024, 1 << 30),
    "max_host_bytes": _sized(1024, 8 << 30),
}
_SSH: dict[str, Parser] = {
    "known_hosts": _parse_opt_path,
    "identity": lambda v, w: tuple(Path(p).expanduser() for p in _parse_list(v, w)),
    "connect_timeout": parse_duration,
    "command_timeout": parse_duration,
    "netns": _parse_str,
}
_SMTP: dict[str, Parser] = {
    "host": _parse_str,
    "port": _parse_port,
    "security": lambda v, w: _parse_enum(SmtpSecurity, v, w),
    "username": _parse_str,
    "password": _parse_secret,
    "sender": _parse_str,
    "to": _parse_list,
    "timeout": parse_duration,
}
_SHARD: dict[str, Parser] = {
    "replicas": lambda v, w: _parse_int(v, w, 1, 1000),
    "name": _parse_str,
    "peer_url": _parse_str,
    "peer_timeout": _positive_duration,
}
_TOP: dict[str, Parser] = {
    "state_dir": _parse_path,
    "history_repo": _parse_opt_path,
    "concurrency": _parse_positive_int,
    "drift_interval": lambda v, w: None if v is None or v == "" else parse_duration(v, w),
    "mode": lambda v, w: _parse_enum(RunMode, v, w),
    "shutdown_grace": parse_duration,
    "backoff_base": parse_duration,
    "backoff_max": parse_duration,
    "log_level": _parse_log_level,
    "log_json": _parse_opt_bool,
    "adopt": _parse_list,
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


# ---------------------------------------------------------------- YAML with duplicate-key check


class _UniqueKeyLoader(yaml.SafeLoader):
    pass


def _construct_mapping(
    loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False
) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"{loader.name}:{key_node.start_mark.line + 1}: duplicate key {key!r}")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: config file larger than {MAX_CONFIG_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: config file is not UTF-8") from None
    loader = _UniqueKeyLoader(text)
    loader.name = str(path)
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else 0
        raise ConfigError(f"{path}:{line}: invalid YAML: {exc.problem}") from None
    except yaml.YAMLError:
        raise ConfigError(f"{path}: invalid YAML") from None
    finally:
        loader.dispose()
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
        return out
    return obj


def redact_url(url: str) -> str:
    """Drop any ``user:password@`` from a URL before it is shown or logged."""
    return re.sub(r"^(https?://)[^/@]*@", r"\1***@", url)
