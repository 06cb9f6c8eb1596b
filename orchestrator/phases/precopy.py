"""Pre-copy, before the freeze: rounds of `criu pre-dump --track-mem` into IMAGES/1, 2, ...
(each on top of the one before), each rsynced to the destination while the workload runs on,
until the stop rule says freeze. The final dump then writes only what changed since the last
round, into IMAGES/final (see Dump; Transfer sends it, Restore reads it)."""

from __future__ import annotations

import base64
import binascii
import time

from orchestrator import stoprule
from orchestrator.criu import commands as criu
from orchestrator.criu import images
from orchestrator.criu.logs import PAGE_SIZE
from orchestrator.errors import MigrationError
from orchestrator.phases.base import Phase, make_private_dir, remove_dir, settle
from orchestrator.phases.transfer import push, sync_paths
from orchestrator.plan import Context
from orchestrator.report import Round
from orchestrator.transport.ssh import Host, HostError

FINAL = "final"  # the final dump's subdir of the image dirs
FEATURE = "mem_dirty_track"


def dirty_tracking(host: Host) -> bool:
    """Whether host's kernel and CRIU track dirty memory (False if it cannot be asked)."""
    try:
        return host.run(criu.feature(host.config.criu, FEATURE), mutates=False).ok
    except HostError:
        return False


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
    name = "precopy"

    def __init__(self) -> None:
        self.rounds = 0
        self.last_start: float | None = None  # when the last round's pre-dump began

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
        ctx.stopped_by = reason
        estimate = stoprule.estimated_freeze_ms(facts)
        ctx.notes.append(
            f"pre-copy: {self.rounds} round(s), stopped by {reason}"
            + (f" (estimated freeze {estimate:.0f} ms)" if estimate is not None else "")
        )
        ctx.images_subdir, ctx.prev_images_dir = FINAL, f"../{self.rounds}"
        make_private_dir(ctx.src, ctx.src_dir)

    def _round(self, ctx: Context) -> stoprule.RoundFacts | None:
        """One round: pre-dump into IMAGES/N on top of N-1, read its stats, rsync it (and the
        sync_paths) while the workload runs; its row in ctx.rounds."""
        assert ctx.target is not None
        plan = ctx.plan
        n = self.rounds = self.rounds + 1
        src_dir = f"{plan.src_images}/{n}"
        make_private_dir(ctx.src, src_dir)
        t0 = time.monotonic()
        ctx.runtime.pre_dump(ctx.src, ctx.target, src_dir, f"../{n - 1}" if n > 1 else None)
        t1 = time.monotonic()
        stats = images.DumpStats() if plan.dry_run else read_stats(ctx.src, src_dir)
        t2 = time.monotonic()
        # #14: summed while rsync sends it (checked with the final push)
        sent = push(ctx, src_dir, f"{plan.dst_images}/{n}", sums="source") + sync_paths(ctx)
        t3 = time.monotonic()
        ctx.bytes_transferred += sent
        rate = stats.pages_written / (t0 - self.last_start) if self.last_start else None
        self.last_start = t0
        if plan.dry_run:
            return None
        ctx.rounds.append(Round(
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
        settle(ctx.src, plan.src_images, plan.policy.command_timeout)
        ctx.images_subdir, ctx.prev_images_dir = "", None
        if plan.keep_images:
            return
        for sub in [*map(str, range(1, self.rounds + 1)), FINAL]:
            remove_dir(ctx.src, f"{plan.src_images}/{sub}")
            remove_dir(ctx.dst, f"{plan.dst_images}/{sub}")


class FinalRound(Phase):
    """After the workload runs on the destination: the final dump's row of the rounds table,
    from its stats-dump on the source (read here, not inside the freeze). Never fails."""

    name = "final-round"

    def __init__(self, precopy: Precopy) -> None:
        self.precopy = precopy

    def act(self, ctx: Context) -> None:
        if ctx.plan.dry_run or not ctx.images_subdir:
            return
        try:
            stats = read_stats(ctx.src, ctx.src_dir)
        except MigrationError as e:
            ctx.notes.append(f"final round: {e}")
            return
        frozen, dumped = ctx.frozen_at or 0.0, ctx.dumped_at or 0.0
        sent = ctx.bytes_transferred - sum(r.bytes_sent for r in ctx.rounds)
        kind, pages, frozen_ms = "dump", stats.pages_written, stats.frozen_ms
        if ctx.pages_done_at is not None:  # hybrid: a lazy dump; its pages were pulled after
            kind, pages = "lazy-dump", ctx.pulled_bytes // PAGE_SIZE
            sent -= ctx.pulled_bytes  # (its stats count the serving time as frozen)
            frozen_ms = float(ctx.downtime_ms or 0)
        last = self.precopy.last_start
        rate = pages / (frozen - last) if last and frozen > last else None
        dump_s, xfer_s = dumped - frozen, (ctx.transferred_at or dumped) - dumped
        ctx.rounds.append(Round(
            number=self.precopy.rounds + 1, kind=kind, pages_written=pages,
            pages_skipped_parent=stats.pages_skipped_parent, bytes_sent=sent,
            seconds=round(dump_s + xfer_s, 3), dump_seconds=round(dump_s, 3),
            transfer_seconds=round(xfer_s, 3), dirty_rate=_round(rate), frozen_ms=frozen_ms,
        ))  # fmt: skip


def _round(rate: float | None) -> float | None:
    return None if rate is None else round(rate, 1)
