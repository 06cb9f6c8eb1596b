"""A migration plan: what moves where, how, under which policy; and the state of a run."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

from orchestrator.config import Config, ConfigError, HostConfig, Policy, WorkloadConfig
from orchestrator.criu.manifest import Manifest
from orchestrator.criu.pagechannel import PageChannel
from orchestrator.report import Round
from orchestrator.runtimes.base import Runtime, Target
from orchestrator.transport.ssh import Host, RemoteLock


@dataclass(frozen=True)
class Plan:
    id: str
    workload: WorkloadConfig
    source: HostConfig
    destination: HostConfig
    strategy: str
    policy: Policy
    keep_images: bool = False
    dry_run: bool = False

    @property
    def src_images(self) -> str:
        return f"{self.source.workdir.rstrip('/')}/images/{self.id}"

    @property
    def dst_images(self) -> str:
        return f"{self.destination.workdir.rstrip('/')}/images/{self.id}"

    def lock_path(self, root_pid: int) -> str:
        """One lock per workload on the source, keyed by its root pid there."""
        return f"{self.source.workdir.rstrip('/')}/locks/pid-{root_pid}.lock"

    @property
    def link_socket(self) -> str | None:
        """Control socket on the source for its ssh link to the destination (None: too long)."""
        path = f"{self.source.workdir.rstrip('/')}/images/ssh-{self.id}"
        return path if len(path) < 100 else None  # sun_path holds 108 bytes; ssh adds a suffix


def new_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def make_plan(
    config: Config,
    workload: str,
    source: str,
    destination: str,
    strategy: str = "auto",
    keep_images: bool = False,
    dry_run: bool = False,
) -> Plan:
    """Resolve names against the config (ConfigError on anything unknown)."""
    src, dst = config.host(source), config.host(destination)
    if src.name == dst.name:
        raise ConfigError(f"source and destination are the same host ({src.name})")
    return Plan(
        id=new_id(),
        workload=config.workload(workload),
        source=src,
        destination=dst,
        strategy=strategy,
        policy=config.policy,
        keep_images=keep_images,
        dry_run=dry_run,
    )


@dataclass
class Context:
    """What the phases share while one migration runs."""

    plan: Plan
    src: Host
    dst: Host
    runtime: Runtime
    target: Target | None = None
    restored_pid: int = 0
    bytes_transferred: int = 0
    frozen_at: float | None = None
    dumped_at: float | None = None  # the final dump is done (the freeze goes on)
    transferred_at: float | None = None
    running_at: float | None = None
    notes: list[str] = field(default_factory=list)
    lock: RemoteLock | None = None  # held on the source from pre-flight to the end
    connections_kept: int | None = None  # established TCP connections in the images
    page_port: int | None = None  # stream/post-copy: the tunnelled page server's port
    page_channel: PageChannel | None = None  # #14: stream/post-copy pages (Unix sockets)
    manifest: Manifest | None = None  # #14: the images' checksums (rounds, final), from src
    committed: bool = False  # the destination has resumed: no rollback from here on
    pages_done_at: float | None = None  # post-copy: every page has reached the destination
    pulled_bytes: int = 0  # post-copy: memory the destination pulled after it resumed
    transfer_seconds: float = 0.0  # time rsync spent moving images
    # Pre-copy: the final dump goes into this subdir of the image dirs (after the rounds in
    # 1, 2, ... N), on top of prev_images_dir (relative to it); restore reads it from there.
    images_subdir: str = ""
    prev_images_dir: str | None = None
    rounds: list[Round] = field(default_factory=list)
    stopped_by: str | None = None  # which stop rule ended pre-copy

    @property
    def src_dir(self) -> str:
        """Where the final dump writes on the source (the image root, or its subdir)."""
        return _join(self.plan.src_images, self.images_subdir)

    @property
    def dst_dir(self) -> str:
        """Where restore reads on the destination."""
        return _join(self.plan.dst_images, self.images_subdir)

    @property
    def downtime_ms(self) -> int | None:
        if self.frozen_at is None or self.running_at is None:
            return None
        return round((self.running_at - self.frozen_at) * 1000)

    @property
    def postcopy_tail_ms(self) -> int | None:
        """Post-copy: from running on the destination to every page pulled."""
        if self.running_at is None or self.pages_done_at is None:
            return None
        return round((self.pages_done_at - self.running_at) * 1000)


def _join(root: str, sub: str) -> str:
    return f"{root}/{sub}" if sub else root
