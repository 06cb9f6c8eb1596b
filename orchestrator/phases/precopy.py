"""Pre-copy, before the freeze: rounds of pre-dumps with dirty-memory tracking into IMAGES/1,
2, ... (each on top of the one before), each pushed to the destination while the workload runs
on, until the stop rule says freeze. The final dump then writes only what changed since the
last round, into IMAGES/final (the ImageLayout after the rounds says where)."""

from __future__ import annotations

import base64
import binascii
import time

from orchestrator import actions, stoprule
from orchestrator.checkpoint import Checkpoint
from orchestrator.criu import images
from orchestrator.criu.logs import PAGE_SIZE
from orchestrator.errors import MigrationError
from orchestrator.journal import Stage
from orchestrator.layout import make_private_dir
from orchestrator.phases.base import Phase
from orchestrator.plan import Context
from orchestrator.report import Round
from orchestrator.transport.ssh import Host


def read_stats(host: Host, images_dir: str) -> images.DumpStats:
    """CRIU's stats-dump from a dump or pre-dump in images_dir on host."""
    path = f"{images_dir}/{images.STATS_DUMP}"
    r = host.run(["base64", "-w", "0", "--", path], mutates=False)
    if not r.ok:
        raise MigrationError(f"cannot read {path} on {host}: {r.error_line()}")
    try:
        return images.dump_stats(base64.b64decode(r.stdout.strip(), validate=True))
    except (images.ImageError, binascii.Error) as e:
        raise MigrationError(f"{path} on {host}: {e}") from None


class Precopy(Phase):
    name = "rounds"
    stage = Stage.PRECOPY

    def act(self, ctx: Context) -> None:
        policy = ctx.plan.policy
        limits = stoprule.Limits(policy.max_downtime_ms, policy.goal, policy.max_iterations,
                                 policy.max_precopy_seconds)  # fmt: skip
        facts: list[stoprule.RoundFacts] = []
        started = time.monotonic()
        reason: str | None = None
        while reason is None:
            fact = self._round(ctx)
            if fact is None:  # dry run: one round, planned, nothing measured
                reason = "dry-run"
                break
            facts.append(fact)
            reason = stoprule.decide(limits, facts, time.monotonic() - started)
        ctx.precopy.stopped_by = reason
        estimate = stoprule.estimated_freeze_ms(facts)
        ctx.notes.append(
            f"pre-copy: {ctx.precopy.count} round(s), stopped by {reason}"
            + (f" (estimated freeze {estimate:.0f} ms)" if estimate is not None else "")
        )
        make_private_dir(ctx.src, ctx.src_images.final)

    def _round(self, ctx: Context) -> stoprule.RoundFacts | None:
        """One round: pre-dump into IMAGES/N on top of N-1, read its stats, push it (and the
        sync_paths) while the workload runs; its row in the rounds table."""
        assert ctx.target is not None
        state = ctx.precopy
        n = state.count = state.count + 1
        ctx.src_images = ctx.src_images.after_rounds(n)
        ctx.dst_images = ctx.dst_images.after_rounds(n)
        src_dir = ctx.src_images.round(n)
        make_private_dir(ctx.src, src_dir)
        t0 = time.monotonic()
        parent = ctx.src_images.parent_of_round(n)
        ctx.runtime.checkpoint(ctx.src, ctx.target, Checkpoint(src_dir, parent_dir=parent,
                                                               running=True))  # fmt: skip
        t1 = time.monotonic()
        stats = images.DumpStats() if ctx.plan.dry_run else read_stats(ctx.src, src_dir)
        t2 = time.monotonic()
        # summed while rsync sends it (checked with the final push)
        sent = actions.push_images(ctx, src_dir, ctx.dst_images.round(n), check=False)
        sent += ctx.link.push_paths(ctx.plan.workload.sync_paths)
        t3 = time.monotonic()
        rate = stats.pages_written / (t0 - state.last_start) if state.last_start else None
        state.last_start = t0
        if ctx.plan.dry_run:
            return None
        state.rounds.append(Round(
            number=n, kind="pre-dump", pages_written=stats.pages_written,
            pages_skipped_parent=stats.pages_skipped_parent, bytes_sent=sent,
            seconds=round(t3 - t0, 3), dump_seconds=round(t1 - t0, 3),
            transfer_seconds=round(t3 - t2, 3), dirty_rate=_round(rate),
            frozen_ms=stats.frozen_ms,
        ))  # fmt: skip
        return stoprule.RoundFacts(
            pages_written=stats.pages_written,
            bytes_sent=sent,
            dump_seconds=t1 - t0,
            memwrite_seconds=stats.memwrite_time_us / 1e6,
            transfer_seconds=t3 - t2,
        )

    def undo(self, ctx: Context) -> None:
        """Wipe the round dirs (and the final one) on both hosts."""
        plan = ctx.plan
        actions.settle(ctx.src, ctx.src_images.root, plan.policy.command_timeout)
        dirs = [*((ctx.src, d) for d in ctx.src_images.subdirs),
                *((ctx.dst, d) for d in ctx.dst_images.subdirs)]  # fmt: skip
        actions.wipe_images_if_safe(ctx, dirs)


class FinalRound(Phase):
    """After the workload runs on the destination: the final dump's row of the rounds table,
    from its stats-dump on the source (read here, not inside the freeze). Never fails."""

    name = "final-round"

    def act(self, ctx: Context) -> None:
        if ctx.plan.dry_run or not ctx.src_images.rounds:
            return
        try:
            stats = read_stats(ctx.src, ctx.src_images.final)
        except MigrationError as e:
            ctx.notes.append(f"final round: {e}")
            return
        state, clock = ctx.precopy, ctx.clock
        frozen, dumped = clock.frozen_at or 0.0, clock.dumped_at or 0.0
        sent = ctx.link.bytes_sent - sum(r.bytes_sent for r in state.rounds)
        kind, pages, frozen_ms = "dump", stats.pages_written, stats.frozen_ms
        if ctx.strategy.lazy:  # hybrid: a lazy dump; its pages were pulled after
            kind, pages = "lazy-dump", ctx.postcopy.pulled_bytes // PAGE_SIZE
            frozen_ms = float(clock.downtime_ms or 0)  # (its stats count serving as frozen)
        last = state.last_start
        rate = pages / (frozen - last) if last and frozen > last else None
        dump_s, xfer_s = dumped - frozen, (clock.transferred_at or dumped) - dumped
        state.rounds.append(Round(
            number=state.count + 1, kind=kind, pages_written=pages,
            pages_skipped_parent=stats.pages_skipped_parent, bytes_sent=sent,
            seconds=round(dump_s + xfer_s, 3), dump_seconds=round(dump_s, 3),
            transfer_seconds=round(xfer_s, 3), dirty_rate=_round(rate), frozen_ms=frozen_ms,
        ))  # fmt: skip


def _round(rate: float | None) -> float | None:
    return None if rate is None else round(rate, 1)
