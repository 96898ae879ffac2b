"""Reading typed settings from environment variables; every service's settings module builds on these."""

from __future__ import annotations

import os
from dataclasses import dataclass


class SettingsError(Exception):
    pass


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str, name: str) -> HostPort:
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise SettingsError(f"{name} must be HOST:PORT, got {text!r}")
        return cls(host.strip("[]"), int(port))


def env_str(name: str, default: str) -> str:
    return os.environ.get(name) or default


def env_opt(name: str) -> str | None:
    return os.environ.get(name) or None


def env_int(name: str, default: int, minimum: int = 0) -> int:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}, got {value}")
    return value


def env_hostport(name: str, default: str) -> HostPort:
    return HostPort.parse(env_str(name, default), name)


def env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = env_str(name, default)
    if value not in choices:
        raise SettingsError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value
