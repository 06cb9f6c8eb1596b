"""Runtime `process`: a plain process tree, or a container that is init of its own pid namespace."""

from __future__ import annotations

import re

from orchestrator.criu import background, pagechannel
from orchestrator.criu import commands as criu
from orchestrator.criu.logs import raise_on_failure
from orchestrator.errors import MigrationError
from orchestrator.runtimes import net, procs
from orchestrator.runtimes.base import Runtime, Target
from orchestrator.transport.ssh import Host

PIDFILE = "restored.pid"
_THEN_CAT = 'umask 077; pf=$1; shift; "$@" || exit $?; cat -- "$pf"'  # #14: umask


class ProcessRuntime(Runtime):
    name = "process"
    strategies = frozenset({"stopcopy", "stream", "postcopy", "precopy", "hybrid"})

    def locate(self, host: Host) -> Target:
        pid = self._root_pid(host)
        ns = procs.namespaces(host, pid)
        table = procs.table(host)
        if ns is None or pid not in table:
            raise MigrationError(
                f"workload {self.workload.name}: pid {pid} is not running on {host} "
                "(it exited, or the pid is wrong)"
            )
        if table[pid].state.startswith("Z"):
            raise MigrationError(f"workload {self.workload.name}: pid {pid} is a zombie on {host}")
        pids = procs.tree(table, pid)
        target = Target(
            root_pid=pid,
            pids=pids,
            rss_kb=sum(table[p].rss_kb for p in pids),
            command=table[pid].args,
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

    def checkpoint(
        self,
        host: Host,
        target: Target,
        images_dir: str,
        page_port: int | None = None,
        lazy_port: int | None = None,
        prev_images_dir: str | None = None,
        channel: pagechannel.PageChannel | None = None,
    ) -> None:
        argv = criu.dump(
            host.config.criu,
            criu.DumpOptions(
                pid=target.root_pid,
                images_dir=images_dir,
                leave_stopped=True,
                ext_mount_map_auto=target.own_mntns,
                tcp_established=target.net is not None,
                skip_in_flight=self.workload.network.skip_in_flight,
                network_lock=target.network_lock,
                page_server_port=page_port,
                track_mem=prev_images_dir is not None,
                prev_images_dir=prev_images_dir,
                lazy_port=lazy_port,
                channel_flags=pagechannel.dump_flags(channel) if channel else (),  # #14
                extra=self.workload.criu_options,
            ),
        )
        if channel:  # #14: the dump gets the channel's socket, connected, on an fd
            argv = channel.connect_argv(argv)
        if lazy_port or (channel and channel.lazy):
            background.start(host, images_dir, background.DUMP, argv, criu.DUMP_LOG, "dump")
            return
        raise_on_failure(host, host.run(argv), images_dir, criu.DUMP_LOG, "dump")

    def pre_dump(
        self, host: Host, target: Target, images_dir: str, prev_images_dir: str | None
    ) -> None:
        argv = criu.pre_dump(
            host.config.criu,
            criu.DumpOptions(
                pid=target.root_pid,
                images_dir=images_dir,
                leave_stopped=False,
                ext_mount_map_auto=target.own_mntns,
                track_mem=True,
                prev_images_dir=prev_images_dir,
                extra=self.workload.criu_options,
            ),
        )
        raise_on_failure(host, host.run(argv), images_dir, criu.PRE_DUMP_LOG, "pre-dump")

    def restore(self, host: Host, target: Target, images_dir: str, lazy: bool = False) -> int:
        pid = self._restore(host, target, images_dir, host.config.bridge, lazy)
        if target.net and pid:
            host.run(net.announce_argv(pid, target.net))
        return pid

    def _restore(
        self, host: Host, target: Target, images_dir: str, bridge: str, lazy: bool = False
    ) -> int:
        pidfile = f"{images_dir}/{PIDFILE}"
        veths = [(target.net.interface, target.net.veth, bridge)] if target.net else []
        argv = criu.restore(
            host.config.criu,
            criu.RestoreOptions(
                images_dir=images_dir,
                pidfile=pidfile,
                ext_mount_map_auto=target.own_mntns,
                root="/" if target.own_mntns else None,
                tcp_established=target.net is not None,
                tcp_close=target.net is not None and self.workload.network.tcp == "close",
                network_lock=target.network_lock,
                veths=veths,
                lazy_pages=lazy,
                extra=self.workload.criu_options,
            ),
        )
        # One round trip inside the freeze: restore, then print the pid CRIU wrote.
        r = host.run(["sh", "-c", _THEN_CAT, "sh", pidfile, *argv])
        raise_on_failure(host, r, images_dir, criu.RESTORE_LOG, "restore")
        if host.dry_run:
            return 0
        last = r.stdout.strip().rsplit("\n", 1)[-1]
        return int(last) if last.isdigit() else self.find_restored(host, images_dir)

    def find_restored(self, host: Host, images_dir: str) -> int:
        r = host.run(["cat", "--", f"{images_dir}/{PIDFILE}"], mutates=False)
        text = r.stdout.strip()
        return int(text) if r.ok and text.isdigit() else 0

    def resume(self, host: Host, target: Target, images_dir: str) -> None:
        state = procs.state(host, target.root_pid)
        if target.net is None or state != procs.STOPPED:
            # Left stopped by a dump: continue it. (A dump that failed has already let it run
            # on, unlocked; a workload that is gone cannot be resumed.)
            procs.signal(host, "CONT", procs.tree_of(host, target.root_pid))
            return
        # A completed dump left its sockets in TCP repair mode and its network locked: only a
        # restore brings those back. The stopped copy goes silently (repair mode sends no RST)
        # and its own images bring it back here, connections and all.
        self.remove(host, target.root_pid)
        net.wait_veth_gone(host, target.net.veth, timeout=10)
        bridge = target.net.source_bridge or host.config.bridge
        target.root_pid = self._restore(host, target, images_dir, bridge)
        host.run(net.announce_argv(target.root_pid, target.net))

    def remove(self, host: Host, root_pid: int) -> None:
        procs.signal(host, "KILL", procs.tree_of(host, root_pid))

    def state(self, host: Host, root_pid: int) -> str:
        return procs.state(host, root_pid)
