"""Transfer: the source pushes its images to the destination over its link (rsync, retried
while the link is what failed), then the sync_paths and what travels with a container."""

from __future__ import annotations

import time

from orchestrator import actions
from orchestrator.criu import manifest
from orchestrator.phases.base import Phase
from orchestrator.plan import Context


class Transfer(Phase):
    name = "transfer"

    def act(self, ctx: Context) -> None:
        final = ctx.src_images.final
        manifest.start(ctx.src, final, ctx.src_images.root)  # summed while rsync sends them
        ctx.link.push(final, ctx.dst_images.final)
        ctx.link.push_paths(ctx.plan.workload.sync_paths)
        actions.mirror_paths(ctx)
        got = manifest.collect(ctx.src, final).under(ctx.src_images.final_name)
        ctx.manifest = (ctx.manifest or manifest.Manifest()).merged(got)
        ctx.clock.transferred_at = time.monotonic()
