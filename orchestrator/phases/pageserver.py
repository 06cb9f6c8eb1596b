"""Page tunnels, before the freeze: a loopback port carried inside the source's ssh link, so
that page traffic is encrypted and no page server listens on a host's network address.

- stream: a CRIU page server on the destination; the source's dump writes pages straight into
  the destination's image dir through 127.0.0.1:PORT on the source (forwarded -L).
- post-copy: the source's lazy dump serves pages on its own 127.0.0.1:PORT, which the
  destination's lazy-pages daemon reaches at its 127.0.0.1:PORT (forwarded -R).
"""

from __future__ import annotations

import secrets

from orchestrator.criu import commands as criu
from orchestrator.errors import MigrationError
from orchestrator.phases.base import Phase
from orchestrator.plan import Context
from orchestrator.runtimes import procs
from orchestrator.transport import rsync
from orchestrator.transport.ssh import Host

ATTEMPTS = 3  # a port may be taken on either host: try another
_FREE = '[ -z "$(ss -Hltn "sport = :$1")" ] || { echo "port $1 is in use" >&2; exit 1; }'


class PageTunnel(Phase):
    name = "page-tunnel"
    #: Forward the destination's port to the source's (post-copy) instead of the reverse.
    reverse = True

    def act(self, ctx: Context) -> None:
        plan = ctx.plan
        if not plan.link_socket:
            raise MigrationError(
                f"{plan.strategy} needs an ssh link from {ctx.src.name}, and the control socket "
                f"path under {plan.source.workdir} is too long: use a shorter workdir"
            )
        errors = []
        for _ in range(ATTEMPTS):
            port = 20000 + secrets.randbelow(40000)
            error = self._open(ctx, port)
            if error is None:
                return
            errors.append(error)
            self.undo(ctx)
        raise MigrationError(f"cannot open the page tunnel: {errors[-1]}", details=errors)

    def _open(self, ctx: Context, port: int) -> str | None:
        """Listen (or be ready to) on port at both ends; an error line if that failed."""
        plan = ctx.plan
        assert plan.link_socket
        if self.reverse:  # the source's lazy dump will listen there: it must be free
            free = ctx.src.run(["sh", "-c", _FREE, "sh", str(port)], mutates=False)
            if not free.ok:
                return f"{ctx.src.name}: {free.error_line()}"
        ctx.page_port = port
        argv = rsync.forward_argv(plan.source, plan.destination, plan.policy, plan.link_socket,
                                  port, reverse=self.reverse)  # fmt: skip
        fwd = ctx.src.run(argv)
        return None if fwd.ok else f"tunnel on {ctx.src.name}: {fwd.error_line()}"

    def undo(self, ctx: Context) -> None:
        """Close the tunnel (a connection already carried through it goes on until it ends)."""
        plan = ctx.plan
        if ctx.page_port is None or not plan.link_socket:
            return
        ctx.src.run(rsync.forward_argv(plan.source, plan.destination, plan.policy,
                                       plan.link_socket, ctx.page_port, cancel=True,
                                       reverse=self.reverse))  # fmt: skip
        ctx.page_port = None


class PageServer(PageTunnel):
    name = "page-server"
    reverse = False

    def _open(self, ctx: Context, port: int) -> str | None:
        plan = ctx.plan
        server = ctx.dst.run(criu.page_server(plan.destination.criu, plan.dst_images, port))
        if not server.ok:
            ctx.page_port = port  # undo ends it if it did start
            return f"page server on {ctx.dst.name}: {server.error_line()}"
        return super()._open(ctx, port)

    def undo(self, ctx: Context) -> None:
        """Also end a page server that is still waiting (none after a dump)."""
        super().undo(ctx)
        kill_criu(ctx.dst, "page-server", ctx.plan.dst_images)


def kill_criu(host: Host, command: str, images_dir: str) -> None:
    """SIGKILL any `criu COMMAND` (and its detached wrapper) working on images_dir on host."""
    waiting = [
        p.pid
        for p in procs.table(host).values()
        if f" {command} " in p.args and images_dir in p.args
    ]
    procs.signal(host, "KILL", waiting)
