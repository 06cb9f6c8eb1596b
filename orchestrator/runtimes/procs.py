"""Process facts read from a host: the process table, a tree, namespaces (read-only commands)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from orchestrator.errors import MigrationError
from orchestrator.transport.ssh import Host


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    state: str
    rss_kb: int
    args: str


def table(host: Host) -> dict[int, Proc]:
    """Every process on the host, by pid."""
    r = host.run(
        ["ps", "-ww", "-e", "-o", "pid=,ppid=,stat=,rss=,args="], mutates=False, check=True
    )
    procs = {}
    for line in r.stdout.splitlines():
        parts = line.split(None, 4)
        if len(parts) < 4 or not parts[0].isdigit():
            continue
        pid, ppid, stat, rss = int(parts[0]), int(parts[1]), parts[2], int(parts[3])
        procs[pid] = Proc(pid, ppid, stat, rss, parts[4] if len(parts) > 4 else "")
    return procs


def tree(procs: dict[int, Proc], root: int) -> list[int]:
    """root and all its descendants, root first."""
    children: dict[int, list[int]] = {}
    for p in procs.values():
        children.setdefault(p.ppid, []).append(p.pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        if pid in procs and pid not in out:
            out.append(pid)
            todo.extend(sorted(children.get(pid, [])))
    return out


def tree_of(host: Host, root: int) -> list[int]:
    return tree(table(host), root)


# Prints: NSpid line of the pid, then whether its pid and mount namespaces differ from the shell's.
_NS_SCRIPT = (
    'p=$1; test -d "/proc/$p" || exit 3; grep "^NSpid:" "/proc/$p/status"; '
    'for ns in pid mnt net; do a=$(readlink "/proc/$p/ns/$ns"); b=$(readlink "/proc/$$/ns/$ns"); '
    'if [ "$a" = "$b" ]; then echo "$ns same"; else echo "$ns own"; fi; done; '
    # its start time (field 22 of /proc/PID/stat, counted after the command name's ")")
    's=$(cat "/proc/$p/stat") && s=${s##*) } && set -- $s && echo "start ${20}" && echo "flags $7"'
)


@dataclass(frozen=True)
class Namespaces:
    pidns_init: bool  # the pid is init (1) of its own pid namespace: a container
    own_pidns: bool
    own_mntns: bool
    own_netns: bool
    start_time: int | None = None  # clock ticks after boot: with the pid, who it is
    kernel_thread: bool = False  # PF_KTHREAD


def namespaces(host: Host, pid: int) -> Namespaces | None:
    """How pid sits in namespaces relative to the host's sessions; None if it is gone."""
    r = host.run(["sh", "-c", _NS_SCRIPT, "sh", str(pid)], mutates=False)
    if r.exit_code == 3:
        return None
    if not r.ok:
        raise MigrationError(f"{host}: cannot inspect pid {pid}: {r.error_line()}")
    lines = r.stdout.split("\n")
    nspid = next((ln.split()[1:] for ln in lines if ln.startswith("NSpid:")), [])
    own = {ln.split()[0] for ln in lines if ln.endswith(" own")}
    return Namespaces(
        pidns_init=len(nspid) > 1 and nspid[-1] == "1",
        own_pidns="pid" in own,
        own_mntns="mnt" in own,
        own_netns="net" in own,
        start_time=_field(lines, "start"),
        kernel_thread=bool((_field(lines, "flags") or 0) & PF_KTHREAD),
    )


PF_KTHREAD = 0x00200000


def _field(lines: list[str], name: str) -> int | None:
    """The number on the line `NAME N`, if any."""
    for ln in lines:
        parts = ln.split()
        if parts[:1] == [name] and len(parts) == 2 and parts[1].isdigit():
            return int(parts[1])
    return None


RUNNING, STOPPED, GONE = "running", "stopped", "gone"


def state(host: Host, pid: int) -> str:
    """running, stopped (e.g. left stopped by a dump), or gone (no such pid, or a zombie)."""
    r = host.run(["ps", "-o", "stat=", "-p", str(pid)], mutates=False)
    code = r.stdout.strip()[:1]
    if not r.ok or not code or code in "ZX":
        return GONE
    return STOPPED if code in "Tt" else RUNNING


def wait_gone(host: Host, needle: str, timeout: float) -> bool:
    """Wait until no process on host has needle in its command line; False on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        if not any(needle in p.args for p in table(host).values()):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def signal(host: Host, sig: str, pids: list[int]) -> None:
    """Send sig to pids (best effort: some may be gone already)."""
    if pids:
        host.run(["kill", f"-{sig}", *map(str, pids)])
