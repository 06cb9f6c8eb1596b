"""Transfer: the source pushes its images to the destination with rsync (retried: it resumes)."""

from __future__ import annotations

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
        push(ctx, argv, f"rsync {ctx.src.name} -> {ctx.dst.name}")
        mirror_paths(ctx)


def mirror_paths(ctx: Context) -> None:
    """What travels with the images (a container's bundle, config, rootfs), made an exact copy
    at the same path on the destination. Prepare calls it too, before the freeze, so that
    this second pass inside the freeze only sends what changed since."""
    plan = ctx.plan
    for path in ctx.runtime.extra_paths(ctx.target) if ctx.target else []:
        argv = rsync.push_argv(plan.source, plan.destination, plan.policy, path, path,
                               plan.link_socket, mirror=True)  # fmt: skip
        push(ctx, argv, f"rsync {path} {ctx.src.name} -> {ctx.dst.name}")


def push(ctx: Context, argv: list[str], what: str) -> None:
    """Run one rsync on the source, retried while the link is what failed."""
    # Only a broken or stalled link is worth another attempt (rsync resumes: --partial).
    for attempt in retrying(ctx.plan.policy, what, (rsync.LinkError,), ctx.notes):
        with attempt:
            r = ctx.src.run(argv)
            if not r.ok:
                raise rsync.failure(r.exit_code, r.stderr or r.stdout, what)
            ctx.bytes_transferred += rsync.bytes_sent(r.stdout)
