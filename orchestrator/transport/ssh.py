"""One host = one persistent SSH connection (Fabric/paramiko), strict host keys, quoted argv."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import logging
import shlex
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar, cast

import paramiko
from fabric import Config as FabricConfig
from fabric import Connection
from invoke.exceptions import CommandTimedOut
from tenacity import (
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
)
from tenacity import Retrying as _Retrying

from orchestrator.config import HostConfig, Policy
from orchestrator.errors import MigrationError
from orchestrator.transport.agent import ARGV as AGENT_ARGV
from orchestrator.transport.agent import Agent, AgentLost, AgentTimeout

_T = TypeVar("_T")
log = logging.getLogger("migrate.ssh")
cmd_log = logging.getLogger("migrate.command")  # -v: one line per remote command


class HostError(MigrationError):
    """A host could not be reached or a command could not be run on it."""


class HostKeyError(HostError):
    """The host's key is unknown or has changed: refused under strict checking."""


class _Transient(HostError):
    """A connection failure that may pass (refused, timed out, unreachable)."""


class _Lost(HostError):
    """The connection broke while a command ran (it may or may not have run)."""


@dataclass
class Result:
    """What one remote command did."""

    host: str
    argv: list[str]
    exit_code: int
    stdout: str = ""
    stderr: str = ""
    dry: bool = False
    # When the command's process started and ended, on the controller's time.monotonic()
    # (stamped on the host by its agent; None without one).
    started: float | None = None
    ended: float | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def command(self) -> str:
        return quote(self.argv)

    def error_line(self) -> str:
        """The most telling line of the output, for one-line reports."""
        lines = [ln.strip() for ln in (self.stderr or self.stdout).splitlines() if ln.strip()]
        return lines[-1] if lines else f"exit code {self.exit_code}"


LOCK_BUSY = 75
STALE_LOCK_WAIT = 15.0  # seconds for a dropped connection's lock holder to let go
# Take the lock without waiting, say who holds it, then hold it until stdin (the channel) closes.
_LOCK = (
    'mkdir -p -m 0700 -- "$(dirname -- "$1")" && exec flock -n -E 75 "$1" '
    'sh -c \'printf "%s\\n" "$2" > "$1" && echo locked && exec cat >/dev/null\' sh "$1" "$2"'
)


UNLOCK_WAIT = 10  # seconds


class LockBusy(HostError):
    """Another migration holds the workload's lock (`holder`: what it wrote into it)."""

    def __init__(self, message: str, holder: str = "unknown") -> None:
        super().__init__(message)
        self.holder = holder


@dataclass
class RemoteLock:
    """A workload's lock on a host: an flock held by the host's agent (while it lives), or,
    without one, by a remote `flock ... cat` on one channel of the connection (while that
    channel lives). Either way it ends with the controller's connection."""

    channel: paramiko.Channel | None
    path: str
    host: Host | None = None
    holder: str = ""
    agent: Agent | None = None

    def held(self) -> bool:
        """Whether what holds the lock still lives (a dropped connection, even one the host
        has since reconnected, has lost it)."""
        if self.agent is not None:
            return self.agent.alive
        ch = self.channel
        if ch is None:
            return False
        transport = ch.get_transport() if hasattr(ch, "get_transport") else None
        alive = transport is not None and transport.is_active()
        return alive and not ch.closed and not ch.exit_status_ready()

    def ensure(self) -> bool:
        """Hold the lock: True if it had been lost and is taken again; LockBusy (another
        migration took it) or HostError if it cannot be."""
        if self.held() or self.host is None:
            return False
        self.release()
        deadline = time.monotonic() + STALE_LOCK_WAIT
        while True:
            try:
                again = self.host.lock(self.path, self.holder)
                self.channel, self.agent = again.channel, again.agent
                return True
            except LockBusy as e:
                # Our own old holder may take a moment to see its connection gone and let go.
                if self.holder not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def release(self) -> None:
        if self.agent is not None:
            if self.agent.alive:
                try:
                    self.agent.call("unlock", UNLOCK_WAIT, path=self.path)
                except (AgentLost, AgentTimeout):
                    pass  # gone with its agent
            return
        if self.channel is not None:
            self.channel.close()


