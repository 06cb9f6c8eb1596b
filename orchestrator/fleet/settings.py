"""The `temporal:` section of migrate.yaml (validated here; pure, no temporalio import).

temporal:
  address: temporal.example.net:7233   # the engine (HOST:PORT); `--temporal ADDR` overrides
  namespace: default
  task_queue: migrate
  heartbeat_timeout: 10      # seconds without a worker's heartbeat before another takes over
  max_attempts: 5            # activity attempts (a retry first settles the previous one)
  connect_timeout: 5         # seconds to reach the engine before giving up (exit 2)
  tls:                       # optional; `tls: true` uses the system's CAs
    ca: /etc/migrate/temporal-ca.pem
    cert: /etc/migrate/client.pem
    key: /etc/migrate/client.key
    server_name: temporal.example.net
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.errors import MigrationError


class SettingsError(MigrationError):
    """A bad `temporal:` section (the config loader turns it into a ConfigError)."""


ADDRESS_RE = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


@dataclass(frozen=True)
class TLSSettings:
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None


@dataclass(frozen=True)
class TemporalSettings:
    address: str | None = None
    namespace: str = "default"
    task_queue: str = "migrate"
    heartbeat_timeout: float = 10.0
    max_attempts: int = 5
    connect_timeout: float = 5.0
    tls: TLSSettings | None = None


KEYS = ("address", "namespace", "task_queue", "heartbeat_timeout", "max_attempts",
        "connect_timeout", "tls")  # fmt: skip
TLS_KEYS = ("ca", "cert", "key", "server_name")


def check_address(address: str, where: str) -> str:
    m = ADDRESS_RE.match(address)
    if not m or not 0 < int(m.group(2)) < 65536:
        raise SettingsError(f"{where}: {address!r} is not HOST:PORT (e.g. 127.0.0.1:7233)")
    return address


def parse(raw: Any, path: Path | str) -> TemporalSettings:
    """Validate the section; one-line SettingsError naming the key and the file."""
    where = f"{path}: temporal"
    if raw is None:
        return TemporalSettings()
    if not isinstance(raw, dict):
        raise SettingsError(f"{where}: must be a mapping")
    for k in raw:
        if k not in KEYS:
            raise SettingsError(f"{where}.{k}: unknown key (expected one of {', '.join(KEYS)})")
    values: dict[str, Any] = {}
    for key in ("address", "namespace", "task_queue"):
        if key in raw:
            if not isinstance(raw[key], str) or not raw[key].strip():
                raise SettingsError(f"{where}.{key}: must be a non-empty string")
            values[key] = raw[key].strip()
    if "address" in values:
        check_address(values["address"], f"{where}.address")
    for key, lo, hi in (("heartbeat_timeout", 1, 3600), ("connect_timeout", 0.5, 300)):
        if key in raw:
            v = raw[key]
            if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
                raise SettingsError(f"{where}.{key}: must be a number of seconds in {lo}..{hi}")
            values[key] = float(v)
    if "max_attempts" in raw:
        v = raw["max_attempts"]
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 100:
            raise SettingsError(f"{where}.max_attempts: must be an integer in 1..100")
        values["max_attempts"] = v
    if "tls" in raw:
        values["tls"] = _tls(raw["tls"], where)
    return TemporalSettings(**values)


def _tls(raw: Any, where: str) -> TLSSettings | None:
    if raw is False or raw is None:
        return None
    if raw is True:
        return TLSSettings()
    if not isinstance(raw, dict):
        raise SettingsError(f"{where}.tls: must be true, false or a mapping of {TLS_KEYS}")
    for k, v in raw.items():
        if k not in TLS_KEYS:
            raise SettingsError(
                f"{where}.tls.{k}: unknown key (expected one of {', '.join(TLS_KEYS)})"
            )
        if not isinstance(v, str) or not v:
            raise SettingsError(f"{where}.tls.{k}: must be a non-empty string")
    if bool(raw.get("cert")) != bool(raw.get("key")):
        raise SettingsError(f"{where}.tls: cert and key go together (give both or neither)")
    return TLSSettings(**raw)
