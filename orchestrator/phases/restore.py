"""Restore on the destination, in the destination's namespaces; the workload runs there after."""

from __future__ import annotations

import time

from orchestrator import actions
from orchestrator.journal import Stage
from orchestrator.phases.base import Phase
from orchestrator.plan import Context


class Restore(Phase):
    name = "restore"
    stage = Stage.RESTORING

    def act(self, ctx: Context) -> None:
        assert ctx.target is not None
        ctx.restored_pid = ctx.runtime.restore(ctx.dst, ctx.target, ctx.dst_images.final)
        ctx.clock.running_at = time.monotonic()

    def undo(self, ctx: Context) -> None:
        actions.remove_restored(ctx)
