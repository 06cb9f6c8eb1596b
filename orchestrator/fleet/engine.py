"""Reaching the engine: the address, namespace, task queue and TLS from the config and flags.

An engine that cannot be reached is a usage-class error (exit 2) naming its address, raised
before any host is touched."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from pathlib import Path

from temporalio.client import Client
from temporalio.service import TLSConfig

from orchestrator.config import Config, ConfigError
from orchestrator.fleet.settings import SettingsError, TemporalSettings, check_address


class Unreachable(ConfigError):
    """The engine did not answer (exit 2)."""


@dataclass(frozen=True)
class Engine:
    settings: TemporalSettings

    @property
    def address(self) -> str:
        assert self.settings.address
        return self.settings.address

    @property
    def task_queue(self) -> str:
        return self.settings.task_queue


def resolve(
    config: Config | None,
    address: str | None,
    namespace: str | None = None,
    task_queue: str | None = None,
) -> Engine:
    """Flags over the config's `temporal:` section; ConfigError if no address is known."""
    base = (config.temporal if config is not None else None) or TemporalSettings()
    s = base
    if address:
        try:
            check_address(address, "--temporal")
        except SettingsError as e:
            raise ConfigError(str(e)) from None
        s = replace(s, address=address)
    if namespace:
        s = replace(s, namespace=namespace)
    if task_queue:
        s = replace(s, task_queue=task_queue)
    if not s.address:
        where = f" or temporal.address in {config.path}" if config is not None else ""
        raise ConfigError(f"no engine address: give --temporal HOST:PORT{where}")
    return Engine(s)


def _tls(s: TemporalSettings) -> TLSConfig | bool:
    if s.tls is None:
        return False

    def read(path: str | None, what: str) -> bytes | None:
        if not path:
            return None
        try:
            return Path(path).read_bytes()
        except OSError as e:
            raise ConfigError(f"temporal.tls.{what}: cannot read {path}: {e.strerror}") from None

    return TLSConfig(
        server_root_ca_cert=read(s.tls.ca, "ca"),
        client_cert=read(s.tls.cert, "cert"),
        client_private_key=read(s.tls.key, "key"),
        domain=s.tls.server_name,
    )


async def connect(engine: Engine) -> Client:
    """A client of the engine, or Unreachable (one line, with the address) within
    connect_timeout seconds."""
    s = engine.settings
    try:
        return await asyncio.wait_for(
            Client.connect(engine.address, namespace=s.namespace, tls=_tls(s)),
            timeout=s.connect_timeout,
        )
    except ConfigError:
        raise
    except TimeoutError:
        raise Unreachable(
            f"the engine at {engine.address} did not answer within {s.connect_timeout:g} s "
            "(is the Temporal server running there?)"
        ) from None
    except Exception as e:  # the SDK's RuntimeError/RPCError: connection refused, bad TLS, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise Unreachable(f"cannot reach the engine at {engine.address}: {first[:200]}") from None
