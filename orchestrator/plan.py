"""A migration plan (what moves where, how, under which policy) and the state of one run:
the shared core in Context, and one small state object per kind of work (pre-copy rounds,
post-copy pages, the clock of the freeze)."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

from orchestrator.config import HostConfig, Policy, WorkloadConfig
from orchestrator.criu.manifest import Manifest
from orchestrator.criu.pagechannel import PageChannel
from orchestrator.journal import Summary
from orchestrator.layout import ImageLayout
from orchestrator.report import Round
from orchestrator.runtimes.base import Runtime, Target
from orchestrator.strategies import Strategy
from orchestrator.transport.link import Link
from orchestrator.transport.rsync import LinkSpec
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
    def src_layout(self) -> ImageLayout:
        return ImageLayout.under(self.source.workdir, self.id)

    @property
    def dst_layout(self) -> ImageLayout:
        return ImageLayout.under(self.destination.workdir, self.id)

    @property
    def src_images(self) -> str:
        return self.src_layout.root

    @property
    def dst_images(self) -> str:
        return self.dst_layout.root

    def lock_path(self, root_pid: int) -> str:
        """One lock per workload on the source, keyed by its root pid there."""
        return f"{self.source.workdir.rstrip('/')}/locks/pid-{root_pid}.lock"

    @property
    def link_spec(self) -> LinkSpec:
        return LinkSpec(self.source, self.destination, self.policy, self.src_layout.link_socket)


def new_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


@dataclass
class Clock:
    """The freeze, on the controller's time.monotonic(): from the final dump command's start on
    the source to the restore command's end on the destination, both stamped on those hosts by
    their agents (the controller's own time around the calls without one). The rest is the
    freeze breakdown's parts (orchestrator/freeze.py)."""

    frozen_at: float | None = None
    dumped_at: float | None = None  # the final dump is done (the freeze goes on)
    transferred_at: float | None = None
    restore_started_at: float | None = None
    running_at: float | None = None
    transfer_ms: float | None = None  # the images' transfer command(s) inside the freeze
    transfer_bytes: int = 0  # what they moved
    freeze: dict[str, float | int | None] | None = None  # the breakdown, once measured

    @property
    def downtime_ms(self) -> int | None:
        if self.frozen_at is None or self.running_at is None:
            return None
        return round((self.running_at - self.frozen_at) * 1000)


@dataclass
class PrecopyState:
    """Pre-copy's rounds: the rows of the rounds table, and what stopped them."""

    count: int = 0
    last_start: float | None = None  # when the last round's pre-dump began
    rounds: list[Round] = field(default_factory=list)
    stopped_by: str | None = None


@dataclass
class PostcopyState:
    """Post-copy's pages after the destination resumed."""

    pages_done_at: float | None = None  # every page has reached the destination
    pulled_bytes: int = 0


@dataclass
class Context:
    """What the phases share while one migration runs."""

    plan: Plan
    strategy: Strategy
    src: Host
    dst: Host
    runtime: Runtime
    link: Link
    src_images: ImageLayout
    dst_images: ImageLayout
    target: Target | None = None
    lock: RemoteLock | None = None  # held on the source from pre-flight to the end
    page_channel: PageChannel | None = None  # stream/post-copy: how pages travel (#14)
    image_pipe: str | None = None  # the image pipe's forward (phases/imagepipe.py), if open
    pipe_bytes: int = 0  # what the image pipe moved
    manifest: Manifest | None = None  # the images' checksums (rounds, final), from the source
    restored_pid: int = 0
    restored_start: int | None = None  # its start time there (verify reads it)
    committed: bool = False  # the destination has resumed: no rollback from here on
    connections_kept: int | None = None  # established TCP connections in the images
    clock: Clock = field(default_factory=Clock)
    precopy: PrecopyState = field(default_factory=PrecopyState)
    postcopy: PostcopyState = field(default_factory=PostcopyState)
    notes: list[str] = field(default_factory=list)
    # Unfinished migrations in the journal (their controllers died, or run): pre-flight
    # refuses the workload if one of them holds the same process.
    unfinished: tuple[Summary, ...] = ()

    @classmethod
    def for_plan(cls, plan: Plan, strategy: Strategy, src: Host, dst: Host,
                 runtime: Runtime) -> Context:  # fmt: skip
        return cls(plan=plan, strategy=strategy, src=src, dst=dst, runtime=runtime,
                   link=Link(plan.link_spec, src), src_images=plan.src_layout,
                   dst_images=plan.dst_layout)  # fmt: skip

    @property
    def rounds(self) -> list[Round]:
        """Pre-copy's rounds so far (the live view follows them)."""
        return self.precopy.rounds

    @property
    def bytes_transferred(self) -> int:
        """Every byte that moved: rsync's, the image pipe's, pages streamed through the page
        channel inside the freeze, and pages pulled after a post-copy resume."""
        streamed = int((self.clock.freeze or {}).get("page_bytes") or 0)
        return self.link.bytes_sent + self.pipe_bytes + streamed + self.postcopy.pulled_bytes

    @property
    def postcopy_tail_ms(self) -> int | None:
        """Post-copy: from running on the destination to every page pulled."""
        done, running = self.postcopy.pages_done_at, self.clock.running_at
        if running is None or done is None:
            return None
        return round((done - running) * 1000)
