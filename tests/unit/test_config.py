"""Daemon configuration: YAML file, environment overrides, typed values, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.daemon.config import (
    ConfigError,
    HistoryBranches,
    RunMode,
    Secret,
    SmtpSecurity,
    VerifyMode,
    all_settings,
    env_name,
    load_config,
    parse_duration,
    require_runnable,
)

FULL = """\
source:
  url: ssh://git@git.example.org/ops/fleet.git
  branch: production
  poll_interval: 2m
  verify: ssh
  allowed_signers: /etc/reconciler/allowed_signers
  ssh_key: /etc/reconciler/deploy_key
  ssh_known_hosts: /etc/reconciler/git_known_hosts
server:
  listen: 0.0.0.0
  port: 9090
  webhook_secret: file-secret
  max_body_bytes: 2097152
ssh:
  known_hosts: /etc/reconciler/known_hosts
  identity: [/etc/reconciler/id_ed25519]
smtp:
  host: mail.example.org
  port: 587
  security: starttls
  username: reconciler
  password: smtp-pass-in-file
  sender: reconciler@example.org
  to: [ops@example.org, sec@example.org]
state_dir: /var/lib/reconciler
history_repo: /var/lib/reconciler/etc-history
concurrency: 20
drift_interval: 1h
mode: plan
shutdown_grace: 45s
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "reconciler.yaml"
    p.write_text(text)
    return p


def test_defaults_without_file_or_env() -> None:
    cfg = load_config(None, {})
    assert cfg.source.branch == "main" and cfg.source.verify is VerifyMode.NONE
    assert cfg.server.listen == "127.0.0.1" and cfg.mode is RunMode.APPLY
    assert cfg.history_dir == cfg.state_dir / "history"
    with pytest.raises(ConfigError, match="source.url"):
        require_runnable(cfg)


def test_full_file_is_typed(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, FULL), {})
    assert cfg.source.poll_interval == 120.0
    assert cfg.source.verify is VerifyMode.SSH
    assert cfg.source.allowed_signers == Path("/etc/reconciler/allowed_signers")
    assert cfg.server.port == 9090 and cfg.server.webhook_secret.reveal() == "file-secret"
    assert cfg.ssh.identity == (Path("/etc/reconciler/id_ed25519"),)
    assert cfg.smtp.security is SmtpSecurity.STARTTLS and cfg.smtp.to == (
        "ops@example.org",
        "sec@example.org",
    )
    assert cfg.concurrency == 20 and cfg.drift_interval == 3600.0 and cfg.mode is RunMode.PLAN
    assert cfg.history_dir == Path("/var/lib/reconciler/etc-history")
    assert cfg.shutdown_grace == 45.0


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    env = {
        "RECONCILER_SOURCE_BRANCH": "main",
        "RECONCILER_SERVER_PORT": "8181",
        "RECONCILER_SMTP_TO": "a@example.org, b@example.org",
        "RECONCILER_MODE": "APPLY",
        "RECONCILER_DRIFT_INTERVAL": "0",
        "RECONCILER_SSH_IDENTITY": "/k1,/k2",
        "RECONCILER_LOG_JSON": "true",
    }
    cfg = load_config(write(tmp_path, FULL), env)
    assert cfg.source.branch == "main" and cfg.server.port == 8181
    assert cfg.smtp.to == ("a@example.org", "b@example.org")
    assert cfg.mode is RunMode.APPLY and cfg.drift_interval == 0.0
    assert cfg.ssh.identity == (Path("/k1"), Path("/k2"))
    assert cfg.log_json is True
    assert cfg.source.url.startswith("ssh://")  # untouched settings come from the file


def test_every_setting_has_an_env_variable() -> None:
    names = all_settings()
    assert "source.url" in names and "smtp.password" in names and "state_dir" in names
    assert env_name("source.poll_interval") == "RECONCILER_SOURCE_POLL_INTERVAL"
    assert env_name("state_dir") == "RECONCILER_STATE_DIR"


