"""Post-copy: the workload runs on the destination before its memory has arrived.

The source's lazy dump keeps the frozen tasks' pages in memory and serves them; the destination's
`criu lazy-pages` daemon pulls each page when the restored workload faults on it, and all the
rest in the background, through the page tunnel. The freeze no longer grows with memory size.

The hazard: once the destination has resumed, the two copies diverge, so there is no rollback
past LazyRestore (the strategy table's point of no return). Until every page has arrived the
source stays frozen and keeps its pages; if the transfer breaks, the destination copy may miss
memory and the tool raises an alarm instead of resuming the source.
"""

from __future__ import annotations

import time

from orchestrator import actions, freeze
from orchestrator.criu import background
from orchestrator.criu.logs import PAGE_SIZE, pages_pulled
from orchestrator.criu.pagechannel import LAZY_PAGES_LOG, lazy_pages
from orchestrator.errors import MigrationError
from orchestrator.journal import Stage
from orchestrator.phases.base import Phase
from orchestrator.plan import Context


class LazyRestore(Phase):
    """Start the lazy-pages daemon, then restore: the point of no return once it runs."""

    name = "lazy-restore"
    stage = Stage.RESTORING

    def act(self, ctx: Context) -> None:
        assert ctx.target is not None and ctx.page_channel is not None
        images = ctx.dst_images.final
        # the lazy-pages daemon takes over the connection the destination holds
        call = ctx.page_channel.take(lazy_pages(ctx.plan.destination.criu, images),
                                     ctx.dst.agent is not None)  # fmt: skip
        t0 = time.monotonic()
        with ctx.dst.recording() as ran:
            background.start(ctx.dst, images, background.LAZY_PAGES, call,
                             LAZY_PAGES_LOG, "lazy-pages")  # fmt: skip
            ctx.restored_pid = ctx.runtime.restore(ctx.dst, ctx.target, images, lazy=True)
        began, ended = freeze.span(ran, to_longest=True)
        ctx.clock.restore_started_at, ctx.clock.running_at = began or t0, ended or time.monotonic()

    def undo(self, ctx: Context) -> None:
        actions.remove_restored(ctx)


class PullPages(Phase):
    """Wait (up to the policy's deadline) until the destination has pulled every page and the
    source's lazy dump has ended; the source stays frozen, with its pages, until then."""

    name = "pull-pages"
    stage = Stage.RESUMED

    def act(self, ctx: Context) -> None:
        plan = ctx.plan
        if plan.dry_run:
            return
        deadline = plan.policy.postcopy_deadline
        t0 = time.monotonic()
        pulled = background.wait(ctx.dst, ctx.dst_images.final, background.LAZY_PAGES, deadline)
        left = max(0.0, deadline - (time.monotonic() - t0))
        served = background.wait(ctx.src, ctx.src_images.final, background.DUMP, max(left, 10.0))
        ctx.postcopy.pages_done_at = time.monotonic()
        if pulled == 0 and served == 0:
            log = f"{ctx.dst_images.final}/{LAZY_PAGES_LOG}"
            r = ctx.dst.run(["grep", "-h", "--", "UFFD transferred", log], mutates=False)
            pages, _ = pages_pulled(r.stdout)
            ctx.postcopy.pulled_bytes = pages * PAGE_SIZE
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
