"""The one small interface every runtime (process, lxc, runc, podman) implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from orchestrator.checkpoint import Capability, Checkpoint
from orchestrator.config import WorkloadConfig
from orchestrator.errors import MigrationError
from orchestrator.runtimes.net import NetInfo
from orchestrator.transport.ssh import Host


@dataclass
class Target:
    """A located workload on the source host."""

    root_pid: int
    pids: list[int]
    rss_kb: int
    command: str
    start_time: int | None = None  # of root_pid: (pid, start time) names one process
    pidns_init: bool = False
    own_mntns: bool = False
    own_netns: bool = False
    net: NetInfo | None = None  # when it owns a network namespace: what travels with it
    network_lock: str | None = None  # chosen in pre-flight: nftables or iptables
    notes: list[str] = field(default_factory=list)
    # Directories that travel with the images (a container's bundle, config, rootfs): mirrored
    # to the same path on the destination by the transfer phase (runtimes fill it in locate).
    paths: list[str] = field(default_factory=list)
    new_paths: list[str] = field(default_factory=list)  # of those, made on the destination by us
    # Tasks the workload itself had stopped (state T) when found: a rollback leaves them so.
    self_stopped: list[int] = field(default_factory=list)
    # Found in pre-flight (workloadcheck): files it holds locks on, its TCP connections (a tree
    # in the host's network: `local -> remote`), and whether the restore closes them (policy).
    locked_files: list[str] = field(default_factory=list)
    tcp_connections: list[str] = field(default_factory=list)
    tcp_close: bool = False

    @property
    def ends_at_dump(self) -> bool:
        """Whether its stopped source copy must go once dumped: it holds file locks the restore
        takes. A rollback restores it from its images (as for a workload with its own
        network). (TCP sockets the dump left in repair mode are unlocked by a rollback
        instead: actions.resume_source.)"""
        return bool(self.locked_files)

    def to_continue(self, tree: list[int]) -> list[int]:
        """Of tree, the tasks a resume must SIGCONT: those the tool stopped, not the others."""
        return [p for p in tree if p not in self.self_stopped]


class Runtime(ABC):
    """How to find, checkpoint, restore, resume and remove one kind of workload."""

    name: str
    #: What its checkpoint can do beyond one full dump (the strategy table matches these).
    capabilities: frozenset[Capability] = frozenset()
    #: Pre-flight judges its process tree from /proc (workloadcheck) and it carries the file
    #: locks and TCP connections found there (see Target.ends_at_dump).
    inspects_tree: bool = False

    def __init__(self, workload: WorkloadConfig) -> None:
        self.workload = workload

    @abstractmethod
    def locate(self, host: Host) -> Target:
        """Find the workload on host (read-only); MigrationError if it is not there."""

    @abstractmethod
    def preflight(self, src: Host, dst: Host, target: Target) -> list[str]:
        """Reasons this workload cannot move from src to dst (empty = fine); read-only."""

    def checkpoint(self, host: Host, target: Target, cp: Checkpoint) -> None:
        """Dump the workload as cp says: a full dump leaves it stopped (not killed) on host; a
        pre-copy round (cp.running) lets it run on. Refuses what this runtime cannot do."""
        lacking = cp.needs - self.capabilities
        if lacking:
            raise MigrationError(
                f"runtime {self.name} cannot do {', '.join(sorted(c.value for c in lacking))}"
            )
        self._checkpoint(host, target, cp)

    @abstractmethod
    def _checkpoint(self, host: Host, target: Target, cp: Checkpoint) -> None:
        """checkpoint, once the capabilities are known to fit. With cp.pages LAZY, the dump
        runs detached and serves the pages until the destination has pulled them all (its exit
        code: background name DUMP)."""

    @abstractmethod
    def restore(self, host: Host, target: Target, images_dir: str, lazy: bool = False) -> int:
        """Restore from images_dir on host; returns the restored root pid as host sees it.
        With lazy, memory comes from the lazy-pages daemon already running for images_dir."""

    @abstractmethod
    def find_restored(self, host: Host, images_dir: str) -> int:
        """The root pid of a copy a (possibly interrupted) restore left on host; 0 if none."""

    @abstractmethod
    def resume(self, host: Host, target: Target, images_dir: str) -> None:
        """Undo a checkpoint: let the stopped source copy run on (target.root_pid may change)."""

    @abstractmethod
    def remove(self, host: Host, root_pid: int) -> None:
        """Kill a copy of the workload (the stopped source at confirm, a restored one on undo)."""

    @abstractmethod
    def state(self, host: Host, root_pid: int) -> str:
        """This copy's state: procs.RUNNING, procs.STOPPED or procs.GONE."""

    def extra_paths(self, target: Target) -> list[str]:
        """What else must exist on the destination (same path) before the restore."""
        return list(target.paths)

    def checkpointed(self, host: Host, images_dir: str) -> bool:
        """Whether the source copy now exists only as its images in images_dir (a runtime whose
        checkpoint ends the container): `resume` restores it from them. Read-only."""
        return False

    def running(self, host: Host, root_pid: int) -> bool:
        return self.state(host, root_pid) == "running"
