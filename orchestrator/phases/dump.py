"""Freeze: the final dump on the source, which is left stopped (never killed) until confirm."""

from __future__ import annotations

import time

from orchestrator.phases.base import Phase, make_private_dir, remove_dir
from orchestrator.plan import Context


class Dump(Phase):
    name = "dump"

    def act(self, ctx: Context) -> None:
        assert ctx.target is not None
        make_private_dir(ctx.src, ctx.plan.src_images)
        ctx.frozen_at = time.monotonic()
        ctx.runtime.checkpoint(ctx.src, ctx.target, ctx.plan.src_images)

    def undo(self, ctx: Context) -> None:
        if ctx.target is not None:
            ctx.runtime.resume(ctx.src, ctx.target)
        if not ctx.plan.keep_images:
            remove_dir(ctx.src, ctx.plan.src_images)
