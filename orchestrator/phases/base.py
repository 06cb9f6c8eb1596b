"""A phase acts, and knows how to undo what it did; the runner is the only one that walks them."""

from __future__ import annotations

from abc import ABC, abstractmethod

from orchestrator.errors import MigrationError
from orchestrator.plan import Context
from orchestrator.runtimes import procs
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


def settle(host: Host, images_dir: str, timeout: float) -> None:
    """Before undoing: wait for a CRIU still working on images_dir (an interrupted or timed-out
    command goes on remotely), so that e.g. a late dump cannot stop a source just resumed."""
    if host.dry_run:
        return
    if not procs.wait_gone(host, images_dir, timeout):
        raise MigrationError(f"a process on {host} still uses {images_dir} after {timeout:.0f}s")


def kept_images_note(ctx: Context) -> str:
    """#14: what --keep-images leaves behind, and that it is the workload's memory."""
    plan = ctx.plan
    return (
        f"images kept (--keep-images) at {ctx.src.name}:{plan.src_images} and "
        f"{ctx.dst.name}:{plan.dst_images}: they hold the workload's memory (secrets included; "
        "root-only files); remove them when done"
    )
