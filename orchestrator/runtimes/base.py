"""The one small interface every runtime (process, lxc, runc, podman) implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from orchestrator.config import WorkloadConfig
from orchestrator.criu.pagechannel import PageChannel
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


class Runtime(ABC):
    """How to find, checkpoint, restore, resume and remove one kind of workload."""

    name: str
    #: The strategies this runtime can carry out; pre-flight refuses the others.
    strategies: frozenset[str] = frozenset({"stopcopy"})

    def __init__(self, workload: WorkloadConfig) -> None:
        self.workload = workload

    @abstractmethod
    def locate(self, host: Host) -> Target:
        """Find the workload on host (read-only); MigrationError if it is not there."""

    @abstractmethod
    def preflight(self, src: Host, dst: Host, target: Target) -> list[str]:
        """Reasons this workload cannot move from src to dst (empty = fine); read-only."""

    @abstractmethod
    def checkpoint(
        self,
        host: Host,
        target: Target,
        images_dir: str,
        page_port: int | None = None,
        lazy_port: int | None = None,
        prev_images_dir: str | None = None,
        channel: PageChannel | None = None,  # #14
    ) -> None:
        """Dump the workload into images_dir, leaving it stopped (not killed) on host; with
        page_port, its pages go to the page server tunnelled at 127.0.0.1:page_port; with
        lazy_port (post-copy), they stay in memory and a detached dump serves them there until
        the destination has pulled them all (its exit code: background name DUMP); with
        prev_images_dir (pre-copy; relative to images_dir), only pages changed since those
        images are written (CRIU's --track-mem --prev-images-dir). With channel (#14), pages
        go over the page channel's Unix socket instead (streamed, or served lazily if
        channel.lazy); runtimes without a page server ignore it."""

    def pre_dump(
        self, host: Host, target: Target, images_dir: str, prev_images_dir: str | None
    ) -> None:
        """A pre-copy round: the workload's memory into images_dir while it runs on, with
        dirty-memory tracking (after prev_images_dir, relative to images_dir, if given).
        Runtimes with "precopy" in `strategies` override this."""
        raise MigrationError(f"runtime {self.name} cannot pre-copy (no pre-dump)")

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
