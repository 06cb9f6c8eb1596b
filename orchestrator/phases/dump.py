"""Freeze: the final dump on the source, which is left stopped (never killed) until confirm."""

from __future__ import annotations

import time

from orchestrator import actions, freeze
from orchestrator.checkpoint import Checkpoint
from orchestrator.journal import Stage
from orchestrator.phases.base import Phase
from orchestrator.plan import Context


def final_checkpoint(ctx: Context) -> Checkpoint:
    """The final dump as the strategy and the phases before it set it up."""
    layout = ctx.src_images
    return Checkpoint(layout.final, ctx.strategy.pages, ctx.page_channel, layout.final_parent)


class Dump(Phase):
    name = "dump"
    stage = Stage.FROZEN

    def act(self, ctx: Context) -> None:
        assert ctx.target is not None
        t0 = time.monotonic()
        with ctx.src.recording() as ran:
            ctx.runtime.checkpoint(ctx.src, ctx.target, final_checkpoint(ctx))
        began, ended = freeze.span(ran)
        ctx.clock.frozen_at, ctx.clock.dumped_at = began or t0, ended or time.monotonic()

    def undo(self, ctx: Context) -> None:
        actions.resume_source(ctx)


class LazyDump(Dump):
    """Post-copy's freeze: dump everything but the pages, then serve those from the frozen
    source (detached) until the destination has pulled them all."""

    name = "lazy-dump"

    def act(self, ctx: Context) -> None:
        assert ctx.page_channel is not None
        super().act(ctx)
        actions.hold_source(ctx)  # whatever CRIU does at its end, the source stays stopped

    def undo(self, ctx: Context) -> None:
        """Before the destination resumed: make the lazy dump fail, which lets the source run
        on with its connections."""
        actions.abort_lazy_dump(ctx)
