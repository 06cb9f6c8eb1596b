"""The page channel, before the freeze (issue 14; criu/pagechannel.py): a root-only Unix socket
in each host's 0700 image dir, joined by a stream-local forward inside the source's ssh link.
Page traffic is encrypted between hosts, and no other local user can reach it on either host:
there is no TCP port at all.

- stream (PageServer): a CRIU page server on the destination gets the channel's one
  connection; the source's dump connects to its end and writes pages straight into the
  destination's image dir.
- post-copy (PageTunnel): the source's lazy dump connects at the freeze and serves pages on
  the channel; the destination holds that connection until its lazy-pages daemon takes it.

Stream also prefaults the destination (policy prefault): on a VM whose hypervisor takes back
free memory (free page reporting), the first touch of a page costs ~4x a recently freed one,
and the restore's one big read into 1 GiB of fresh memory is most of its time.
"""

from __future__ import annotations

from orchestrator import actions
from orchestrator.criu import pagechannel
from orchestrator.criu.pagechannel import PageChannel, page_server
from orchestrator.errors import MigrationError
from orchestrator.phases.base import Phase
from orchestrator.plan import Context


class PageTunnel(Phase):
    name = "page-tunnel"
    #: Post-copy: the source's dump serves pages on the channel (else it streams them).
    lazy = True

    def act(self, ctx: Context) -> None:
        channel = PageChannel.for_dirs(ctx.src_images.root, ctx.dst_images.root, lazy=self.lazy)
        long = channel.too_long()
        if long:
            raise MigrationError(
                f"the page channel's socket path {long} is too long for a Unix socket: "
                "use a shorter workdir"
            )
        if not ctx.link.spec.socket:
            ctx.link.forward(channel.forward_spec())  # raises: names the too-long path
        ctx.page_channel = channel
        r = ctx.dst.run(self._listen_argv(ctx, channel), private=True)
        if not r.ok:
            raise MigrationError(
                f"cannot open the page channel on {ctx.dst.name}: {r.error_line()}"
            )
        fwd = ctx.link.forward(channel.forward_spec())
        if not fwd.ok:
            raise MigrationError(
                f"cannot forward the page channel from {ctx.src.name}: {fwd.error_line()}"
            )

    def _listen_argv(self, ctx: Context, channel: PageChannel) -> list[str]:
        return channel.hold_argv()

    def undo(self, ctx: Context) -> None:
        """Close the forward, end the channel's helpers, remove its sockets (a connection
        already carried through goes on until it ends)."""
        channel = ctx.page_channel
        if channel is None:
            return
        ctx.link.cancel(channel.forward_spec())
        actions.end_channel(ctx)
        ctx.src.run(channel.cleanup_argv())
        ctx.dst.run(channel.cleanup_argv())
        ctx.page_channel = None


class PageServer(PageTunnel):
    name = "page-server"
    lazy = False

    def act(self, ctx: Context) -> None:
        if ctx.plan.policy.prefault and ctx.target is not None:
            mib = pagechannel.prefault_mib(ctx.target.rss_kb)
            r = ctx.dst.run(pagechannel.prefault_argv(mib), mutates=False)
            if not r.ok:  # only speed is lost
                ctx.notes.append(f"prefault on {ctx.dst.name} failed: {r.error_line()}")
        super().act(ctx)

    def _listen_argv(self, ctx: Context, channel: PageChannel) -> list[str]:
        """A CRIU page server on the destination, on the channel's one connection."""
        return channel.serve_argv(page_server(ctx.plan.destination.criu, ctx.dst_images.root))

    def undo(self, ctx: Context) -> None:
        """Also end a page server that is still waiting (none after a dump)."""
        super().undo(ctx)
        actions.kill_criu(ctx.dst, "page-server", ctx.dst_images.root)
