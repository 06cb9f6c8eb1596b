"""Prepare, before the freeze: private image dirs on both hosts, the source's ssh link, and a
warm copy of what travels with a container."""

from __future__ import annotations

from orchestrator import actions
from orchestrator.journal import Stage
from orchestrator.layout import make_private_dir
from orchestrator.phases.base import Phase
from orchestrator.plan import Context


class Prepare(Phase):
    name = "prepare"
    stage = Stage.PREPARED

    def act(self, ctx: Context) -> None:
        make_private_dir(ctx.src, ctx.src_images.root)
        make_private_dir(ctx.dst, ctx.dst_images.root)
        ctx.link.open()
        actions.mirror_paths(ctx, warm=True)

    def undo(self, ctx: Context) -> None:
        ctx.link.close()
        actions.unmirror(ctx)
        actions.wipe_images_if_safe(ctx, [(ctx.src, ctx.src_images.root),
                                          (ctx.dst, ctx.dst_images.root)])  # fmt: skip
