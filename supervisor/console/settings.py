"""The `[console]` config section. Standard library only: the daemon parses it without the
console's optional dependencies installed.

Config (every key optional)::

    [console]
    enabled = false                 # true: the daemon serves the console too, in its task group
    listen = "127.0.0.1:8787"       # loopback by default; `acp-supervisor console --listen` wins
    operators_file = "..."          # default: <state_dir>/console-operators.json (written 0600)
    session_ttl = "8h"              # a login lasts this long, then the operator logs in again
    tls_cert = "/etc/acp-supervisor/console.crt"   # both or neither: serve HTTPS directly
    tls_key = "/etc/acp-supervisor/console.key"
    login_attempts = 5              # failed logins per client and per name ...
    login_window = "5m"             # ... within this window, before logins are refused (429)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..configparse import check_keys, nonempty_str, parse_duration, table, type_name
from ..errors import ConfigError
from ..schema import keys

_KEYS = keys("console")
DEFAULT_LISTEN = "127.0.0.1:8787"
OPERATORS_FILE = "console-operators.json"


def parse_listen(value: str, where: str = "console.listen") -> tuple[str, int]:
    """`HOST:PORT` (IPv6 as `[::1]:8787`) into (host, port); ConfigError names the problem."""
    host, sep, port_text = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{where}: expected HOST:PORT (like 127.0.0.1:8787), got {value!r}")
    return host, int(port_text)


@dataclass(frozen=True, slots=True)
class ConsoleConfig:
    enabled: bool = False
    listen: str = DEFAULT_LISTEN
    operators_file: str | None = None
    session_ttl: float = 8 * 3600.0
    tls_cert: str | None = None
    tls_key: str | None = None
    login_attempts: int = 5
    login_window: float = 300.0

    def operators_path(self, state_dir: Path) -> Path:
        return Path(self.operators_file) if self.operators_file else state_dir / OPERATORS_FILE

    @classmethod
    def from_config(cls, section: Mapping[str, Any] | None) -> ConsoleConfig:
        if section is None:
            return cls()
        section = table(section, "console")
        check_keys(section, _KEYS, "console")
        d = cls()
        enabled = section.get("enabled", d.enabled)
        if not isinstance(enabled, bool):
            raise ConfigError(f"console.enabled: expected a boolean, got {type_name(enabled)}")
        listen = nonempty_str(section.get("listen", d.listen), "console.listen")
        parse_listen(listen)
        paths: dict[str, str | None] = {}
        for key in ("operators_file", "tls_cert", "tls_key"):
            value = section.get(key)
            paths[key] = None if value is None else nonempty_str(value, f"console.{key}")
        if (paths["tls_cert"] is None) != (paths["tls_key"] is None):
            raise ConfigError(
                "console.tls_cert and console.tls_key go together: give both or neither"
            )
        attempts = section.get("login_attempts", d.login_attempts)
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise ConfigError(
                f"console.login_attempts: expected a whole number >= 1, got {attempts!r}"
            )
        ttl = parse_duration(section.get("session_ttl", d.session_ttl), "console.session_ttl")
        window = parse_duration(section.get("login_window", d.login_window), "console.login_window")
        if ttl <= 0 or window <= 0:
            raise ConfigError("console.session_ttl and console.login_window must be positive")
        return cls(enabled=enabled, listen=listen, operators_file=paths["operators_file"],
                   session_ttl=ttl, tls_cert=paths["tls_cert"], tls_key=paths["tls_key"],
                   login_attempts=attempts, login_window=window)  # fmt: skip
