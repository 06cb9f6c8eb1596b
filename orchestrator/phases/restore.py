"""Restore on the destination, in the destination's namespaces; the workload runs there after."""

from __future__ import annotations

import time

from orchestrator import actions, freeze
from orchestrator.journal import Stage
from orchestrator.phases.base import Phase
from orchestrator.plan import Context


class Restore(Phase):
    name = "restore"
    stage = Stage.RESTORING

    def act(self, ctx: Context) -> None:
        assert ctx.target is not None
        t0 = time.monotonic()
        with ctx.dst.recording() as ran:
            ctx.restored_pid = ctx.runtime.restore(ctx.dst, ctx.target, ctx.dst_images.final)
        began, ended = freeze.span(ran, to_longest=True)
        ctx.clock.restore_started_at, ctx.clock.running_at = began or t0, ended or time.monotonic()

    def undo(self, ctx: Context) -> None:
        actions.remove_restored(ctx)
