"""Will it move? The workload half of pre-flight, read-only: what /proc on the source shows that
CRIU would otherwise fail on only after the freeze, each as one line saying what to do, and the
file locks and TCP connections the dump must carry. `migrate check` and `run`'s pre-flight both
call `survey`; the facts are read in one remote command and judged by pure functions."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from orchestrator.checkpoint import Pages
from orchestrator.config import Config, Policy
from orchestrator.errors import MigrationError
from orchestrator.procparse import (
    TCP_LISTEN,
    Lock,
    Mount,
    TcpSocket,
    parse_addresses,
    parse_locks,
    parse_mountinfo,
    parse_tcp,
)
from orchestrator.runtimes.base import Target
from orchestrator.transport.ssh import Host, HostError

CAP_SYS_RESOURCE = 24
FILE_LOCKS = ("POSIX", "FLOCK", "OFDLCK")

# Per task of the tree: ids, session, user namespace, each fd (its target, mount id, locks on
# it); then the reader's own capabilities and user namespace, and the root's mounts, TCP
# sockets and (in a user namespace of its own with a network of its own) its veths.
_SCRIPT = r"""
root=$1
for p in "$@"; do
  [ -d "/proc/$p" ] || continue
  echo "task $p"
  grep -E '^(Uid|Gid|NSsid):' "/proc/$p/status"
  echo "userns $(readlink "/proc/$p/ns/user")"
  for f in "/proc/$p/fd/"*; do
    l=$(readlink "$f") || continue
    n=${f##*/}
    echo "fd $n $l"
    sed -n -e 's/^mnt_id:[[:space:]]*/mnt /p' -e 's/^lock:[[:space:]]*/lock /p' \
      "/proc/$p/fdinfo/$n" 2>/dev/null
  done
done
grep '^CapEff:' "/proc/$$/status"
echo "userns-self $(readlink "/proc/$$/ns/user")"
echo "mntns $(readlink "/proc/$root/ns/mnt") $(readlink "/proc/$$/ns/mnt")"
echo "netns $(readlink "/proc/$root/ns/net") $(readlink "/proc/$$/ns/net")"
echo "[mountinfo]"; cat "/proc/$root/mountinfo"
echo "[tcp]"; cat "/proc/$root/net/tcp" "/proc/$root/net/tcp6" 2>/dev/null
echo "[veth]"
if [ "$(readlink "/proc/$root/ns/user")" != "$(readlink "/proc/$$/ns/user")" ] &&
   [ "$(readlink "/proc/$root/ns/net")" != "$(readlink "/proc/$$/ns/net")" ]; then
  nsenter -t "$root" -n ip -o link show type veth 2>/dev/null
fi
echo "[end]"
"""


@dataclass(frozen=True)
class Fd:
    num: int
    link: str  # what /proc/PID/fd/N points at: a path, socket:[INODE], pipe:[...]
    mnt_id: int | None = None
    locks: tuple[Lock, ...] = ()


@dataclass(frozen=True)
class Task:
    pid: int
    uids: tuple[int, ...]
    gids: tuple[int, ...]
    userns: str
    fds: tuple[Fd, ...]
    sid: int | None = None  # its session id in its own pid namespace (0: the leader is outside)


@dataclass(frozen=True)
class TreeFacts:
    tasks: tuple[Task, ...]
    cap_eff: int  # the reader's (CRIU runs as the same user, from the same session)
    userns: str  # the reader's user namespace
    own_mntns: bool
    own_netns: bool
    mounts: tuple[Mount, ...]
    tcp: tuple[TcpSocket, ...]
    veths: tuple[str, ...]


def parse_facts(text: str) -> TreeFacts:
    """The output of _SCRIPT (pure: unit tests feed it recorded outputs)."""
    tasks: list[Task] = []
    fds: list[Fd] = []
    ids: dict[str, tuple[int, ...]] = {}
    head: dict[str, str] = {}
    pid, userns, section, sid = 0, "", "", None
    blocks: dict[str, list[str]] = {"mountinfo": [], "tcp": [], "veth": []}

    def close_task() -> None:
        if pid:
            tasks.append(Task(pid, ids.get("Uid", ()), ids.get("Gid", ()), userns, tuple(fds), sid))

    for line in text.splitlines():
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        if section in blocks:
            blocks[section].append(line)
            continue
        word, rest = (line.split(None, 1) + ["", ""])[:2]
        if word == "task":
            close_task()
            pid, fds, ids, userns, sid = int(rest), [], {}, "", None
        elif word in ("Uid:", "Gid:"):
            ids[word[:-1]] = tuple(int(x) for x in rest.split())
        elif word == "NSsid:" and rest.split():
            sid = int(rest.split()[-1])  # the innermost: as the task itself sees it
        elif word == "userns":
            userns = rest
        elif word == "fd":
            num, _, link = rest.partition(" ")
            fds.append(Fd(int(num), link))
        elif word == "mnt" and fds and rest.strip().isdigit():
            fds[-1] = Fd(fds[-1].num, fds[-1].link, int(rest), fds[-1].locks)
        elif word == "lock" and fds:
            last = fds[-1]
            fds[-1] = Fd(last.num, last.link, last.mnt_id, last.locks + tuple(parse_locks(rest)))
        else:
            head[word] = rest
    close_task()
    mnt, net = head.get("mntns", " ").split(" "), head.get("netns", " ").split(" ")
    return TreeFacts(
        tasks=tuple(tasks),
        cap_eff=int(head.get("CapEff:", "0"), 16),
        userns=head.get("userns-self", ""),
        own_mntns=mnt[0] != mnt[-1],
        own_netns=net[0] != net[-1],
        mounts=tuple(parse_mountinfo("\n".join(blocks["mountinfo"]))),
        tcp=tuple(parse_tcp("\n".join(blocks["tcp"]))),
        veths=tuple(ln.split(":")[1].strip().split("@")[0] for ln in blocks["veth"] if ":" in ln),
    )


def read_facts(host: Host, target: Target) -> TreeFacts:
    """Everything below judges, read from host in one command (read-only)."""
    pids = [target.root_pid, *[p for p in target.pids if p != target.root_pid]]
    r = host.run(["sh", "-c", _SCRIPT, "sh", *map(str, pids)], mutates=False)
    if not r.ok or "[end]" not in r.stdout:
        raise MigrationError(f"{host}: cannot read the workload's /proc: {r.error_line()}")
    return parse_facts(r.stdout)


@dataclass(frozen=True)
class Verdict:
    """What the workload check found: refusals (each one line with what to do), the files it
    holds locks on and the connections its dump must carry (as `local -> remote`)."""

    refusals: list[str] = field(default_factory=list)
    locked_files: list[str] = field(default_factory=list)
    connections: list[str] = field(default_factory=list)
    outside: list[str] = field(default_factory=list)  # of those, peers that cannot follow


def judge(
    facts: TreeFacts, tcp_outside: str = "refuse", dst_addresses: frozenset[str] | None = None
) -> Verdict:
    """The verdict on facts (pure). dst_addresses: the destination's (None: not asked)."""
    v = Verdict()
    v.refusals.extend(_session_outside(facts))
    v.refusals.extend(_other_users(facts))
    if facts.own_mntns:  # CRIU dumps its mounts: each open file must be on one of them
        v.refusals.extend(_files_outside(facts))
    if facts.veths and any(t.userns != facts.userns for t in facts.tasks):
        v.refusals.append(
            f"it has a user namespace of its own with a veth ({facts.veths[0]}): CRIU cannot "
            "restore a veth from inside a user namespace (usernsd); run it without --user, or "
            "move it without its network"
        )
    if facts.own_mntns:
        v.refusals.extend(_nsfs_mounts(facts))
    v.locked_files.extend(_locked_files(facts))
    if not facts.own_netns:  # its own network moves with it (and is checked elsewhere)
        internal, outside = _connections(facts)
        v.connections.extend(internal + outside)
        v.outside.extend(outside)
        if outside and tcp_outside != "close":
            v.refusals.extend(
                f"TCP connection {c} cannot follow (a peer outside the tree, or an address "
                "that stays on the source): stop it first, give the workload a network "
                "namespace of its own (see README), or set policy tcp_outside: close"
                for c in outside
            )
        if dst_addresses is not None:
            v.refusals.extend(_listeners(facts, dst_addresses))
    return v


def _session_outside(facts: TreeFacts) -> list[str]:
    """A task whose session leader is outside its pid namespace (its session id there is 0,
    e.g. started with `&` from a shell outside): CRIU fails at dump ("A session leader of N
    is outside of its pid namespace")."""
    t = next((t for t in facts.tasks if t.sid == 0), None)
    if t is None:
        return []
    return [
        f"pid {t.pid}'s session leader is outside its pid namespace: CRIU cannot dump it; "
        "start the workload in a session of its own (setsid)"
    ]


def _other_users(facts: TreeFacts) -> list[str]:
    if facts.cap_eff & (1 << CAP_SYS_RESOURCE):
        return []
    # (a task that ended while it was read has no ids: it is not another user's)
    others = [t for t in facts.tasks if t.uids and set(t.uids) | set(t.gids) != {0}]
    if not others:
        return []
    t = others[0]
    return [
        f"pid {t.pid} of the tree runs as another user (uid {t.uids[0]}) "
        f"and root on the source lacks CAP_SYS_RESOURCE: CRIU cannot read its limits "
        f'("Can\'t get rlimit"); give root CAP_SYS_RESOURCE or run the tree as one user'
    ]


def _files_outside(facts: TreeFacts) -> list[str]:
    """Files (stdio above all) on a mount its own mount namespace does not have: CRIU fails
    at dump ("Can't lookup mount=N for fd=0")."""
    ids = {m.mount_id for m in facts.mounts}
    out = []
    for t in facts.tasks:
        for fd in t.fds:
            if fd.link.startswith("/") and fd.mnt_id is not None and fd.mnt_id not in ids:
                what = "its stdio" if fd.num <= 2 else "a file"
                out.append(
                    f"pid {t.pid} has fd {fd.num} ({fd.link}) opened outside its own mount "
                    f"namespace (mount {fd.mnt_id}, {what}): CRIU cannot look it up; open it "
                    "inside (e.g. `exec </dev/null >/dev/null 2>&1` after unshare)"
                )
    return out[:3]


def _nsfs_mounts(facts: TreeFacts) -> list[str]:
    nsfs = [m.mount_point for m in facts.mounts if m.fstype == "nsfs"]
    if not nsfs:
        return []
    return [
        f"its mount namespace holds {len(nsfs)} namespace file mount(s) of other namespaces "
        f"({', '.join(nsfs[:3])}): CRIU cannot restore them; `umount -l /run/netns` inside "
        "it before it starts (as the README's recipe does)"
    ]


def _locked_files(facts: TreeFacts) -> list[str]:
    files: list[str] = []
    for t in facts.tasks:
        for fd in t.fds:
            if any(lk.kind in FILE_LOCKS for lk in fd.locks) and fd.link not in files:
                files.append(fd.link)
    return files


def _sockets(facts: TreeFacts) -> list[TcpSocket]:
    """The TCP sockets the tree holds (by the inodes of its fds)."""
    inodes = {
        int(fd.link[8:-1])
        for t in facts.tasks
        for fd in t.fds
        if fd.link.startswith("socket:[") and fd.link[8:-1].isdigit()
    }
    return [s for s in facts.tcp if s.inode in inodes]


def _connections(facts: TreeFacts) -> tuple[list[str], list[str]]:
    """The tree's TCP connections: (those that follow it: both ends in the tree, on loopback;
    those that cannot: a peer outside, or an address that stays on the source)."""
    mine = [s for s in _sockets(facts) if s.connected]
    ends = {(s.local, s.remote) for s in mine}
    internal: list[str] = []
    outside: list[str] = []
    for s in mine:
        follows = (s.remote, s.local) in ends and _loopback(s.local)
        (internal if follows else outside).append(f"{s.local} -> {s.remote}")
    return internal, outside


def _listeners(facts: TreeFacts, dst_addresses: frozenset[str]) -> list[str]:
    """Listening sockets bound to an address the destination does not have."""
    out = []
    for s in _sockets(facts):
        ip = _ip(s.local)
        if s.state == TCP_LISTEN and not (_loopback(s.local) or ip in ("0.0.0.0", "::")):
            if ip not in dst_addresses:
                out.append(
                    f"it listens on {s.local}, an address the destination does not have: CRIU "
                    "could not bind it there; listen on 0.0.0.0, or give the workload a network "
                    "namespace of its own (see README)"
                )
    return out


def _ip(endpoint: str) -> str:
    return endpoint.rpartition(":")[0].strip("[]")


def _loopback(endpoint: str) -> bool:
    return ipaddress.ip_address(_ip(endpoint)).is_loopback


def survey(
    src: Host,
    dst: Host,
    target: Target,
    policy: Policy,
    pages: Pages = Pages.FILES,
    tree: bool = True,
) -> Verdict:
    """Read and judge the workload on src, and src's CPU on dst (unless the policy says off);
    notes on target what the dump must carry. pages: how the strategy's final dump moves its
    pages. tree: judge its process tree too (the process runtime; container runtimes drive
    CRIU their own way)."""
    verdict = Verdict()
    if tree:
        facts = read_facts(src, target)
        dst_addresses = None
        if not facts.own_netns:
            r = dst.run(["ip", "-o", "addr", "show"], mutates=False)
            dst_addresses = parse_addresses(r.stdout) if r.ok else None
        verdict = judge(facts, policy.tcp_outside, dst_addresses)
    target.locked_files = verdict.locked_files
    target.tcp_connections = verdict.connections
    target.tcp_close = bool(verdict.outside) and policy.tcp_outside == "close"
    if pages is Pages.LAZY and (target.locked_files or target.tcp_connections):
        what = "file locks" if target.locked_files else "TCP connections in the host's network"
        verdict.refusals.append(
            f"it holds {what}: post-copy keeps the stopped source until every page is pulled, "
            "so the restore could not take them; use --strategy stopcopy"
        )
    elif pages is Pages.PAGE_SERVER and target.locked_files:
        verdict.refusals.append(
            f"it holds file locks ({', '.join(target.locked_files[:3])}): its source copy must "
            "let go of them before the restore takes them, and come back from its own images "
            "on a rollback, but stream sends the pages to the destination, not into those "
            "images; use --strategy stopcopy"
        )
    if policy.cpu_check == "strict":
        cpu = cpu_refusal(src, dst)
        if cpu:
            verdict.refusals.append(cpu)
    return verdict


# On the source: CRIU's view of its CPU, from a private temp dir, printed as base64.
_CPU_DUMP = r"""
d=$(mktemp -d) || exit 1
if "$1" cpuinfo dump -D "$d" -o cpu.log; then
  if [ -e "$d/cpuinfo.img" ]; then base64 -w0 "$d/cpuinfo.img"; else echo -; fi; rc=$?
else
  rc=$?; grep -h Error "$d/cpu.log" >&2
fi
rm -rf -- "$d"; exit $rc
"""  # (no image: this architecture's CRIU has nothing to compare)
# On the destination: that image, checked against this CPU (a private temp dir, removed).
_CPU_CHECK = (
    'd=$(mktemp -d) || exit 1; printf %s "$2" | base64 -d > "$d/cpuinfo.img" && '
    '"$1" cpuinfo check -D "$d" -o cpu.log; rc=$?; [ $rc -eq 0 ] || grep -h Error "$d/cpu.log" >&2'
    '; rm -rf -- "$d"; exit $rc'
)


def cpu_refusal(src: Host, dst: Host) -> str | None:
    """`criu cpuinfo dump` on src, `criu cpuinfo check` of it on dst: why dst's CPU cannot run
    what src's ran (None: it can, and an evacuation's other migrations take that answer).
    Each side works in a private temp dir it removes."""
    key = ("cpu_refusal", src.config.criu, dst.name, dst.config.criu)
    return src.once(key, lambda: _cpu_refusal(src, dst), keep=lambda why: why is None)


def _cpu_refusal(src: Host, dst: Host) -> str | None:
    r = src.run(["sh", "-c", _CPU_DUMP, "sh", src.config.criu], mutates=False)
    if not r.ok or not r.stdout.strip():
        return f"cannot read the CPU of {src.name} (criu cpuinfo dump): {r.error_line()}"
    image = r.stdout.strip()
    if image == "-":
        return None
    c = dst.run(["sh", "-c", _CPU_CHECK, "sh", dst.config.criu, image], mutates=False)
    if c.ok:
        return None
    return (
        f"the CPU of {dst.name} lacks what the workload may use on {src.name} (criu cpuinfo "
        f"check: {c.error_line()}); pick another destination, or set policy cpu_check: off"
    )


@dataclass(frozen=True)
class CheckResult:
    """`migrate check WORKLOAD SRC DST`: will it move, and what its dump must carry."""

    workload: str
    source: str
    destination: str
    root_pid: int | None
    pids: int
    refusals: list[str]
    locked_files: list[str]
    connections: list[str]

    @property
    def moves(self) -> bool:
        return not self.refusals


def check_workload(config: Config, spec: str, source: str, destination: str) -> CheckResult:
    """The workload half of `run`'s pre-flight, and nothing more: read-only on both hosts.
    ConfigError for unknown names; a workload that is not there is a refusal."""
    from orchestrator.location import whereabouts
    from orchestrator.runtimes import for_workload

    src_cfg, dst_cfg = config.route(source, destination)
    workload = config.workload(spec)
    host, moved = whereabouts(config).get(spec, (None, None))
    if host == src_cfg.name and moved is not None:
        workload = moved
    src, dst = Host(src_cfg, config.policy), Host(dst_cfg, config.policy)
    runtime = for_workload(workload)
    target: Target | None = None
    try:
        try:
            target = runtime.locate(src)
            verdict = survey(src, dst, target, config.policy, tree=runtime.inspects_tree)
            refusals = verdict.refusals + runtime.preflight(src, dst, target)
        except MigrationError as e:
            if isinstance(e, HostError):  # cannot be asked: not an answer
                raise
            refusals = [str(e)]
    finally:
        src.close()
        dst.close()
    return CheckResult(
        workload.name, src_cfg.name, dst_cfg.name, target.root_pid if target else None,
        len(target.pids) if target else 0, refusals,
        target.locked_files if target else [], target.tcp_connections if target else [],
    )  # fmt: skip
