"""How one dump runs, as one frozen record every runtime takes (a new strategy adds a field
here, not a keyword to five runtimes), and the capabilities runtimes declare for it."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from orchestrator.criu.pagechannel import PageChannel


class Pages(Enum):
    """How a dump's memory pages travel."""

    FILES = "files"  # written into the images dir, moved by rsync
    PAGE_SERVER = "page-server"  # streamed to a page server on the destination
    LAZY = "lazy"  # kept in the frozen source and served on demand (post-copy)


class Capability(Enum):
    """What a runtime's checkpoint can do beyond one full dump into files."""

    PRE_DUMP = "pre-dump"  # rounds of dirty-memory-tracked dumps while the workload runs
    PAGE_SERVER = "page-server"
    LAZY_PAGES = "lazy-pages"


@dataclass(frozen=True)
class Checkpoint:
    """One dump: where its images go and how its pages travel.

    `running` is a pre-copy round (a pre-dump: the workload runs on); otherwise the workload
    is left stopped, never killed, until confirm. `parent_dir` (relative to images_dir) holds
    earlier images: only pages changed since are written (CRIU's --track-mem)."""

    images_dir: str
    pages: Pages = Pages.FILES
    channel: PageChannel | None = None  # the page channel (stream, post-copy): Unix sockets
    parent_dir: str | None = None
    running: bool = False

    @property
    def track_mem(self) -> bool:
        return self.running or self.parent_dir is not None

    @property
    def needs(self) -> frozenset[Capability]:
        """The runtime capabilities this dump needs."""
        out = {Capability.PRE_DUMP} if self.running else set()
        if self.pages is Pages.PAGE_SERVER:
            out.add(Capability.PAGE_SERVER)
        if self.pages is Pages.LAZY:
            out.add(Capability.LAZY_PAGES)
        return frozenset(out)
