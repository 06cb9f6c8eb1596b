"""Runtime `process`: a plain process tree, or a container that is init of its own pid namespace."""

from __future__ import annotations

import re
import time

from orchestrator.checkpoint import Capability, Checkpoint, Pages
from orchestrator.config import ConfigError, WorkloadConfig
from orchestrator.criu import background
from orchestrator.criu import commands as criu
from orchestrator.criu.logs import raise_on_failure
from orchestrator.criu.pagechannel import Call, dump_flags
from orchestrator.errors import MigrationError
from orchestrator.runtimes import net, procs
from orchestrator.runtimes.base import Runtime, Target
from orchestrator.transport.ssh import Host

PIDFILE = "restored.pid"


class ProcessRuntime(Runtime):
    name = "process"
    capabilities = frozenset(Capability)
    inspects_tree = True

    def __init__(self, workload: WorkloadConfig) -> None:
        super().__init__(workload)
        # host name -> connections whose network lock a dump left there (see remove())
        self._lock_rules_left: dict[str, list[str]] = {}

    def locate(self, host: Host) -> Target:
        pid = self._root_pid(host)
        ns = procs.namespaces(host, pid)
        table = procs.table(host)
        if ns is None or pid not in table:
            raise MigrationError(
                f"workload {self.workload.name}: pid {pid} is not running on {host} "
                "(it exited, or the pid is wrong)"
            )
        state, name = table[pid].state, self.workload.name
        if pid == 1 or ns.kernel_thread or state.startswith("Z"):
            what = "its init" if pid == 1 else "a kernel thread" if ns.kernel_thread else "a zombie"
            raise ConfigError(f"workload {name}: pid {pid} on {host} is {what}: not a workload")
        if state.startswith(("T", "t")):
            raise MigrationError(
                f"workload {self.workload.name}: pid {pid} is stopped ({state}) on {host}: "
                "another migration may hold it frozen (see `migrate history`/`recover`), or it "
                "was stopped by hand (kill -CONT it first)"
            )
        pids = procs.tree(table, pid)
        sessions = [p for p in pids if table[p].args.startswith(("sshd:", "sshd-session:"))]
        if sessions:
            raise ConfigError(
                f"workload {name}: its tree holds an ssh session on {host} (pid {sessions[0]}: "
                f"{table[sessions[0]].args[:60]}); freezing it would freeze a connection, maybe "
                "the controller's own"
            )
        target = Target(
            root_pid=pid,
            pids=pids,
            rss_kb=sum(table[p].rss_kb for p in pids),
            command=table[pid].args,
            start_time=ns.start_time,
            self_stopped=[p for p in pids if table[p].state.startswith(("T", "t"))],
            pidns_init=ns.pidns_init,
            own_mntns=ns.own_mntns,
            own_netns=ns.own_netns,
        )
        if ns.own_netns:
            cfg = self.workload.network
            target.net = net.discover(host, pid, cfg.interface, cfg.veth)
        return target

    def _root_pid(self, host: Host) -> int:
        kind, value = self.workload.locator
        name = self.workload.name
        if kind == "pid":
            return int(value)
        if kind == "pidfile":
            r = host.run(["cat", "--", value], mutates=False)
            text = r.stdout.strip()
            if not r.ok or not text.isdigit():
                raise MigrationError(f"workload {name}: cannot read a pid from {value} on {host}")
            return int(text)
        if kind == "systemd_unit":
            r = host.run(
                ["systemctl", "show", "--property=MainPID", "--value", "--", value], mutates=False
            )
            text = r.stdout.strip()
            if not r.ok or not text.isdigit() or text == "0":
                raise MigrationError(f"workload {name}: unit {value} has no main pid on {host}")
            return int(text)
        pattern = re.compile(value)
        table = procs.table(host)
        hits = {p.pid for p in table.values() if pattern.search(p.args)}
        roots = sorted(p for p in hits if table[p].ppid not in hits)
        if len(roots) != 1:
            found = ", ".join(map(str, roots)) or "none"
            raise MigrationError(
                f"workload {name}: match {value!r} must find exactly one process tree on {host} "
                f"(found: {found})"
            )
        return roots[0]

    def preflight(self, src: Host, dst: Host, target: Target) -> list[str]:
        problems = self._network_preflight(src, dst, target) if target.net else []
        if target.pidns_init:
            return problems  # restored into a fresh pid namespace: its pids cannot clash
        table = procs.table(dst)
        taken = [p for p in target.pids if p in table]
        if taken:
            shown = ", ".join(map(str, taken[:5]))
            problems.append(
                f"pid(s) {shown} of the tree are in use on {dst}: CRIU restores a plain process "
                "tree with its own pids; run the workload as the init of its own pid namespace "
                "(a container) or free those pids"
            )
        return problems

    def _network_preflight(self, src: Host, dst: Host, target: Target) -> list[str]:
        """The destination can take the workload's veth and address; CRIU can lock the network
        and repair TCP on both hosts. Chooses the network lock (nftables where both have it)."""
        assert target.net is not None
        problems = net.conflicts(dst, target.net, dst.config.bridge)
        has = {
            (h.name, feat): h.run(criu.feature(h.config.criu, feat), mutates=False).ok
            for h in (src, dst)
            for feat in ("network_lock_nftables", "tcp_half_closed")
        }
        both = lambda feat: has[(src.name, feat)] and has[(dst.name, feat)]  # noqa: E731
        target.network_lock = "nftables" if both("network_lock_nftables") else "iptables"
        if self.workload.network.tcp == "keep" and not both("tcp_half_closed"):
            problems.append(
                f"CRIU on {src.name} or {dst.name} lacks TCP repair (tcp_half_closed): "
                "connections cannot be kept; set network.tcp: close"
            )
        return problems

    def _checkpoint(self, host: Host, target: Target, cp: Checkpoint) -> None:
        options = criu.DumpOptions(
            pid=target.root_pid,
            images_dir=cp.images_dir,
            leave_stopped=not cp.running,
            ext_mount_map_auto=target.own_mntns,
            tcp_established=(target.net is not None or bool(target.tcp_connections))
            and not cp.running,
            skip_in_flight=self.workload.network.skip_in_flight,
            network_lock=None if cp.running else target.network_lock,
            track_mem=cp.track_mem,
            prev_images_dir=cp.parent_dir,
            channel_flags=dump_flags(cp.channel) if cp.channel else (),
            file_locks=bool(target.locked_files) and not cp.running,
            extra=self.workload.criu_options,
        )
        if cp.running:
            argv = criu.pre_dump(host.config.criu, options)
            r = host.run(argv, private=True)
            raise_on_failure(host, r, cp.images_dir, criu.PRE_DUMP_LOG, "pre-dump")
            return
        argv = criu.dump(host.config.criu, options)
        # the dump gets the page channel's socket, connected, on an fd
        call = cp.channel.connect(argv, host.agent is not None) if cp.channel else Call(argv)
        if cp.pages is Pages.LAZY:
            background.start(host, cp.images_dir, background.DUMP, call, criu.DUMP_LOG, "dump")
            return
        r = host.run(call.argv, private=True, sockets=call.sockets)
        raise_on_failure(host, r, cp.images_dir, criu.DUMP_LOG, "dump")
        if target.ends_at_dump and cp.pages is Pages.FILES:
            # Its locks must be free for the restore to take them (and its sockets are in
            # repair mode): the stopped copy goes now; a rollback restores it from the images.
            # (Stream's images lack the pages: file locks are refused there, and its rollback
            # unlocks the stopped copy's sockets instead: actions.resume_source.)
            self._kill(host, target.root_pid)
            self._wait_gone(host, target.root_pid)
            # CRIU's DROP rules for its connections stay (they keep the peers' packets from
            # meeting no socket, which would reset them) until a copy runs: see remove().
            self._lock_rules_left[host.name] = list(target.tcp_connections)

    def _wait_gone(self, host: Host, pid: int, timeout: float = 10.0) -> None:
        """Until pid has exited (and so let go of its locks); MigrationError after timeout."""
        deadline = time.monotonic() + timeout
        while procs.state(host, pid) != procs.GONE and not host.dry_run:
            if time.monotonic() > deadline:
                raise MigrationError(f"pid {pid} on {host} did not exit within {timeout:.0f}s")
            time.sleep(0.05)

    def restore(self, host: Host, target: Target, images_dir: str, lazy: bool = False) -> int:
        pid = self._restore(host, target, images_dir, host.config.bridge, lazy, moved=True)
        if target.net and pid:
            host.run(net.announce_argv(pid, target.net))
        return pid

    def _restore(
        self,
        host: Host,
        target: Target,
        images_dir: str,
        bridge: str,
        lazy: bool = False,
        moved: bool = False,
    ) -> int:
        """moved: on the destination (connections the policy closes are closed there; a
        rollback restores them as they were)."""
        pidfile = f"{images_dir}/{PIDFILE}"
        veths = [(target.net.interface, target.net.veth, bridge)] if target.net else []
        argv = criu.restore(
            host.config.criu,
            criu.RestoreOptions(
                images_dir=images_dir,
                pidfile=pidfile,
                ext_mount_map_auto=target.own_mntns,
                root="/" if target.own_mntns else None,
                tcp_established=target.net is not None or bool(target.tcp_connections),
                tcp_close=(target.net is not None and self.workload.network.tcp == "close")
                or (moved and target.tcp_close),
                network_lock=target.network_lock,
                veths=veths,
                lazy_pages=lazy,
                file_locks=True,  # whatever locks the images hold (also after `recover`)
                extra=self.workload.criu_options,
            ),
        )
        r = host.run(argv, private=True)
        raise_on_failure(host, r, images_dir, criu.RESTORE_LOG, "restore")
        return 0 if host.dry_run else self.find_restored(host, images_dir)

    def find_restored(self, host: Host, images_dir: str) -> int:
        """The pid CRIU wrote (read by the host's agent: no process inside the freeze)."""
        text = (host.read_file(f"{images_dir}/{PIDFILE}") or b"").decode(errors="replace").strip()
        return int(text) if text.isdigit() else 0

    def resume(self, host: Host, target: Target, images_dir: str) -> None:
        state = procs.state(host, target.root_pid)
        if state == procs.GONE and self.checkpointed(host, images_dir):
            # An earlier resume killed it and its restore failed: its images are the copy.
            self._restore_here(host, target, images_dir)
            return
        if (target.net is None and not target.ends_at_dump) or state != procs.STOPPED:
            # Left stopped by a dump: continue it. (A dump that failed has already let it run
            # on, unlocked; a workload that is gone cannot be resumed.)
            procs.signal(host, "CONT", target.to_continue(procs.tree_of(host, target.root_pid)))
            return
        # A completed dump left its sockets in TCP repair mode and its network locked: only a
        # restore brings those back. The stopped copy goes silently (repair mode sends no RST)
        # and its own images bring it back here, connections and all. If that restore fails,
        # the images are the only copy: they are kept (see actions.wipe_images_if_safe).
        self._kill(host, target.root_pid)
        self._wait_gone(host, target.root_pid)  # its pids, and locks, free for its images
        self._restore_here(host, target, images_dir)

    def checkpointed(self, host: Host, images_dir: str) -> bool:
        """A complete dump (its inventory written) is in images_dir on host."""
        return host.run(["test", "-s", f"{images_dir}/inventory.img"], mutates=False).ok

    def _restore_here(self, host: Host, target: Target, images_dir: str) -> None:
        if target.net is None:
            target.root_pid = self._restore(host, target, images_dir, host.config.bridge)
            self._drop_lock_rules(host)  # its restored sockets are back: nothing to guard
            return
        net.wait_veth_gone(host, target.net.veth, timeout=10)
        bridge = target.net.source_bridge or host.config.bridge
        target.root_pid = self._restore(host, target, images_dir, bridge)
        host.run(net.announce_argv(target.root_pid, target.net))

    def remove(self, host: Host, root_pid: int) -> None:
        self._kill(host, root_pid)
        self._drop_lock_rules(host)  # the copy that ended at its dump is gone for good

    def _kill(self, host: Host, root_pid: int) -> None:
        procs.signal(host, "KILL", procs.tree_of(host, root_pid))

    def _drop_lock_rules(self, host: Host) -> None:
        """Delete the network lock a dump of a tree in host's own network left for its
        connections (CRIU's iptables DROP rules, one per direction), and only those."""
        connections = self._lock_rules_left.pop(host.name, [])
        for tool in ("iptables", "ip6tables") if connections else ():
            listed = host.run([tool, "-w", "-S"], mutates=False)
            for rule in lock_rules(listed.stdout, connections):
                host.run([tool, "-w", "-D", *rule])

    def state(self, host: Host, root_pid: int) -> str:
        return procs.state(host, root_pid)


