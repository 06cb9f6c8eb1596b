"""Page tunnels, before the freeze: the page channel (#14, criu/pagechannel.py), a Unix
socket in each host's 0700 image dir carried inside the source's ssh link, so that page traffic
is encrypted between hosts and no other local user can reach it on either host (no TCP port).

- stream: a CRIU page server on the destination gets the channel's one connection; the
  source's dump connects to its end and writes pages straight into the destination's image dir.
- post-copy: the source's lazy dump connects at the freeze and serves pages on the channel; the
  destination holds that connection until its lazy-pages daemon takes it over.
"""

from __future__ import annotations

from orchestrator.criu.pagechannel import PageChannel, page_server
from orchestrator.errors import MigrationError
from orchestrator.phases.base import Phase
from orchestrator.plan import Context
from orchestrator.runtimes import procs
from orchestrator.transport import rsync
from orchestrator.transport.ssh import Host


class PageTunnel(Phase):
    """#14: the page channel (criu/pagechannel.py): a root-only Unix socket in each host's
    0700 image dir, joined by a stream-local forward inside the source's ssh link. No TCP port
    exists; post-copy's destination holds the lazy dump's one connection for lazy-pages."""

    name = "page-tunnel"
    #: Post-copy: the source's dump serves pages on the channel (else it streams them).
    lazy = True

    def act(self, ctx: Context) -> None:
        plan = ctx.plan
        if not plan.link_socket:
            raise MigrationError(
                f"{plan.strategy} needs an ssh link from {ctx.src.name}, and the control socket "
                f"path under {plan.source.workdir} is too long: use a shorter workdir"
            )
        channel = PageChannel.for_dirs(plan.src_images, plan.dst_images, lazy=self.lazy)
        long = channel.too_long()
        if long:
            raise MigrationError(f"the page channel's socket path {long} is too long for a "
                                 "Unix socket: use a shorter workdir")  # fmt: skip
        ctx.page_channel = channel
        r = ctx.dst.run(self._listen_argv(ctx, channel))
        if not r.ok:
            raise MigrationError(f"cannot open the page channel on {ctx.dst.name}: "
                                 f"{r.error_line()}")  # fmt: skip
        fwd = ctx.src.run(channel.forward_argv(_link_ssh(ctx), plan.destination.address))
        if not fwd.ok:
            raise MigrationError(f"cannot forward the page channel from {ctx.src.name}: "
                                 f"{fwd.error_line()}")  # fmt: skip

    def _listen_argv(self, ctx: Context, channel: PageChannel) -> list[str]:
        return channel.hold_argv()

    def undo(self, ctx: Context) -> None:
        """Close the forward, end the channel's helpers, remove its sockets (a connection
        already carried through goes on until it ends)."""
        channel = ctx.page_channel
        if channel is None:
            return
        plan = ctx.plan
        ctx.src.run(channel.forward_argv(_link_ssh(ctx), plan.destination.address, cancel=True))
        end_channel(ctx)
        ctx.src.run(channel.cleanup_argv())
        ctx.dst.run(channel.cleanup_argv())
        ctx.page_channel = None


class PageServer(PageTunnel):
    name = "page-server"
    lazy = False

    def _listen_argv(self, ctx: Context, channel: PageChannel) -> list[str]:
        """A CRIU page server on the destination, on the channel's one connection."""
        plan = ctx.plan
        return channel.serve_argv(page_server(plan.destination.criu, plan.dst_images))

    def undo(self, ctx: Context) -> None:
        """Also end a page server that is still waiting (none after a dump)."""
        super().undo(ctx)
        kill_criu(ctx.dst, "page-server", ctx.plan.dst_images)


def end_channel(ctx: Context) -> None:
    """SIGKILL the page channel's helpers on the destination that still wait (holding,
    handing over, serving): they are found by the channel's socket paths in their arguments."""
    prefix = f"{ctx.plan.dst_images.rstrip('/')}/pages"
    helpers = [p.pid for p in procs.table(ctx.dst).values()
               if prefix in p.args and "python3" in p.args]  # fmt: skip
    procs.signal(ctx.dst, "KILL", helpers)


def _link_ssh(ctx: Context) -> list[str]:
    plan = ctx.plan
    return rsync.ssh_command(plan.source, plan.destination, plan.policy, plan.link_socket)


def kill_criu(host: Host, command: str, images_dir: str) -> None:
    """SIGKILL any `criu COMMAND` (and its detached wrapper) working on images_dir on host."""
    waiting = [
        p.pid
        for p in procs.table(host).values()
        if f" {command} " in p.args and images_dir in p.args
    ]
    procs.signal(host, "KILL", waiting)
