"""Runtime `process`: a plain process tree, or a container that is init of its own pid namespace."""

from __future__ import annotations

import re

from orchestrator.criu import commands as criu
from orchestrator.criu.logs import error_lines
from orchestrator.errors import MigrationError
from orchestrator.runtimes import procs
from orchestrator.runtimes.base import Runtime, Target
from orchestrator.transport.ssh import Host, Result

PIDFILE = "restored.pid"
_THEN_CAT = 'pf=$1; shift; "$@" || exit $?; cat -- "$pf"'


class ProcessRuntime(Runtime):
    name = "process"

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
        return Target(
            root_pid=pid,
            pids=pids,
            rss_kb=sum(table[p].rss_kb for p in pids),
            command=table[pid].args,
            pidns_init=ns.pidns_init,
            own_mntns=ns.own_mntns,
            own_netns=ns.own_netns,
        )

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
        if target.pidns_init:
            return []  # restored into a fresh pid namespace: its pids cannot clash
        table = procs.table(dst)
        taken = [p for p in target.pids if p in table]
        if taken:
            shown = ", ".join(map(str, taken[:5]))
            return [
                f"pid(s) {shown} of the tree are in use on {dst}: CRIU restores a plain process "
                "tree with its own pids; run the workload as the init of its own pid namespace "
                "(a container) or free those pids"
            ]
        return []

    def checkpoint(self, host: Host, target: Target, images_dir: str) -> None:
        argv = criu.dump(
            host.config.criu,
            criu.DumpOptions(
                pid=target.root_pid,
                images_dir=images_dir,
                leave_stopped=True,
                ext_mount_map_auto=target.own_mntns,
                extra=self.workload.criu_options,
            ),
        )
        _criu_or_raise(host, host.run(argv), images_dir, criu.DUMP_LOG, "dump")

    def restore(self, host: Host, target: Target, images_dir: str) -> int:
        pidfile = f"{images_dir}/{PIDFILE}"
        argv = criu.restore(
            host.config.criu,
            criu.RestoreOptions(
                images_dir=images_dir,
                pidfile=pidfile,
                ext_mount_map_auto=target.own_mntns,
                root="/" if target.own_mntns else None,
                extra=self.workload.criu_options,
            ),
        )
        # One round trip inside the freeze: restore, then print the pid CRIU wrote.
        r = host.run(["sh", "-c", _THEN_CAT, "sh", pidfile, *argv])
        _criu_or_raise(host, r, images_dir, criu.RESTORE_LOG, "restore")
        if host.dry_run:
            return 0
        last = r.stdout.strip().rsplit("\n", 1)[-1]
        return int(last) if last.isdigit() else self.find_restored(host, images_dir)

    def find_restored(self, host: Host, images_dir: str) -> int:
        r = host.run(["cat", "--", f"{images_dir}/{PIDFILE}"], mutates=False)
        text = r.stdout.strip()
        return int(text) if r.ok and text.isdigit() else 0

    def resume(self, host: Host, target: Target) -> None:
        procs.signal(host, "CONT", procs.tree_of(host, target.root_pid))

    def remove(self, host: Host, root_pid: int) -> None:
        procs.signal(host, "KILL", procs.tree_of(host, root_pid))

    def state(self, host: Host, root_pid: int) -> str:
        return procs.state(host, root_pid)


def _criu_or_raise(host: Host, result: Result, images_dir: str, log: str, what: str) -> None:
    """Raise with CRIU's own error lines from its log on that host when a CRIU run failed."""
    if result.ok:
        return
    text = host.run(["cat", "--", f"{images_dir}/{log}"], mutates=False).stdout
    lines = error_lines(text) or error_lines(result.stderr) or [result.error_line()]
    raise MigrationError(
        f"criu {what} failed on {host} (exit {result.exit_code}): {lines[-1]}", details=lines
    )
