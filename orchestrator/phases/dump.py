"""Freeze: the final dump on the source, which is left stopped (never killed) until confirm."""

from __future__ import annotations

import time

from orchestrator.phases.base import Phase
from orchestrator.plan import Context


class Dump(Phase):
    name = "dump"

    def act(self, ctx: Context) -> None:
        assert ctx.target is not None
        ctx.frozen_at = time.monotonic()
        ctx.runtime.checkpoint(ctx.src, ctx.target, ctx.plan.src_images)

    def undo(self, ctx: Context) -> None:
        if ctx.target is not None:
            ctx.runtime.resume(ctx.src, ctx.target)
