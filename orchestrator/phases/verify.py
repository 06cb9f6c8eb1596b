"""Verify: the restored workload runs on the destination, and its health command passes."""

from __future__ import annotations

from orchestrator import freeze
from orchestrator.errors import MigrationError
from orchestrator.phases.base import Phase
from orchestrator.plan import Context
from orchestrator.runtimes import procs


class Verify(Phase):
    name = "verify"

    def act(self, ctx: Context) -> None:
        if ctx.plan.dry_run:
            return
        pid = ctx.restored_pid
        if not pid or not ctx.runtime.running(ctx.dst, pid):
            raise MigrationError(f"restored workload (pid {pid}) is not running on {ctx.dst}")
        ns = procs.namespaces(ctx.dst, pid)  # (pid, start time): who it is, for recover
        ctx.restored_start = ns.start_time if ns else None
        if ctx.target and ctx.target.net:  # CRIU writes one image per established connection
            listing = ctx.dst.run(["ls", "--", ctx.dst_images.final], mutates=False)
            ctx.connections_kept = sum(
                1 for f in listing.stdout.split() if f.startswith("tcp-stream-")
            )
        health = ctx.plan.workload.health
        if health:
            r = ctx.dst.run(["sh", "-c", health])  # (not retried: it may not be read-only)
            if not r.ok:
                raise MigrationError(f"health check failed on {ctx.dst}: {r.error_line()}")
        freeze.measure(ctx)
