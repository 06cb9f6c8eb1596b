"""Freeze: the final dump on the source, which is left stopped (never killed) until confirm."""

from __future__ import annotations

import time

from orchestrator.phases.base import Phase, settle
from orchestrator.plan import Context


class Dump(Phase):
    name = "dump"

    def act(self, ctx: Context) -> None:
        assert ctx.target is not None
        ctx.frozen_at = time.monotonic()
        ctx.runtime.checkpoint(
            ctx.src, ctx.target, ctx.src_dir, ctx.page_port, prev_images_dir=ctx.prev_images_dir,
            channel=ctx.page_channel,  # #14
        )  # fmt: skip
        ctx.dumped_at = time.monotonic()

    def undo(self, ctx: Context) -> None:
        settle(ctx.src, ctx.plan.src_images, ctx.plan.policy.command_timeout)
        if ctx.target is not None:
            ctx.runtime.resume(ctx.src, ctx.target, ctx.src_dir)
