"""Prepare, before the freeze: private image dirs on both hosts and the source's ssh link."""

from __future__ import annotations

from orchestrator.errors import MigrationError
from orchestrator.phases.base import Phase, kept_images_note, make_private_dir, remove_dir
from orchestrator.phases.transfer import mirror_paths, unmirror
from orchestrator.plan import Context
from orchestrator.transport import rsync


class Prepare(Phase):
    name = "prepare"

    def act(self, ctx: Context) -> None:
        plan = ctx.plan
        make_private_dir(ctx.src, plan.src_images)
        make_private_dir(ctx.dst, plan.dst_images)
        if plan.link_socket:
            log = f"{plan.src_images}.ssh.log"
            argv = rsync.open_link_argv(
                plan.source, plan.destination, plan.policy, plan.link_socket, log
            )
            r = ctx.src.run(argv)
            if not r.ok:
                raise MigrationError(
                    f"{ctx.src.name} cannot open its ssh link to {ctx.dst.name}: {r.error_line()}"
                )
        mirror_paths(ctx, warm=True)  # what travels with the images, copied before the freeze

    def undo(self, ctx: Context) -> None:
        close_link(ctx)
        unmirror(ctx)
        if not ctx.plan.keep_images:
            remove_dir(ctx.src, ctx.plan.src_images)
            remove_dir(ctx.dst, ctx.plan.dst_images)
        else:
            ctx.notes.append(kept_images_note(ctx))  # #14


def close_link(ctx: Context) -> None:
    """Close the source's master connection and its log (best effort)."""
    plan = ctx.plan
    if plan.link_socket:
        ctx.src.run(rsync.close_link_argv(plan.source, plan.destination, plan.policy,
                                          plan.link_socket))  # fmt: skip
        ctx.src.run(["rm", "-f", "--", f"{plan.src_images}.ssh.log"])
