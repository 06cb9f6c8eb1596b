"""Transfer: the source pushes its images to the destination with rsync (retried: it resumes)."""

from __future__ import annotations

import time

from orchestrator.phases.base import Phase
from orchestrator.plan import Context
from orchestrator.transport import rsync
from orchestrator.transport.ssh import retrying


class Transfer(Phase):
    name = "transfer"

    def act(self, ctx: Context) -> None:
        plan = ctx.plan
        argv = rsync.push_argv(
            plan.source,
            plan.destination,
            plan.policy,
            plan.src_images,
            plan.dst_images,
            plan.link_socket,
        )
        what = f"rsync {ctx.src.name} -> {ctx.dst.name}"
        # Only a broken or stalled link is worth another attempt (rsync resumes: --partial).
        t0 = time.monotonic()
        for attempt in retrying(plan.policy, what, (rsync.LinkError,), ctx.notes):
            with attempt:
                r = ctx.src.run(argv)
                if not r.ok:
                    raise rsync.failure(r.exit_code, r.stderr or r.stdout, what)
                ctx.bytes_transferred += rsync.bytes_sent(r.stdout)
        ctx.transfer_seconds += time.monotonic() - t0
