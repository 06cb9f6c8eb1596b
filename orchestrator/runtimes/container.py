"""What the container runtimes (lxc, runc, podman) share: a container found by name, driven
by the runtime's own tool, whose checkpoint and restore run CRIU for us."""

from __future__ import annotations

from abc import abstractmethod

from orchestrator.criu.logs import raise_on_failure
from orchestrator.errors import MigrationError
from orchestrator.runtimes import net, procs
from orchestrator.runtimes.base import Runtime, Target
from orchestrator.transport.ssh import Host, Result

# Run a command detached from the ssh session (a restored container must not inherit it):
# stdin/stdout to /dev/null, stderr to a file that is printed if the command fails.
_DETACHED = (
    'err=$1; shift; "$@" </dev/null >/dev/null 2>"$err" || { s=$?; cat -- "$err" >&2; exit $s; }'
)


class ContainerRuntime(Runtime):
    """A container named in the config, found, checkpointed and restored by its runtime."""

    tool: str  # the runtime's binary, checked on both hosts
    # What their own checkpoint commands can do: one full dump. No page server, no lazy pages,
    # no pre-dump (runc's --pre-dump needs soft-dirty memory tracking, which this kernel lacks).
    capabilities = frozenset()

    @property
    def container(self) -> str:
        assert self.workload.container is not None  # config guarantees it
        return self.workload.container

    @abstractmethod
    def status(self, host: Host) -> tuple[str, int]:
        """(procs.RUNNING | STOPPED | GONE, init pid or 0) of the container on host."""

    def paths(self, host: Host, pid: int) -> list[str]:
        """Directories that must travel with the images (found on the source)."""
        return []

    def more_preflight(self, src: Host, dst: Host, target: Target) -> list[str]:
        return []

    def has_tool(self, host: Host) -> bool:
        return host.run(["sh", "-c", 'command -v "$1"', "sh", self.tool], mutates=False).ok

    def locate(self, host: Host) -> Target:
        if not self.has_tool(host):
            raise MigrationError(f"{self.tool} is not installed on {host}")
        state, pid = self.status(host)
        if state != procs.RUNNING or not pid:
            shown = "does not exist" if state == procs.GONE else f"is {state}"
            raise MigrationError(
                f"workload {self.workload.name}: {self.name} container {self.container} "
                f"{shown} on {host} (it must be running)"
            )
        table = procs.table(host)
        if pid not in table:
            raise MigrationError(f"{self.name} container {self.container}: pid {pid} is gone")
        pids = procs.tree(table, pid)
        return Target(
            root_pid=pid,
            pids=pids,
            rss_kb=sum(table[p].rss_kb for p in pids),
            command=table[pid].args,
            pidns_init=True,
            own_mntns=True,
            paths=self.paths(host, pid),
        )

    def preflight(self, src: Host, dst: Host, target: Target) -> list[str]:
        if not self.has_tool(dst):
            return [f"{self.tool} is not installed on {dst}"]
        problems = []
        state, _ = self.status(dst)
        if state != procs.GONE:
            problems.append(
                f"a {self.name} container named {self.container} already exists on {dst} "
                f"({state}): remove it first"
            )
        return problems + self.more_preflight(src, dst, target)

    def find_restored(self, host: Host, images_dir: str) -> int:
        state, pid = self.status(host)
        return pid if state != procs.GONE else 0

    def state(self, host: Host, root_pid: int) -> str:
        state, pid = self.status(host)
        if root_pid and pid and pid != root_pid:
            return procs.GONE  # another copy under that name, not the one asked about
        return state

    def running_pid(self, host: Host, what: str) -> int:
        """The init pid of the container just restored on host (MigrationError if none), its
        addresses announced (unsolicited ARP: peers and switches move on at once)."""
        if host.dry_run:
            return 0
        state, pid = self.status(host)
        if state != procs.RUNNING or not pid:
            raise MigrationError(f"{what} on {host}: container {self.container} is {state}")
        host.run(net.announce_all_argv(pid))
        return pid


def detached(host: Host, argv: list[str], err_file: str) -> Result:
    """Run argv on host with stdio away from the session (see _DETACHED)."""
    return host.run(["sh", "-c", _DETACHED, "sh", err_file, *argv])


def criu_failed(host: Host, result: Result, images_dir: str, log: str, what: str) -> None:
    """Raise with CRIU's error lines (from its log in images_dir) if the tool failed."""
    raise_on_failure(host, result, images_dir, log, what)
