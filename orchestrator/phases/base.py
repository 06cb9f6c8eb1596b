"""A phase acts, and knows how to undo what it did; the runner is the only one that walks them."""

from __future__ import annotations

from abc import ABC, abstractmethod

from orchestrator.plan import Context
from orchestrator.transport.ssh import Host


class Phase(ABC):
    name: str
    #: Past this phase there is no rollback: its errors are reported, not undone.
    commits: bool = False

    @abstractmethod
    def act(self, ctx: Context) -> None: ...

    def undo(self, ctx: Context) -> None:  # noqa: B027 - most phases change nothing to undo
        """Undo act (also after a partial act); must be safe to call when act did nothing."""


def make_private_dir(host: Host, path: str) -> None:
    """Create path (and parents) as 0700: image directories hold process memory."""
    host.run(["sh", "-c", 'umask 077 && mkdir -p -- "$1"', "sh", path], check=True)


def remove_dir(host: Host, path: str) -> None:
    host.run(["rm", "-rf", "--", path])
