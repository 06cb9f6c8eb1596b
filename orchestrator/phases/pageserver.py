"""Stream, before the freeze: a CRIU page server on the destination, reached from the source
through its ssh link, so the dump writes pages straight into the destination's image dir."""

from __future__ import annotations

import secrets

from orchestrator.criu import commands as criu
from orchestrator.errors import MigrationError
from orchestrator.phases.base import Phase
from orchestrator.plan import Context
from orchestrator.runtimes import procs
from orchestrator.transport import rsync

ATTEMPTS = 3  # a port may be taken on either host: try another


class PageServer(Phase):
    name = "page-server"

    def act(self, ctx: Context) -> None:
        plan = ctx.plan
        if not plan.link_socket:
            raise MigrationError(
                f"stream needs an ssh link from {ctx.src.name}, and the control socket path "
                f"under {plan.source.workdir} is too long: use a shorter workdir"
            )
        errors = []
        for _ in range(ATTEMPTS):
            port = 20000 + secrets.randbelow(40000)
            server = ctx.dst.run(criu.page_server(plan.destination.criu, plan.dst_images, port))
            if not server.ok:
                errors.append(f"page server on {ctx.dst.name}: {server.error_line()}")
                continue
            ctx.page_port = port
            fwd = ctx.src.run(rsync.forward_argv(plan.source, plan.destination, plan.policy,
                                                 plan.link_socket, port))  # fmt: skip
            if fwd.ok:
                return
            errors.append(f"tunnel on {ctx.src.name}: {fwd.error_line()}")
            self.undo(ctx)
        raise MigrationError(f"cannot start the page server: {errors[-1]}", details=errors)

    def undo(self, ctx: Context) -> None:
        """Close the tunnel; end a page server that is still waiting (none after a dump)."""
        plan = ctx.plan
        if ctx.page_port is None or not plan.link_socket:
            return
        ctx.src.run(rsync.forward_argv(plan.source, plan.destination, plan.policy,
                                       plan.link_socket, ctx.page_port, cancel=True))  # fmt: skip
        waiting = [
            p.pid
            for p in procs.table(ctx.dst).values()
            if "page-server" in p.args and plan.dst_images in p.args
        ]
        procs.signal(ctx.dst, "KILL", waiting)
        ctx.page_port = None
