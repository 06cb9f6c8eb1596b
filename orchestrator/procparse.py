"""Pure parsers of /proc texts read from a host: file locks (/proc/locks and fdinfo `lock:`
lines), TCP sockets (/proc/net/tcp, tcp6), mountinfo; and `ip -o addr`. No I/O here."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

TCP_LISTEN = 0x0A
TCP_CLOSE = 0x07


@dataclass(frozen=True)
class Lock:
    kind: str  # POSIX, FLOCK, OFDLCK (also LEASE, DELEG: not file locks CRIU takes back)
    access: str  # READ, WRITE
    pid: int  # -1 for OFD locks (they belong to an open file, not a process)
    device: str  # MAJ:MIN in hex, as the kernel prints it
    inode: int


def parse_locks(text: str) -> list[Lock]:
    """Locks from /proc/locks or fdinfo `lock:` lines; `->` lines (blocked waiters) skipped."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if parts[:1] == ["lock:"]:
            parts = parts[1:]
        if len(parts) < 6 or parts[1] == "->":
            continue
        dev_ino = parts[5].rsplit(":", 1)
        if len(dev_ino) != 2 or not dev_ino[1].isdigit():
            continue
        pid = int(parts[4]) if parts[4].lstrip("-").isdigit() else -1
        out.append(Lock(parts[1], parts[3], pid, dev_ino[0], int(dev_ino[1])))
    return out


@dataclass(frozen=True)
class TcpSocket:
    local: str  # address:port ([v6]:port)
    remote: str
    state: int  # the kernel's TCP state number (1 ESTABLISHED, 0x0A LISTEN, ...)
    inode: int

    @property
    def connected(self) -> bool:
        """A connection (not a listener, not closed): CRIU must dump its state."""
        return self.state not in (TCP_LISTEN, TCP_CLOSE)


def parse_tcp(text: str) -> list[TcpSocket]:
    """Sockets from /proc/net/tcp or /proc/net/tcp6 (headers skipped)."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 10 or ":" not in parts[1] or not parts[0].endswith(":"):
            continue
        try:
            local, remote = _endpoint(parts[1]), _endpoint(parts[2])
            out.append(TcpSocket(local, remote, int(parts[3], 16), int(parts[9])))
        except ValueError:
            continue
    return out


def _endpoint(hex_addr: str) -> str:
    """`0100007F:1F90` -> `127.0.0.1:8080` (the kernel prints each 32-bit word host-endian)."""
    addr, port = hex_addr.split(":")
    raw = b"".join(bytes.fromhex(addr[i : i + 8])[::-1] for i in range(0, len(addr), 8))
    ip = ipaddress.ip_address(raw)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    shown = f"[{ip}]" if isinstance(ip, ipaddress.IPv6Address) else str(ip)
    return f"{shown}:{int(port, 16)}"


@dataclass(frozen=True)
class Mount:
    mount_id: int
    mount_point: str
    fstype: str
    source: str


def parse_mountinfo(text: str) -> list[Mount]:
    """Mounts from /proc/PID/mountinfo (octal escapes in paths decoded)."""
    out = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if not sep or len(fields) < 5 or len(rest) < 2 or not fields[0].isdigit():
            continue
        out.append(Mount(int(fields[0]), _unescape(fields[4]), rest[0], _unescape(rest[1])))
    return out


def _unescape(path: str) -> str:
    if "\\" not in path:
        return path
    return path.encode().decode("unicode_escape").encode("latin-1").decode(errors="replace")


def parse_addresses(text: str) -> frozenset[str]:
    """The addresses in `ip -o addr show` output (`... inet 198.18.0.2/24 ...`)."""
    out = set()
    for line in text.splitlines():
        words = line.split()
        for i, w in enumerate(words[:-1]):
            if w in ("inet", "inet6"):
                out.add(words[i + 1].split("/")[0])
    return frozenset(out)
