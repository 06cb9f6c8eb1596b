"""Transfer: the source pushes its images to the destination over its link (rsync, retried
while the link is what failed), then the sync_paths and what travels with a container."""

from __future__ import annotations

import time

from orchestrator import actions
from orchestrator.phases.base import Phase
from orchestrator.plan import Context


class Transfer(Phase):
    name = "transfer"

    def act(self, ctx: Context) -> None:
        actions.push_images(ctx, ctx.src_images.final, ctx.dst_images.final, check=True)
        ctx.link.push_paths(ctx.plan.workload.sync_paths)
        actions.mirror_paths(ctx)
        ctx.clock.transferred_at = time.monotonic()
