"""Transfer: the source pushes its images to the destination with rsync (retried: it resumes)."""

from __future__ import annotations

import time

from orchestrator.phases.base import Phase, remove_dir
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
        t0 = time.monotonic()
        push(ctx, argv, f"rsync {ctx.src.name} -> {ctx.dst.name}")
        mirror_paths(ctx)
        ctx.transfer_seconds += time.monotonic() - t0


def mirror_paths(ctx: Context, warm: bool = False) -> None:
    """What travels with the images (a container's bundle, config, rootfs), made an exact copy
    at the same path on the destination. Prepare calls it too (warm), before the freeze, so
    that this second pass inside the freeze only sends what changed since; the warm copy
    notes which paths it made, for unmirror."""
    plan = ctx.plan
    paths = ctx.runtime.extra_paths(ctx.target) if ctx.target else []
    if warm and ctx.target is not None:
        missing = [p for p in paths if not ctx.dst.run(["test", "-e", p], mutates=False).ok]
        ctx.target.new_paths = missing
    for path in paths:
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


def unmirror(ctx: Context) -> None:
    """Undo the warm copy: remove what it made on the destination (never what was there)."""
    for path in ctx.target.new_paths if ctx.target else []:
        remove_dir(ctx.dst, path)