# CRIU marks its own packets with this while it locks a connection of a tree in the host's
# network (criu/netfilter.c: `-m mark ! --mark 0xc114 ... -j DROP`).
_CRIU_MARK = "--mark 0xc114"


def lock_rules(listing: str, connections: list[str]) -> list[list[str]]:
    """Of `iptables -S` output, CRIU's DROP rules for connections (`L:lp -> R:rp`), as the
    words after -A, to delete with -D."""
    wanted = set()
    for conn in connections:
        local, _, remote = conn.partition(" -> ")
        (lip, lport), (rip, rport) = _split(local), _split(remote)
        wanted.add(("INPUT", rip, lip, rport, lport))
        wanted.add(("OUTPUT", lip, rip, lport, rport))
    out = []
    for line in listing.splitlines():
        words = line.split()
        if words[:1] != ["-A"] or _CRIU_MARK not in line or "-j DROP" not in line:
            continue
        opt = {words[i]: words[i + 1] for i in range(2, len(words) - 1) if words[i][0] == "-"}
        key = (words[1], opt.get("-s", "").split("/")[0], opt.get("-d", "").split("/")[0],
               opt.get("--sport"), opt.get("--dport"))  # fmt: skip
        if key in wanted:
            out.append(words[1:])
    return out


def _split(endpoint: str) -> tuple[str, str]:
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]"), port