def quote(argv: Sequence[str]) -> str:
    """The one place an argument list becomes a shell line."""
    return shlex.join(str(a) for a in argv)


def retrying(
    policy: Policy,
    what: str,
    on: tuple[type[BaseException], ...],
    notes: list[str] | None = None,
) -> _Retrying:
    """tenacity policy for steps that are safe to repeat: attempts and a deadline, each logged
    (and noted in `notes`, which reach the report)."""

    def _log(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        msg = f"{what} failed (attempt {state.attempt_number}): {exc}; retrying"
        log.warning("%s", msg)
        if notes is not None:
            notes.append(msg)

    return _Retrying(
        stop=stop_after_attempt(max(1, policy.retries)) | stop_after_delay(policy.retry_deadline),
        wait=wait_exponential(multiplier=0.5, max=10),
        retry=retry_if_exception_type(on),
        before_sleep=_log,
        reraise=True,
    )


@dataclass
class Host:
    """A remote host reached over one reused SSH connection.

    In dry-run mode, commands marked as changing something are recorded in `planned`
    instead of run; read-only commands still run so the plan shows real pids and paths.
    """

    config: HostConfig
    policy: Policy
    dry_run: bool = False
    planned: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # retries and the like, for the report
    #: A view made by share(): close() leaves the connection to the Host it was made from.
    shared: bool = False
    _wire: _Wire = field(default_factory=lambda: _Wire(), repr=False)
    _recording: threading.local = field(default_factory=threading.local, repr=False)

    @property
    def name(self) -> str:
        return self.config.name

    def __str__(self) -> str:
        return f"{self.name} ({self.config.address})"

    def share(self, dry_run: bool = False, planned: list[str] | None = None) -> Host:
        """A view of this host for one migration of several (an evacuation's, in threads): the
        same connection and agent, its own dry run, planned commands and notes. Its close()
        leaves the connection open; this Host's close() closes it."""
        return dataclasses.replace(self, dry_run=dry_run,
                                   planned=planned if planned is not None else [], notes=[],
                                   shared=True, _wire=self._wire,
                                   _recording=threading.local())  # fmt: skip

    # The connection and agent live in the wire (shared by views); these name them.
    @property
    def _conn(self) -> Connection | None:
        return self._wire.conn

    @_conn.setter
    def _conn(self, conn: Connection | None) -> None:
        self._wire.conn = conn

    @property
    def _agent(self) -> Agent | None:
        return self._wire.agent

    @_agent.setter
    def _agent(self, agent: Agent | None) -> None:
        self._wire.agent = agent

    def connect(self) -> None:
        """Open the connection (retried while the failure may pass); strict host keys. One
        that has ended (dropped under another command, or a view's) is opened again; views of
        one host that find it so open it once: the others wait for it."""
        wire = self._wire
        if wire.conn is not None and not _ended(wire.conn):
            return
        with wire.lock:
            if wire.conn is not None:
                if not _ended(wire.conn):
                    return
                self.drop(conn=wire.conn)
            if wire.unreachable:  # do not spend the retry deadline again on every command
                raise HostError(wire.unreachable)
            conn: Connection | None = None
            try:
                for attempt in retrying(self.policy, f"connect to {self}", (_Transient,),
                                        self.notes):  # fmt: skip
                    with attempt:
                        conn = self._open()
            except _Transient as e:
                wire.unreachable = str(e)
                raise
            assert conn is not None
            if self.policy.agent and conn.transport is not None:
                wire.agent = Agent.start(
                    conn.transport, self.name, self.policy.connect_timeout, quote(AGENT_ARGV)
                )
            wire.conn = conn  # last: a view that sees it connected sees the agent too

    @property
    def agent(self) -> Agent | None:
        """The host's agent, connecting first; None if it has none (no python3 there)."""
        if not self.policy.agent:
            return None
        self.connect()
        agent = self._wire.agent
        return agent if agent is not None and agent.alive else None

    def _open(self) -> Connection:
        cfg = self.config
        fab = FabricConfig(overrides={"load_ssh_configs": False, "run": {"in_stream": False}})
        conn = Connection(
            cfg.address,
            user=cfg.user,
            port=cfg.port,
            config=fab,
            connect_timeout=int(self.policy.connect_timeout),
            connect_kwargs={
                "key_filename": [str(Path(cfg.key).expanduser())],
                "look_for_keys": False,
                "allow_agent": False,
                "banner_timeout": self.policy.connect_timeout,
                "auth_timeout": self.policy.connect_timeout,
            },
        )
        conn.client.set_missing_host_key_policy(paramiko.RejectPolicy())
        conn.client.load_host_keys(str(Path(cfg.known_hosts).expanduser()))
        try:
            conn.open()
        except paramiko.BadHostKeyException:
            conn.close()
            raise HostKeyError(
                f"{self}: host key CHANGED (differs from {cfg.known_hosts}); refusing to connect"
            ) from None
        except paramiko.SSHException as e:
            conn.close()
            if "not found in known_hosts" in str(e):
                raise HostKeyError(
                    f"{self}: host key not in {cfg.known_hosts}; refusing to connect "
                    "(strict host-key checking)"
                ) from None
            if isinstance(e, paramiko.AuthenticationException):
                raise HostError(f"{self}: authentication failed with key {cfg.key}") from None
            raise _Transient(f"{self}: ssh failed: {e}") from None
        except (TimeoutError, OSError, EOFError) as e:
            conn.close()
            reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
            raise _Transient(f"{self}: cannot connect: {reason}") from None
        assert conn.transport is not None
        # A new command's channel must open within the connect timeout, not paramiko's hour.
        conn.transport.channel_timeout = self.policy.connect_timeout
        conn.transport.set_keepalive(5)
        return conn

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float | None = None,
        mutates: bool = True,
        check: bool = False,
        private: bool = False,
        sockets: Mapping[str, str] | None = None,
        handed: Mapping[str, str] | None = None,
        detach: tuple[str, str] | None = None,
    ) -> Result:
        """Run argv (quoted here, nowhere else); never raises for a non-zero exit unless check.
        With private, under umask 077, so that what it writes (CRIU's images hold process
        memory) is 0600. With sockets (agent only), each Unix socket path is connected and
        handed to the command, its fd number replacing the token in argv; with handed, the
        connection a holder on that path hands over (SCM_RIGHTS). Past its timeout a
        command run by the agent is killed (with its process group). With detach (agent only:
        an images dir and a NAME), argv is CRIU started to run on (criu/background.py)."""
        argv = [str(a) for a in argv]
        line = quote(argv)
        if self.dry_run and mutates:
            self.planned.append(f"{self.name}$ {line}")
            return Result(self.name, argv, 0, dry=True)
        limit = timeout or self.policy.command_timeout
        t0 = time.monotonic()
        if mutates:  # never repeated blindly: the first run may have acted
            result = self._dispatch(argv, line, limit, private, sockets, handed, detach)
        else:  # a read is safe to repeat on a fresh connection
            what = f"{self.name}: {_short(line, 60)}"
            for attempt in retrying(self.policy, what, (_Lost,), self.notes):
                with attempt:
                    result = self._dispatch(argv, line, limit, private, sockets, handed)
        if cmd_log.isEnabledFor(logging.INFO):
            cmd_log.info("%s %6.3fs exit %d  %s", self.name, time.monotonic() - t0,
                         result.exit_code, _brief(argv))  # fmt: skip
        ran = getattr(self._recording, "ran", None)
        if ran is not None:
            ran.append(result)
        if check and not result.ok:
            raise HostError(f"{self}: `{_short(line)}` failed: {result.error_line()}")
        return result

    @contextmanager
    def recording(self) -> Iterator[list[Result]]:
        """The results of the commands this thread runs on the host inside the block (when
        each started and ended there: the freeze's breakdown)."""
        outer = getattr(self._recording, "ran", None)
        ran: list[Result] = []
        self._recording.ran = ran
        try:
            yield ran
        finally:
            if outer is not None:
                outer.extend(ran)
            self._recording.ran = outer

    def read_file(self, path: str) -> bytes | None:
        """A small file's bytes (None: it does not exist), without a process on the host if
        it has an agent."""
        agent = self.agent
        if agent is None:
            r = self.run(["base64", "-w", "0", "--", path], mutates=False)
            if not r.ok:
                return None
            try:
                return base64.b64decode(r.stdout.strip(), validate=True)
            except binascii.Error:
                raise HostError(f"{self}: unreadable output reading {path}") from None
        a = self.call(agent, "read", self.policy.command_timeout, f"read {path}", path=path)
        if a.get("missing"):
            return None
        if "error" in a:
            raise HostError(f"{self}: cannot read {path}: {a['error']}")
        return base64.b64decode(a["data"])

    def call(self, agent: Agent, op: str, wait: float, what: str, /, **args: object) -> dict:
        """One agent request; a lost or wedged agent's connection is dropped (HostError)."""
        try:
            return agent.call(op, wait + WEDGED_GRACE, **args)
        except AgentTimeout:
            self.drop(agent=agent)
            raise HostError(f"{self}: timed out after {wait:.0f}s: {_short(what)}") from None
        except AgentLost as e:
            self.drop(agent=agent)
            raise _Lost(f"{self}: connection lost running {_short(what)}: {e}") from None

    def _dispatch(
        self,
        argv: list[str],
        line: str,
        timeout: float,
        private: bool,
        sockets: Mapping[str, str] | None,
        handed: Mapping[str, str] | None,
        detach: tuple[str, str] | None = None,
    ) -> Result:
        agent = self.agent
        if agent is None:
            if sockets or handed or detach:
                what = "detaching a command" if detach else "handing a socket to a command"
                raise HostError(f"{self}: {what} needs the host's agent")
            return self._execute(argv, f"umask 077; {line}" if private else line, timeout)
        a = self.call(agent, "run", timeout, line, argv=argv, timeout=timeout,
                      umask=0o077 if private else None, sockets=dict(sockets or {}),
                      handed=dict(handed or {}), detach=list(detach or ()))  # fmt: skip
        if a.get("timed_out"):
            raise HostError(f"{self}: timed out after {timeout:.0f}s (killed): {_short(line)}")
        if "error" in a:
            raise HostError(f"{self}: the agent could not run {_short(line)}: {a['error']}")
        rc = int(a["rc"])
        return Result(self.name, argv, rc if rc >= 0 else 128 - rc, a["out"], a["err"],
                      started=agent.local(a["started"]), ended=agent.local(a["ended"]))  # fmt: skip

    def _execute(self, argv: list[str], line: str, timeout: float) -> Result:
        """Run one quoted line over the persistent connection."""
        self.connect()
        conn = self._conn
        assert conn is not None
        # Past its timeout, a command on a peer that vanished silently can still block (the
        # channel waits on TCP): then its socket is dropped, which ends every wait on it.
        dropped = threading.Event()
        watchdog = threading.Timer(timeout + WEDGED_GRACE, _drop, (conn, dropped))
        watchdog.daemon = True
        watchdog.start()
        try:
            r = conn.run(line, hide=True, warn=True, timeout=timeout)
            if dropped.is_set():
                raise CommandTimedOut(r, int(timeout))
            if r.exited == -1 and _ended(conn):  # no exit status: the connection went
                raise EOFError("it closed before the command's exit status came")
        except CommandTimedOut:
            # The connection may be wedged (a peer that vanished): start afresh next time.
            self.drop(conn=conn)
            raise HostError(f"{self}: timed out after {timeout:.0f}s: {_short(line)}") from None
        except (OSError, EOFError, paramiko.SSHException) as e:
            self.drop(conn=conn)
            raise _Lost(f"{self}: connection lost running {_short(line)}: {e}") from None
        finally:
            watchdog.cancel()
        return Result(self.name, argv, r.exited, r.stdout, r.stderr)

    def lock(self, path: str, holder: str) -> RemoteLock:
        """Hold an exclusive flock on path for as long as this connection lives.

        The host's agent holds it (no session of its own); without an agent, a remote
        `flock ... cat` on its own channel. When the controller dies its connection closes,
        the agent ends (or cat sees EOF), and the lock is free again, so a dead controller never
        leaves a stale lock behind. Raises LockBusy naming the holder.
        """
        agent = self.agent
        if agent is not None:
            a = self.call(agent, "lock", self.policy.command_timeout, f"lock {path}", path=path,
                          holder=holder)  # fmt: skip
            if a.get("busy"):
                who = a.get("holder") or "unknown"
                raise LockBusy(f"{path} on {self.name} is held by another migration ({who})", who)
            if "error" in a:
                raise HostError(f"{self}: cannot take lock {path}: {a['error']}")
            return RemoteLock(None, path, self, holder, agent=agent)
        self.connect()
        conn = self._conn
        assert conn is not None
        if conn.transport is None or not conn.transport.is_active():  # dropped: start afresh
            self.drop(conn=conn)
            self.connect()
            conn = self._conn
            assert conn is not None
        try:
            transport = conn.transport
            assert transport is not None
            channel = transport.open_session()
            channel.settimeout(self.policy.command_timeout)
            channel.exec_command(quote(["sh", "-c", _LOCK, "sh", path, holder]))
            reply = channel.makefile("r").readline().strip()
        except (OSError, EOFError, paramiko.SSHException) as e:
            self.drop(conn=conn)
            raise _Lost(f"{self}: connection lost taking lock {path}: {e}") from None
        if reply == "locked":
            return RemoteLock(channel, path, self, holder)
        status = channel.recv_exit_status()
        channel.close()
        if status == LOCK_BUSY:
            who = self.run(["cat", "--", path], mutates=False).stdout.strip() or "unknown"
            raise LockBusy(f"{path} on {self.name} is held by another migration ({who})", who)
        raise HostError(f"{self}: cannot take lock {path} (exit {status})")

    def once(self, key: Hashable, ask: Callable[[], _T], keep: Callable[[_T], bool]) -> _T:
        """ask()'s answer, asked once for key by this host and the views share() made of it
        (the migrations of an evacuation: a check whose answer is the same for every workload),
        while the others wait for it; an answer keep() refuses is not kept (asked again)."""
        wire = self._wire
        with wire.lock:
            if key in wire.memo:
                return cast(_T, wire.memo[key])
            asking = wire.asking.setdefault(key, threading.Lock())
        with asking:
            with wire.lock:
                if key in wire.memo:
                    return cast(_T, wire.memo[key])
            got = ask()
            if keep(got):
                with wire.lock:
                    wire.memo[key] = got
            return got

    def close(self) -> None:
        """Close the connection, unless this is a view (share()): its Host closes it."""
        if not self.shared:
            self.drop()

    def drop(self, conn: Connection | None = None, agent: Agent | None = None) -> None:
        """Close the connection and agent (broken, wedged, or done with): the next command
        connects afresh. With conn or agent, only if they are still the ones in use (another
        view may have connected again since)."""
        wire = self._wire
        with wire.lock:
            if (conn is not None and wire.conn is not conn) or (
                agent is not None and wire.agent is not agent
            ):
                return
            old_agent, old_conn = wire.agent, wire.conn
            wire.agent = wire.conn = None
        try:
            if old_agent is not None:
                old_agent.close()
        finally:
            if old_conn is not None:
                old_conn.close()


