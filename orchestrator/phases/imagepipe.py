"""The image pipe, before the freeze (issue 15): the destination's agent listens on a root-only
Unix socket in its 0700 image dir and the source's ssh link forwards the source's end to it, so
that the transfer inside the freeze is one request to each agent: no ssh session, shell or
rsync started while the workload is frozen. The agents check each file (CRC-32 and size, as
sent and as read back from the destination's disk). Without an agent on either host (no
python3) or a socket path that fits, the transfer falls back to rsync.

Pre-copy's rounds went by rsync while the workload ran: their checksums are verified on the
destination here, still before the freeze.
"""

from __future__ import annotations

from orchestrator.criu import manifest
from orchestrator.errors import MigrationError
from orchestrator.phases.base import Phase
from orchestrator.plan import Context

#: How long the destination waits for the images (the rounds and the freeze come first).
WAIT_S = 3600


class ImagePipe(Phase):
    name = "image-pipe"

    def act(self, ctx: Context) -> None:
        _check_rounds(ctx)
        src_sock, dst_sock = ctx.src_images.pipe_socket, ctx.dst_images.pipe_socket
        if ctx.plan.dry_run:
            return
        if not (src_sock and dst_sock and ctx.link.spec.socket):
            ctx.notes.append("the image pipe's socket paths are too long for a Unix socket "
                             "(a shorter workdir): the images go by rsync")  # fmt: skip
            return
        src_agent, dst_agent = ctx.src.agent, ctx.dst.agent
        if src_agent is None or dst_agent is None:
            host = ctx.src if src_agent is None else ctx.dst
            ctx.notes.append(f"no agent on {host.name} (policy agent: false, or no python3 "
                             "there): the images go by rsync")  # fmt: skip
            return
        a = ctx.dst.call(dst_agent, "listen", ctx.plan.policy.command_timeout,
                         f"listen on {dst_sock}", sock=dst_sock, dir=ctx.dst_images.final,
                         wait=WAIT_S, stall=ctx.plan.policy.stall_timeout)  # fmt: skip
        if "error" in a:
            raise MigrationError(f"cannot open the image pipe on {ctx.dst.name}: {a['error']}")
        ctx.image_pipe = f"{src_sock}:{dst_sock}"
        fwd = ctx.link.forward(ctx.image_pipe)
        if not fwd.ok:
            raise MigrationError(
                f"cannot forward the image pipe from {ctx.src.name}: {fwd.error_line()}"
            )
        # connected now: through the forward, a connection opens an ssh channel (not while frozen)
        c = ctx.src.call(src_agent, "connect", ctx.plan.policy.command_timeout,
                         f"connect to {src_sock}", sock=src_sock)  # fmt: skip
        if "error" in c:
            raise MigrationError(f"cannot connect the image pipe on {ctx.src.name}: {c['error']}")

    def undo(self, ctx: Context) -> None:
        if ctx.image_pipe is None:
            return
        src_sock, dst_sock = ctx.image_pipe.split(":")
        ctx.link.cancel(ctx.image_pipe)
        for host, sock in ((ctx.src, src_sock), (ctx.dst, dst_sock)):
            agent = host.agent
            if agent is not None:
                host.call(agent, "cancel", ctx.plan.policy.command_timeout, f"cancel {sock}",
                          sock=sock)  # fmt: skip
        ctx.src.run(["rm", "-f", "--", src_sock])
        ctx.dst.run(["rm", "-f", "--", dst_sock])
        ctx.image_pipe = None


def _check_rounds(ctx: Context) -> None:
    """Pre-copy: the rounds on the destination are what the source sent (else no freeze)."""
    if not ctx.manifest or ctx.plan.dry_run:
        return
    root = ctx.dst_images.root
    r = ctx.dst.run(manifest.dst_sum_paths_argv(root, ctx.manifest.paths()), mutates=False)
    if not r.ok:
        raise MigrationError(f"cannot sum the rounds' images on {ctx.dst.name}: {r.error_line()}")
    got = manifest.Manifest.parse(r.stdout)
    manifest.refuse_differences(ctx.manifest, got, ctx.src.name, ctx.dst.name, root)
