"""Post-copy: the workload runs on the destination before its memory has arrived.

The source's lazy dump keeps the frozen tasks' pages in memory and serves them; the destination's
`criu lazy-pages` daemon pulls each page when the restored workload faults on it, and all the
rest in the background, through the page tunnel. The freeze no longer grows with memory size.

The hazard: once the destination has resumed, the two copies diverge, so there is no rollback
past LazyRestore (it sets ctx.committed). Until every page has arrived the source stays frozen
and keeps its pages; if the transfer breaks, the destination copy may miss memory and the tool
raises an alarm instead of resuming the source.
"""

from __future__ import annotations

import time

from orchestrator.criu import background
from orchestrator.criu import commands as criu
from orchestrator.criu.logs import PAGE_SIZE, pages_pulled
from orchestrator.criu.pagechannel import PageChannel, lazy_pages
from orchestrator.errors import MigrationError
from orchestrator.phases.base import Phase, settle
from orchestrator.phases.pageserver import end_channel, kill_criu
from orchestrator.phases.restore import Restore
from orchestrator.plan import Context
from orchestrator.runtimes import net, procs

# After an abort, CRIU needs a moment to unlock the network and let the tasks run.
ABORT_WAIT = 30.0


class LazyDump(Phase):
    """Freeze: dump everything but the pages, then serve those from the frozen source."""

    name = "dump"

    def act(self, ctx: Context) -> None:
        assert ctx.target is not None and ctx.page_channel is not None
        ctx.frozen_at = time.monotonic()
        ctx.runtime.checkpoint(ctx.src, ctx.target, ctx.src_dir, channel=ctx.page_channel,
                               prev_images_dir=ctx.prev_images_dir)  # fmt: skip  # #14
        ctx.dumped_at = time.monotonic()

    def undo(self, ctx: Context) -> None:
        """Before the destination resumed: make the lazy dump fail, which lets the source run
        on with its connections."""
        plan, src = ctx.plan, ctx.src
        if ctx.target is None:
            return
        if _dump_running(ctx):
            # A failed lazy dump resumes the tasks but not their network: unlock it first,
            # while they are still frozen. (A dump still starting is not listening yet.)
            _unlock_network(ctx)
            deadline = time.monotonic() + ABORT_WAIT
            while time.monotonic() < deadline:
                # #14: the destination holds the dump's connection: abort through it.
                ctx.dst.run(_channel(ctx).abort_argv())
                if background.wait(src, ctx.src_dir, background.DUMP, 1) is not None:
                    break
        end_channel(ctx)  # #14: also for `recover`, which runs no PageTunnel.undo
        settle(src, plan.src_images, plan.policy.command_timeout)
        if ctx.runtime.state(src, ctx.target.root_pid) == procs.STOPPED:
            # The dump ended as if every page had been pulled (its client went away cleanly):
            # the tasks keep all their memory, stopped. Not resume(): that would restore from
            # images, and a lazy dump's images lack the pages.
            _unlock_network(ctx)
            procs.signal(src, "CONT", procs.tree_of(src, ctx.target.root_pid))


def _channel(ctx: Context) -> PageChannel:
    """#14: the page channel, as the plan makes it (also for `recover`, which has no ctx)."""
    return PageChannel.for_dirs(ctx.plan.src_images, ctx.plan.dst_images, lazy=True)


def _dump_running(ctx: Context) -> bool:
    """Whether the lazy dump (or its detached wrapper) still runs on the source."""
    images = ctx.plan.src_images
    return any(images in p.args and " dump " in p.args for p in procs.table(ctx.src).values())


def _unlock_network(ctx: Context) -> None:
    """Take the workload's sockets out of TCP repair mode and drop CRIU's network lock."""
    if ctx.target is None or ctx.target.net is None:
        return
    pids = procs.tree_of(ctx.src, ctx.target.root_pid)
    r = ctx.src.run(net.unlock_argv(ctx.target.root_pid, pids))
    if not r.ok:
        raise MigrationError(
            f"cannot unlock the workload's network on {ctx.src.name}: {r.error_line()}"
        )


class LazyRestore(Restore):
    """Start the lazy-pages daemon, then restore: the point of no return once it runs."""

    name = "restore"

    def act(self, ctx: Context) -> None:
        assert ctx.target is not None and ctx.page_channel is not None
        plan, dst = ctx.plan, ctx.dst
        # #14: lazy-pages takes over the connection the destination holds.
        argv = ctx.page_channel.take_argv(lazy_pages(plan.destination.criu, ctx.dst_dir))
        background.start(dst, ctx.dst_dir, background.LAZY_PAGES, argv,
                         criu.LAZY_PAGES_LOG, "lazy-pages")  # fmt: skip
        ctx.restored_pid = ctx.runtime.restore(dst, ctx.target, ctx.dst_dir, lazy=True)
        ctx.running_at = time.monotonic()
        ctx.committed = True
        ctx.notes.append(
            f"post-copy: {dst.name} runs the workload from here on; no rollback is possible"
        )

    def undo(self, ctx: Context) -> None:
        kill_criu(ctx.dst, "lazy-pages", ctx.plan.dst_images)
        super().undo(ctx)


class PullPages(Phase):
    """Wait (up to the policy's deadline) until the destination has pulled every page and the
    source's lazy dump has ended; the source stays frozen, with its pages, until then."""

    name = "pull-pages"

    def act(self, ctx: Context) -> None:
        plan = ctx.plan
        if plan.dry_run:
            return
        deadline = plan.policy.postcopy_deadline
        t0 = time.monotonic()
        pulled = background.wait(ctx.dst, ctx.dst_dir, background.LAZY_PAGES, deadline)
        left = max(0.0, deadline - (time.monotonic() - t0))
        served = background.wait(ctx.src, ctx.src_dir, background.DUMP, max(left, 10.0))
        ctx.pages_done_at = time.monotonic()
        if pulled == 0 and served == 0:
            log = f"{ctx.dst_dir}/{criu.LAZY_PAGES_LOG}"
            r = ctx.dst.run(["grep", "-h", "--", "UFFD transferred", log], mutates=False)
            pages, _ = pages_pulled(r.stdout)
            ctx.pulled_bytes = pages * PAGE_SIZE
            return
        if pulled is None:
            why = f"not every page arrived within {deadline:.0f}s (policy postcopy_deadline)"
        elif pulled != 0:
            why = f"the lazy-pages daemon on {ctx.dst.name} failed (exit {pulled})"
        else:
            why = f"the lazy dump on {ctx.src.name} failed (exit {served})"
        raise MigrationError(
            f"POST-COPY INCOMPLETE: {why}. The workload runs on {ctx.dst.name} but may miss "
            f"memory; its source copy stays frozen on {ctx.src.name} (pid "
            f"{ctx.target.root_pid if ctx.target else '?'}) with its pages. Do not resume both."
        )