def test_history_branches_default_to_one_per_host_when_sharded() -> None:
    assert load_config(None, {}).history_push_branches is HistoryBranches.MAIN
    sharded = {"RECONCILER_SHARD_REPLICAS": "3", "RECONCILER_SHARD_NAME": "reconciler-0"}
    assert load_config(None, sharded).history_push_branches is HistoryBranches.HOST
    chosen = load_config(None, {**sharded, "RECONCILER_HISTORY_BRANCHES": "main"})
    assert chosen.history_push_branches is HistoryBranches.MAIN
    one = load_config(None, {"RECONCILER_HISTORY_BRANCHES": "host"})
    assert one.history_push_branches is HistoryBranches.HOST and one.redacted()["history_branches"] == "host"


def test_config_path_from_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "source:\n  url: file:///srv/fleet\n")
    cfg = load_config(None, {"RECONCILER_CONFIG": str(path)})
    assert cfg.source.url == "file:///srv/fleet"


def test_secret_files_for_containers(tmp_path: Path) -> None:
    (tmp_path / "hook").write_text("from-a-file\n")
    cfg = load_config(None, {"RECONCILER_SERVER_WEBHOOK_SECRET_FILE": str(tmp_path / "hook")})
    assert cfg.server.webhook_secret.reveal() == "from-a-file"
    with pytest.raises(ConfigError, match="both set"):
        load_config(
            None,
            {
                "RECONCILER_SERVER_WEBHOOK_SECRET": "x",
                "RECONCILER_SERVER_WEBHOOK_SECRET_FILE": str(tmp_path / "hook"),
            },
        )
    with pytest.raises(ConfigError, match="RECONCILER_SMTP_PASSWORD_FILE"):
        load_config(None, {"RECONCILER_SMTP_PASSWORD_FILE": str(tmp_path / "missing")})


def test_secrets_never_show(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, FULL), {"RECONCILER_SERVER_SYNC_TOKEN": "sync-canary"})
    shown = repr(cfg) + str(cfg.redacted())
    for secret in ("file-secret", "smtp-pass-in-file", "sync-canary"):
        assert secret not in shown
    assert cfg.redacted()["server"]["webhook_secret"] == {"set": True}
    assert repr(Secret("x")) == "Secret('***')"


def test_url_credentials_are_redacted() -> None:
    cfg = load_config(None, {"RECONCILER_SOURCE_URL": "https://deploy:tok3n@git.example.org/fleet.git"})
    assert "tok3n" not in str(cfg.redacted())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("source:\n  url: x\n  url: y\n", "duplicate key 'url'"),
        ("sourc:\n  url: x\n", "sourc: unknown setting"),
        ("source:\n  urll: x\n", "source.urll: unknown setting"),
        ("server:\n  port: 70000\n", "server.port: must be between 0 and 65535"),
        ("server:\n  port: eighty\n", "server.port: expected an integer"),
        ("source:\n  poll_interval: soon\n", "source.poll_interval: expected a duration"),
        ("source:\n  verify: gpg\n", "source.verify: expected one of none, ssh, openpgp"),
        ("source:\n  verify: ssh\n", "source.allowed_signers: required"),
        ("source:\n  url: ftp://x/y\n", "source.url"),
        ("source:\n  branch: ../etc\n", "source.branch"),
        ("mode: yolo\n", "mode: expected one of apply, plan"),
        ("concurrency: 0\n", "concurrency: must be between 1"),
        ("- a\n- b\n", "must be a mapping"),
        ("source: [\n", "invalid YAML"),
        ('smtp:\n  sender: "a\\nb"\n', "newline"),
        ("history_remote: --receive-pack=touch /tmp/x\n", "history_remote: expected file://"),
        ("history_remote: ftp://h/x\n", "history_remote: expected file://"),
        ("history_branches: hosts\n", "history_branches: expected one of main, host"),
    ],
)
def test_bad_values_name_the_file_and_field(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path, {})
    assert message in str(err.value)
    assert str(path) in str(err.value) or "source." in str(err.value)


def test_bad_env_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="RECONCILER_SERVER_PORT: expected an integer"):
        load_config(None, {"RECONCILER_SERVER_PORT": "http"})


def test_missing_or_non_utf8_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml", {})
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        load_config(bad, {})


def test_yaml_python_tags_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "state_dir: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError):
        load_config(path, {})


def test_durations() -> None:
    assert parse_duration("250ms", "x") == 0.25
    assert parse_duration("1d", "x") == 86400
    assert parse_duration(5, "x") == 5.0
    with pytest.raises(ConfigError):
        parse_duration(-1, "x")
    with pytest.raises(ConfigError):
        parse_duration(True, "x")