@dataclass
class _Wire:
    """A host's connection and agent: one Host's, shared with the views share() made of it."""

    conn: Connection | None = None
    agent: Agent | None = None
    unreachable: str | None = None  # set once connecting failed after every retry
    lock: threading.RLock = field(default_factory=threading.RLock)
    memo: dict[Hashable, object] = field(default_factory=dict)  # Host.once's answers
    asking: dict[Hashable, threading.Lock] = field(default_factory=dict)


WEDGED_GRACE = 5.0  # seconds past a command's timeout before its connection is dropped


def _ended(conn: Connection) -> bool:
    """Whether conn's transport has ended (its thread saw the socket close, or an error)."""
    transport = conn.transport
    return transport is None or not transport.is_active() or transport.saved_exception is not None


def _drop(conn: Connection, dropped: threading.Event) -> None:
    """Close a wedged connection's socket under it (from the watchdog's thread)."""
    dropped.set()
    transport = conn.transport
    sock = getattr(transport, "sock", None)
    if sock is not None:
        try:
            sock.close()
        except OSError:
            pass


def _brief(argv: list[str]) -> str:
    """argv for the -v log: whole, but for the scripts in it (named by their size)."""
    return quote([a if len(a) <= 200 and "\n" not in a else f"<script: {len(a)} chars>"
                  for a in argv])  # fmt: skip


def _short(line: str, width: int = 120) -> str:
    return line if len(line) <= width else line[: width - 3] + "..."
