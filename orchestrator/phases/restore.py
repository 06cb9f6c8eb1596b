"""Restore on the destination, in the destination's namespaces; the workload runs there after."""

from __future__ import annotations

import time

from orchestrator.criu import manifest
from orchestrator.phases.base import Phase, settle
from orchestrator.plan import Context


class Restore(Phase):
    name = "restore"

    def act(self, ctx: Context) -> None:
        assert ctx.target is not None
        verify_images(ctx)  # #14
        ctx.restored_pid = ctx.runtime.restore(ctx.dst, ctx.target, ctx.dst_dir)
        ctx.running_at = time.monotonic()

    def undo(self, ctx: Context) -> None:
        settle(ctx.dst, ctx.plan.dst_images, ctx.plan.policy.command_timeout)
        pid = ctx.restored_pid or ctx.runtime.find_restored(ctx.dst, ctx.dst_dir)
        if pid:
            ctx.runtime.remove(ctx.dst, pid)
            ctx.restored_pid = 0


def verify_images(ctx: Context) -> None:
    """#14: refuse images that are not what the source dumped (before anything restores)."""
    if ctx.manifest is not None:
        root = ctx.plan.dst_images  # names are relative to it (pre-copy rounds, final)
        manifest.verify(ctx.dst, root, ctx.manifest, ctx.src.name)