def test_render_limits(tmp_path: Path) -> None:
    text = "render:\n  timeout: 15s\n  memory: 1G\n  max_file_bytes: 2MiB\n  max_host_bytes: 32m\n"
    cfg = load_config(write(tmp_path, text), {"RECONCILER_RENDER_TIMEOUT": "10"})
    assert cfg.render.timeout == 10.0 and cfg.render.memory == 1 << 30
    assert cfg.render.max_file_bytes == 2 << 20 and cfg.render.max_host_bytes == 32 << 20
    defaults = load_config(None, {}).render
    assert (defaults.timeout, defaults.memory, defaults.max_file_bytes, defaults.max_host_bytes) == (
        20.0, 512 << 20, 1 << 20, 16 << 20,
    )  # fmt: skip
    for env, message in (
        ({"RECONCILER_RENDER_MEMORY": "64M"}, "RECONCILER_RENDER_MEMORY: must be between 128 MiB"),
        ({"RECONCILER_RENDER_MEMORY": "lots"}, "expected a size such as 1MiB"),
        ({"RECONCILER_RENDER_TIMEOUT": "0"}, "RECONCILER_RENDER_TIMEOUT: must be more than 0"),
        ({"RECONCILER_RENDER_MAX_FILE_BYTES": "4M", "RECONCILER_RENDER_MAX_HOST_BYTES": "2M"},
         "render.max_host_bytes: must be at least render.max_file_bytes"),
    ):  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            load_config(None, env)


@pytest.mark.parametrize("listen", ["0.0.0.0", "::", "192.0.2.10", "reconciler.example.org"])
def test_beyond_loopback_a_read_token_is_required(listen: str) -> None:
    env = {"RECONCILER_SOURCE_URL": "file:///srv/fleet", "RECONCILER_SERVER_LISTEN": listen}
    with pytest.raises(ConfigError, match=r"server.read_token: required when server.listen is") as err:
        require_runnable(load_config(None, env))
    assert "RECONCILER_SERVER_READ_TOKEN" in str(err.value) and "public_status" in str(err.value)
    require_runnable(load_config(None, {**env, "RECONCILER_SERVER_READ_TOKEN": "r"}))
    require_runnable(load_config(None, {**env, "RECONCILER_SERVER_PUBLIC_STATUS": "true"}))


@pytest.mark.parametrize("listen", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_loopback_needs_no_read_token(listen: str) -> None:
    cfg = load_config(
        None, {"RECONCILER_SOURCE_URL": "file:///srv/fleet", "RECONCILER_SERVER_LISTEN": listen}
    )
    require_runnable(cfg)
    assert cfg.server.loopback


def test_read_and_metrics_tokens_are_secrets(tmp_path: Path) -> None:
    (tmp_path / "read").write_text("read-canary\n")
    cfg = load_config(
        None,
        {
            "RECONCILER_SERVER_READ_TOKEN_FILE": str(tmp_path / "read"),
            "RECONCILER_SERVER_METRICS_TOKEN": "m-canary",
        },
    )
    assert cfg.server.read_token.reveal() == "read-canary" and cfg.server.metrics_token.reveal() == "m-canary"
    shown = repr(cfg) + str(cfg.redacted())
    assert "read-canary" not in shown and "m-canary" not in shown


LAUGHS = "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 10 if p else ['x'] * 10)}]\n"
    for p, n in zip(["", "a", "b", "c", "d"], ["a", "b", "c", "d", "e"], strict=True)
)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # the fleet's loader (fleet/yamlsafe.py) reads the config too: its caps and refusals hold
        (LAUGHS, "invalid YAML"),
        ("source: {<<: {url: file:///x}}\n", "invalid YAML"),
        ("mode: plan\n---\nmode: apply\n", "one YAML document expected"),
        ("source:\n  url: x\n  url: y\n", "first at line 2"),
    ],
)
def test_config_yaml_is_read_by_the_fleet_loader(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path, {})
    assert message in str(err.value) and str(path) in str(err.value)


def test_one_smtp_security_enum() -> None:
    from reconciler.daemon import config
    from reconciler.fleet import model

    assert config.SmtpSecurity is model.SmtpSecurity
