"""The controller's end of a host's agent (agent_main.py): started on one channel of the host's
ssh connection when it connects, it then runs every command of that host without a shell or a
session of its own. Requests carry ids and overlap; a reader thread hands each answer to its
caller. A host whose agent cannot start (no python3) runs its commands the old way."""

from __future__ import annotations

import base64
import itertools
import json
import logging
import threading
import time
import zlib
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

import paramiko

log = logging.getLogger("migrate.agent")

_SOURCE = (Path(__file__).with_name("agent_main.py")).read_text()
_BLOB = base64.b64encode(zlib.compress(_SOURCE.encode(), 9)).decode()
#: What the host runs: python3, isolated (no site, no environment), the agent's text inflated
#: from its one argument.
ARGV = [
    "python3", "-I", "-S", "-c",
    "import base64,sys,zlib;exec(zlib.decompress(base64.b64decode(sys.argv[1])))",
    _BLOB,
]  # fmt: skip


class AgentLost(Exception):
    """The agent's channel closed (its connection broke, or it died)."""


class AgentTimeout(Exception):
    """No answer in time: the agent (or its connection) is wedged."""


class Agent:
    """One agent on one host."""

    def __init__(self, channel: paramiko.Channel, host: str) -> None:
        self.channel = channel
        self.host = host
        self._ids = itertools.count(1)
        self._pending: dict[int, Future[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._dead: str | None = None
        self._ready: Future[dict[str, Any]] = Future()
        self._pending[0] = self._ready
        self.offset = 0.0  # host clock - controller clock, seconds
        self._reader = threading.Thread(target=self._read, daemon=True, name=f"agent-{host}")
        self._reader.start()

    @classmethod
    def start(
        cls, transport: paramiko.Transport, host: str, wait: float, command: str
    ) -> Agent | None:
        """Start the agent (`command`: ARGV quoted) on a fresh channel of transport; None if
        it cannot run there."""
        try:
            channel = transport.open_session(timeout=wait)
            channel.exec_command(command)
        except (OSError, EOFError, paramiko.SSHException) as e:
            log.info("%s: no agent: %s", host, e)
            return None
        agent = cls(channel, host)
        try:
            agent._ready.result(timeout=wait)
            agent.offset = agent._clock_offset(wait)
        except (FutureTimeout, AgentLost, AgentTimeout, KeyError, ValueError) as e:
            log.info("%s: no agent: %s", host, e or type(e).__name__)
            agent.close()
            return None
        return agent

    def _clock_offset(self, wait: float, tries: int = 3) -> float:
        """The host's clock minus ours, from the quickest of a few pings (its error is at
        most half that ping's round trip)."""
        best: tuple[float, float] | None = None
        for _ in range(tries):
            t0 = time.time()
            there = float(self.call("ping", wait)["time"])
            t1 = time.time()
            if best is None or t1 - t0 < best[0]:
                best = (t1 - t0, there - (t0 + t1) / 2)
        assert best is not None
        return best[1]

    @property
    def alive(self) -> bool:
        return self._dead is None and not self.channel.closed

    def call(self, op: str, wait: float, /, **args: Any) -> dict[str, Any]:
        """Send one request; its answer (an `error` key if the op failed on the host).
        AgentLost if the channel closed, AgentTimeout after `wait` seconds without answer."""
        rid = next(self._ids)
        fut: Future[dict[str, Any]] = Future()
        with self._lock:
            if self._dead is not None:
                raise AgentLost(self._dead)
            self._pending[rid] = fut
            try:
                self.channel.sendall((json.dumps({"id": rid, "op": op, **args}) + "\n").encode())
            except (OSError, EOFError, paramiko.SSHException) as e:
                self._pending.pop(rid, None)
                raise AgentLost(str(e) or type(e).__name__) from None
        try:
            return fut.result(timeout=wait)
        except FutureTimeout:
            with self._lock:
                self._pending.pop(rid, None)
            raise AgentTimeout(f"no answer from the agent on {self.host} in {wait:.0f}s") from None

    def local(self, host_time: float) -> float:
        """A host clock reading as the controller's time.monotonic()."""
        return host_time - self.offset - time.time() + time.monotonic()

    def close(self) -> None:
        try:
            self.channel.close()
        finally:
            self._fail("closed")

    def _read(self) -> None:
        try:
            stream = self.channel.makefile("rb")
            for line in stream:
                msg = json.loads(line)
                with self._lock:
                    fut = self._pending.pop(int(msg.get("id", -1)), None)
                if fut is not None:
                    fut.set_result(msg)
        except (OSError, EOFError, ValueError, paramiko.SSHException) as e:
            self._fail(f"{type(e).__name__}: {e}")
            return
        self._fail("the agent's channel closed")

    def _fail(self, why: str) -> None:
        with self._lock:
            if self._dead is None:
                self._dead = why
            pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(AgentLost(why))
