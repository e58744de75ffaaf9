"""Typed values of the daemon configuration: the secret holder and one parser per kind of value
(duration, size, port, path, list, enum...), each raising ``ConfigError`` that names where the
value came from (``file: section.key`` or the environment variable)."""

from __future__ import annotations

import re
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from reconciler.domains.render_limits import MIB
from reconciler.errors import Terminal


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


def parse_int(value: object, where: str, lo: int, hi: int) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected an integer")
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value.strip())
    if not isinstance(value, int):
        raise ConfigError(f"{where}: expected an integer")
    if not lo <= value <= hi:
        raise ConfigError(f"{where}: must be between {lo} and {hi}, got {value}")
    return value


def parse_bool(value: object, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigError(f"{where}: expected true or false")


def parse_str(value: object, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ConfigError(f"{where}: expected a string")
    text = str(value)
    if "\n" in text or "\x00" in text:
        raise ConfigError(f"{where}: must not contain a newline or NUL")
    return text


def parse_path(value: object, where: str) -> Path:
    text = parse_str(value, where)
    if not text:
        raise ConfigError(f"{where}: must not be empty")
    return Path(text).expanduser()


def parse_opt_path(value: object, where: str) -> Path | None:
    if value is None or value == "":
        return None
    return parse_path(value, where)


def parse_enum(cls: type[E], value: object, where: str) -> E:
    text = parse_str(value, where).strip().lower()
    try:
        return cls(text)
    except ValueError:
        choices = ", ".join(m.value for m in cls)
        raise ConfigError(f"{where}: expected one of {choices}, got {text!r}") from None


def parse_list(value: object, where: str) -> tuple[str, ...]:
    if isinstance(value, str):  # environment form: comma separated
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if isinstance(value, list):
        return tuple(parse_str(v, f"{where}[{i}]") for i, v in enumerate(value))
    raise ConfigError(f"{where}: expected a list")


def parse_secret(value: object, where: str) -> Secret:
    if value is None:
        return Secret("")
    return Secret(parse_str(value, where))


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


def sized(lo: int, hi: int) -> Parser:
    def parse(value: object, where: str) -> int:
        n = parse_size(value, where)
        if not lo <= n <= hi:
            raise ConfigError(f"{where}: must be between {lo // MIB} MiB and {hi // MIB} MiB" if lo >= MIB
                              else f"{where}: must be between {lo} and {hi} bytes")  # fmt: skip
        return n

    return parse


def positive_duration(value: object, where: str) -> float:
    seconds = parse_duration(value, where)
    if seconds <= 0:
        raise ConfigError(f"{where}: must be more than 0")
    return seconds


def parse_port(value: object, where: str) -> int:
    return parse_int(value, where, 0, 65535)


def parse_positive_int(value: object, where: str) -> int:
    return parse_int(value, where, 1, 10_000)


def parse_body_size(value: object, where: str) -> int:
    return parse_int(value, where, 1024, 256 << 20)


def parse_log_level(value: object, where: str) -> str:
    text = parse_str(value, where).upper()
    if text not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
        raise ConfigError(f"{where}: expected DEBUG, INFO, WARNING, ERROR or CRITICAL")
    return text


def parse_opt_bool(value: object, where: str) -> bool | None:
    if value is None or value == "" or value == "auto":
        return None
    return parse_bool(value, where)


Parser = Callable[[object, str], Any]
