"""Restore on the destination, in the destination's namespaces; the workload runs there after."""

from __future__ import annotations

import time

from orchestrator.phases.base import Phase, settle
from orchestrator.plan import Context


class Restore(Phase):
    name = "restore"

    def act(self, ctx: Context) -> None:
        assert ctx.target is not None
        ctx.restored_pid = ctx.runtime.restore(ctx.dst, ctx.target, ctx.dst_dir)
        ctx.running_at = time.monotonic()

    def undo(self, ctx: Context) -> None:
        settle(ctx.dst, ctx.plan.dst_images, ctx.plan.policy.command_timeout)
        pid = ctx.restored_pid or ctx.runtime.find_restored(ctx.dst, ctx.dst_dir)
        if pid:
            ctx.runtime.remove(ctx.dst, pid)
            ctx.restored_pid = 0
