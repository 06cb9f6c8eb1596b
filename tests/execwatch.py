"""Every program started on given hosts, as the kernel tells it (the netlink process connector):
what a test holds against "nothing but CRIU inside the freeze" without trusting the tool's own
bookkeeping. Root only."""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass

NETLINK_CONNECTOR = 11
CN_IDX_PROC = CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN, PROC_CN_MCAST_IGNORE = 1, 2
PROC_EVENT_FORK, PROC_EVENT_EXEC, PROC_EVENT_EXIT = 0x1, 0x2, 0x80000000
NLMSG_DONE = 3
CLONE_NEWNET = 0x40000000
SO_RCVBUFFORCE = 33
_NL = struct.Struct("=IHHII")  # nlmsghdr
_CN = struct.Struct("=IIIIHH")  # cn_msg: cb_id, seq, ack, len, flags
_EV = struct.Struct("=IIQ")  # proc_event: what, cpu, timestamp_ns (CLOCK_MONOTONIC)


@dataclass(frozen=True)
class Exec:
    at: float  # time.monotonic() seconds
    pid: int
    argv: tuple[str, ...]  # () if it was gone before it could be read
    pid_ns: int  # its pid namespace's inode (its parent's if it was gone), 0 unknown
    ancestry: tuple[tuple[str, ...], ...] = ()  # its parent's argv, grandparent's... (CRIU
    # starts iptables itself, through sh)


class ExecWatch:
    """Records each exec in one of pid_namespaces (inodes) from start() to stop()."""

    def __init__(self, pid_namespaces: set[int]) -> None:
        self.namespaces = pid_namespaces
        self.execs: list[Exec] = []
        self.exits: dict[int, float] = {}  # pid -> when it ended (time.monotonic())
        self.lost = ""  # why events were lost, if they were
        self._parents: dict[int, int] = {}
        self._argvs: dict[int, tuple[str, ...]] = {}
        self._sock = _connector_socket()
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> ExecWatch:
        self._send(PROC_CN_MCAST_LISTEN)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self._send(PROC_CN_MCAST_IGNORE)
        finally:
            self._sock.close()

    def within(self, start: float, end: float) -> list[Exec]:
        """The execs on the watched hosts between two time.monotonic() readings."""
        return [e for e in self.execs if start <= e.at <= end and e.pid_ns in self.namespaces]

    def _send(self, op: int) -> None:
        body = struct.pack("=I", op)
        cn = _CN.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(body), 0) + body
        self._sock.send(_NL.pack(_NL.size + len(cn), NLMSG_DONE, 0, 0, 0) + cn)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as e:  # ENOBUFS: events were lost, and the test cannot trust it
                self.lost = self.lost or str(e)
                if self._stop.is_set():
                    return
                continue
            off = _NL.size + _CN.size
            if len(data) < off + _EV.size:
                continue
            what, _, ns_time = _EV.unpack_from(data, off)
            body = off + _EV.size
            if what == PROC_EVENT_FORK:
                _, parent, _, child = struct.unpack_from("=iiii", data, body)
                self._parents[child] = parent
            elif what == PROC_EVENT_EXEC:
                _, tgid = struct.unpack_from("=ii", data, body)
                self.execs.append(self._read(tgid, ns_time / 1e9))
            elif what == PROC_EVENT_EXIT:
                pid, tgid = struct.unpack_from("=ii", data, body)
                if pid == tgid:
                    self.exits[tgid] = ns_time / 1e9

    def _read(self, pid: int, at: float) -> Exec:
        ancestry, ns, parent = [], 0, self._parents.get(pid, 0)
        for _ in range(4):
            if not parent:
                break
            try:
                ancestry.append(self._argvs.get(parent) or _argv(parent))
                ns = ns or os.stat(f"/proc/{parent}/ns/pid").st_ino
            except OSError:
                ancestry.append(self._argvs.get(parent, ()))
            parent = self._parents.get(parent, 0)
        try:
            argv = _argv(pid)
            ns = os.stat(f"/proc/{pid}/ns/pid").st_ino  # else: its parent's tells the host
        except OSError:
            argv = ()
        self._argvs[pid] = argv
        return Exec(at, pid, argv, ns, tuple(ancestry))


def _argv(pid: int) -> tuple[str, ...]:
    """A live process's argv (OSError once it is gone)."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return tuple(a.decode(errors="replace") for a in f.read().split(b"\0") if a)


def _connector_socket() -> socket.socket:
    """A process-connector socket in the machine's first network namespace (the connector is
    only there; scripts/isolated runs the tests in one of their own and says where the outer
    one is): made by a thread that joins that namespace (setns is per thread) and then ends."""
    made: list[socket.socket | BaseException] = []

    def make() -> None:
        try:
            outer = os.environ.get("MIGRATE_OUTER_NETNS")  # set by scripts/isolated
            if outer:
                libc = ctypes.CDLL(None, use_errno=True)
                fd = os.open(outer, os.O_RDONLY)
                try:
                    if libc.setns(fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), f"setns to {outer}")
                finally:
                    os.close(fd)
            s = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
            s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)  # a busy machine's forks
            s.bind((0, CN_IDX_PROC))
            made.append(s)
        except BaseException as e:  # noqa: BLE001 (handed to the caller)
            made.append(e)

    t = threading.Thread(target=make)
    t.start()
    t.join()
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]


def monotonic_of(wall: float) -> float:
    """A time.time() reading (a workload's log) as time.monotonic()."""
    return wall - time.time() + time.monotonic()
