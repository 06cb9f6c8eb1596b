"""A workload's own network namespace: interface, address, MAC, host-side veth (read-only)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from orchestrator.errors import MigrationError
from orchestrator.transport.ssh import Host

# Inside the workload's netns: its interface as JSON (link, then addresses), on two lines.
_INSIDE = (
    'nsenter -t "$1" -n ip -j -d link show dev "$2" && echo && '
    'nsenter -t "$1" -n ip -j addr show dev "$2" && echo && '
    'nsenter -t "$1" -n ss -Htn state established'
)


@dataclass
class NetInfo:
    """What travels with a workload that owns its network namespace."""

    interface: str  # inside, e.g. eth0
    veth: str  # its peer on the host, e.g. vctr0
    mac: str
    addresses: list[str] = field(default_factory=list)  # CIDR, e.g. 198.18.0.50/24
    source_bridge: str | None = None  # the bridge the veth is plugged into on the source
    connections: list[str] = field(default_factory=list)  # "local -> peer", seen in pre-flight

    @property
    def ips(self) -> list[str]:
        return [a.split("/")[0] for a in self.addresses]


def discover(host: Host, pid: int, interface: str, veth: str | None) -> NetInfo:
    """Find the workload's interface and the host-side end of its veth."""
    r = host.run(["sh", "-c", _INSIDE, "sh", str(pid), interface], mutates=False)
    parts = r.stdout.split("\n\n", 2) if r.ok else []
    if len(parts) != 3:
        raise MigrationError(f"cannot read interface {interface} of pid {pid} on {host}: "
                             f"{r.error_line()}")  # fmt: skip
    link, addrs = _one(parts[0]), _one(parts[1])
    if (link.get("linkinfo") or {}).get("info_kind") != "veth":
        raise MigrationError(f"{interface} of pid {pid} on {host} is not a veth")
    addresses = [
        f"{a['local']}/{a['prefixlen']}"
        for a in addrs.get("addr_info", [])
        if a.get("family") == "inet" and a.get("scope") == "global"
    ]
    host_links = json.loads(
        host.run(["ip", "-j", "link", "show"], mutates=False, check=True).stdout
    )
    peer = next((h for h in host_links if h.get("ifindex") == link.get("link_index")), None)
    if peer is None:
        raise MigrationError(f"the host end of {interface} (pid {pid}) is not on {host}")
    if veth and peer["ifname"] != veth:
        raise MigrationError(
            f"the host end of {interface} (pid {pid}) on {host} is {peer['ifname']}, "
            f"not {veth} as configured"
        )
    connections = [
        f"{f[2]} -> {f[3]}" for f in (ln.split() for ln in parts[2].splitlines()) if len(f) >= 4
    ]
    return NetInfo(
        interface, peer["ifname"], link["address"], addresses, peer.get("master"), connections
    )


def _one(text: str) -> dict[str, Any]:
    data = json.loads(text)
    return data[0] if isinstance(data, list) and data else {}


def conflicts(host: Host, info: NetInfo, bridge: str) -> list[str]:
    """Why info cannot land on host's bridge (empty: it can); read-only."""
    links = json.loads(host.run(["ip", "-j", "link", "show"], mutates=False, check=True).stdout)
    names = {link["ifname"] for link in links}
    problems = []
    if bridge not in names:
        problems.append(f"bridge {bridge} does not exist on {host}")
    if info.veth in names:
        problems.append(f"an interface named {info.veth} already exists on {host}")
    addrs = json.loads(host.run(["ip", "-j", "addr", "show"], mutates=False, check=True).stdout)
    local = {a["local"] for link in addrs for a in link.get("addr_info", [])}
    neigh = json.loads(host.run(["ip", "-j", "neigh", "show"], mutates=False, check=True).stdout)
    for ip in info.ips:
        if ip in local:
            problems.append(f"address {ip} is already in use on {host}")
        other = [n for n in neigh if n.get("dst") == ip and n.get("lladdr") not in (None, info.mac)]
        if other:
            problems.append(f"address {ip} answers from another MAC ({other[0]['lladdr']}) "
                            f"on {host}")  # fmt: skip
    return problems


def announce_argv(pid: int, info: NetInfo) -> list[str]:
    """After a restore: unsolicited ARP from the workload's address so that peers and switches
    move on at once. In the background: the freeze does not wait for it."""
    script = (
        "pid=$1; dev=$2; shift 2; for ip; do "
        'nsenter -t "$pid" -n arping -q -U -c 2 -I "$dev" "$ip" </dev/null >/dev/null 2>&1 & '
        "done; true"
    )
    return ["sh", "-c", script, "sh", str(pid), info.interface, *info.ips]


# Each global IPv4 address in pid's network namespace: "DEV CIDR" (ip -o: "N: DEV inet CIDR ...").
_ANNOUNCE_ALL = (
    'pid=$1; nsenter -t "$pid" -n ip -o -4 addr show scope global | '
    "while read -r _ dev _ cidr _; do "
    'nsenter -t "$pid" -n arping -q -U -c 2 -I "${dev%@*}" "${cidr%/*}" '
    "</dev/null >/dev/null 2>&1 & "
    "done; true"
)


def announce_all_argv(pid: int) -> list[str]:
    """As announce_argv, for every address a container's network namespace holds (none: a
    no-op), found there: a container runtime's restore gives no NetInfo."""
    return ["sh", "-c", _ANNOUNCE_ALL, "sh", str(pid)]


