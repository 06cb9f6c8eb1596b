"""Confirm: only now is the stopped source killed and the images wiped on both hosts."""

from __future__ import annotations

from orchestrator.phases.base import Phase, kept_images_note, remove_dir
from orchestrator.phases.prepare import close_link
from orchestrator.plan import Context


class Confirm(Phase):
    name = "confirm"
    commits = True

    def act(self, ctx: Context) -> None:
        assert ctx.target is not None
        ctx.runtime.remove(ctx.src, ctx.target.root_pid)
        close_link(ctx)
        if not ctx.plan.keep_images:
            remove_dir(ctx.src, ctx.plan.src_images)
            remove_dir(ctx.dst, ctx.plan.dst_images)
        else:
            ctx.notes.append(kept_images_note(ctx))  # #14
