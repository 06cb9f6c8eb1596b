"""Page channels, before the freeze: a loopback port carried inside the source's ssh link, so
that page traffic is encrypted and no page server listens on a host's network address.

- stream (PageServer): a CRIU page server on the destination; the source's dump writes pages
  straight into the destination's image dir through 127.0.0.1:PORT on the source (-L).
- post-copy (PageTunnel): the source's lazy dump serves pages on its own 127.0.0.1:PORT, which
  the destination's lazy-pages daemon reaches at its 127.0.0.1:PORT (-R).
"""

from __future__ import annotations

import secrets

from orchestrator import actions
from orchestrator.criu import commands as criu
from orchestrator.errors import MigrationError
from orchestrator.phases.base import Phase
from orchestrator.plan import Context

ATTEMPTS = 3  # a port may be taken on either host: try another
_FREE = '[ -z "$(ss -Hltn "sport = :$1")" ] || { echo "port $1 is in use" >&2; exit 1; }'


class PageTunnel(Phase):
    name = "page-tunnel"
    #: Forward the destination's port to the source's (post-copy) instead of the reverse.
    reverse = True

    def act(self, ctx: Context) -> None:
        errors = []
        for _ in range(ATTEMPTS):
            port = 20000 + secrets.randbelow(40000)
            error = self._open(ctx, port)
            if error is None:
                return
            errors.append(error)
            self.undo(ctx)
        raise MigrationError(f"cannot open the page channel: {errors[-1]}", details=errors)

    def _open(self, ctx: Context, port: int) -> str | None:
        """Listen (or be ready to) on port at both ends; an error line if that failed."""
        if self.reverse:  # the source's lazy dump will listen there: it must be free
            free = ctx.src.run(["sh", "-c", _FREE, "sh", str(port)], mutates=False)
            if not free.ok:
                return f"{ctx.src.name}: {free.error_line()}"
        ctx.page_port = port
        fwd = ctx.link.forward(port, reverse=self.reverse)
        return None if fwd.ok else f"tunnel on {ctx.src.name}: {fwd.error_line()}"

    def undo(self, ctx: Context) -> None:
        """Close the tunnel (a connection already carried through it goes on until it ends)."""
        if ctx.page_port is None:
            return
        ctx.link.cancel(ctx.page_port, reverse=self.reverse)
        ctx.page_port = None


class PageServer(PageTunnel):
    name = "page-server"
    reverse = False

    def _open(self, ctx: Context, port: int) -> str | None:
        if not ctx.link.spec.socket:
            ctx.link.forward(port)  # raises: names the too-long socket path
        argv = criu.page_server(ctx.plan.destination.criu, ctx.dst_images.root, port)
        server = ctx.dst.run(argv, private=True)
        if not server.ok:
            ctx.page_port = port  # undo ends it if it did start
            return f"page server on {ctx.dst.name}: {server.error_line()}"
        return super()._open(ctx, port)

    def undo(self, ctx: Context) -> None:
        """Also end a page server that is still waiting (none after a dump)."""
        super().undo(ctx)
        actions.kill_criu(ctx.dst, "page-server", ctx.dst_images.root)