def wait_veth_gone(host: Host, veth: str, timeout: float) -> None:
    """A namespace goes away asynchronously: wait until its veth's host end is gone too."""
    deadline = time.monotonic() + timeout
    while host.run(["ip", "link", "show", "dev", veth], mutates=False).ok:
        if time.monotonic() > deadline:
            raise MigrationError(f"{veth} still exists on {host} after {timeout:.0f}s")
        time.sleep(0.1)


# Take every TCP socket of the tree out of repair mode (as CRIU does when a dump fails), via
# pidfd_getfd(2): a copy of each socket fd, on which TCP_REPAIR is switched off.
_REPAIR_OFF = r"""
import ctypes, os, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
PIDFD_GETFD, TCP_REPAIR = 438, 19
for pid in map(int, sys.argv[1:]):
    pidfd = os.pidfd_open(pid)
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if not os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                continue
        except OSError:
            continue
        n = libc.syscall(PIDFD_GETFD, pidfd, int(fd), 0)
        if n < 0:
            continue
        s = socket.socket(fileno=n)
        try:
            if s.type == socket.SOCK_STREAM and s.family in (socket.AF_INET, socket.AF_INET6):
                s.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 0)
        except OSError:
            pass
        finally:
            s.close()
"""
# The local ports of the tree's TCP sockets (read-only), one a line: what CRIU's per-connection
# lock rules (a tree without its own network namespace) name.
_PORTS = r"""
import ctypes, os, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
ports = set()
for pid in map(int, sys.argv[1:]):
    try:
        pidfd, fds = os.pidfd_open(pid), os.listdir(f"/proc/{pid}/fd")
    except OSError:
        continue
    for fd in fds:
        try:
            if not os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                continue
        except OSError:
            continue
        n = libc.syscall(438, pidfd, int(fd), 0)
        if n < 0:
            continue
        s = socket.socket(fileno=n)
        try:
            if s.type == socket.SOCK_STREAM and s.family in (socket.AF_INET, socket.AF_INET6):
                ports.add(s.getsockname()[1])
        except OSError:
            pass
        finally:
            s.close()
print(*sorted(ports), sep="\n")
"""
# In the namespace it runs in: delete CRIU's network-lock rules (iptables, the ones that let
# only CRIU's own marked packets through: mark 0xc114), those naming one of the ports given
# (argv), or all of them with `all` (a workload's own namespace: every lock there is its own),
# and CRIU's nftables tables there (CRIU-*) with `all`.
_DROP_LOCK = r"""
import re, subprocess, sys
ports = set(sys.argv[2:])
for tool in ("iptables", "ip6tables"):
    r = subprocess.run([tool + "-save", "-t", "filter"], capture_output=True, text=True)
    if r.returncode:
        continue
    rules = [ln for ln in r.stdout.splitlines() if ln.startswith("-A ")]
    for rule in rules:
        words = rule.split()
        named = {w for k, w in zip(words, words[1:]) if k in ("--sport", "--dport")}
        criu = "0xc114" in rule and "DROP" in words
        if sys.argv[1] == "all" and (criu or words[-1] == "CRIU" or words[1] == "CRIU"):
            subprocess.run([tool, "-t", "filter", "-D", *words[1:]], check=False)
        elif criu and named & ports:
            subprocess.run([tool, "-t", "filter", "-D", *words[1:]], check=False)
    if sys.argv[1] == "all" and re.search(r"^:CRIU ", r.stdout, re.M):
        subprocess.run([tool, "-t", "filter", "-X", "CRIU"], check=False)
if sys.argv[1] == "all":
    r = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True)
    for line in r.stdout.splitlines():
        words = line.split()
        if len(words) == 3 and words[2].startswith("CRIU-"):
            subprocess.run(["nft", "delete", "table", words[1], words[2]], check=True)
"""
# Repair mode off on the tree's sockets, then the lock rules off in the root pid's namespace:
# all of them in its own namespace, those of its ports in the host's.
_UNLOCK = (
    'pid=$1 scope=$2 drop=$3 ports=$4; shift 4; python3 -c "$0" "$@" || exit 1; '
    'set -- $(python3 -c "$ports" "$@"); '
    'nsenter -t "$pid" -n python3 -c "$drop" "$scope" "$@"'
)
# After the stopped tree is killed (its sockets silently, in repair mode): the rules of the
# ports it had, read before the kill.
_KILL_THEN_DROP = (
    'drop=$1 ports=$2; shift 2; p=$(python3 -c "$ports" "$@"); '
    'kill -KILL "$@" 2>/dev/null; python3 -c "$drop" ports $p'
)


def unlock_argv(root_pid: int, pids: list[int], own_netns: bool = True) -> list[str]:
    """Run on the host: undo what a dump left on a workload it let run on, without unlocking
    it (CRIU's failed lazy dump, a rollback of a plain tree dumped with --tcp-established):
    TCP repair mode on its sockets, then CRIU's network lock (in its own namespace, all of it;
    in the host's, the rules naming its ports)."""
    scope = "all" if own_netns else "ports"
    return ["sh", "-c", _UNLOCK, _REPAIR_OFF, str(root_pid), scope, _DROP_LOCK, _PORTS,
            *map(str, pids)]  # fmt: skip


def kill_then_unlock_argv(pids: list[int]) -> list[str]:
    """Run on the host: SIGKILL a stopped tree without its own network namespace, then drop
    the lock rules CRIU left in the host's namespace for its connections."""
    return ["sh", "-c", _KILL_THEN_DROP, "sh", _DROP_LOCK, _PORTS, *map(str, pids)]
