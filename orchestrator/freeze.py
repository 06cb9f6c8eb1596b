"""The freeze, taken apart (issue 15): how long CRIU's dump, the transfer inside the freeze and
CRIU's restore each took, what CRIU itself says (stats-dump, stats-restore), and what is left:
the orchestration's own overhead. Measured after the workload runs again, never inside the
freeze, and never failing a migration."""

from __future__ import annotations

from collections.abc import Sequence

from orchestrator.criu import images
from orchestrator.criu.logs import PAGE_SIZE
from orchestrator.errors import MigrationError
from orchestrator.plan import Context
from orchestrator.transport.ssh import Host, Result


def longest(ran: Sequence[Result]) -> Result | None:
    """The longest of the commands a step ran (its CRIU command), if the hosts stamped them."""
    stamped = [r for r in ran if r.started is not None and r.ended is not None]
    return max(stamped, key=lambda r: (r.ended or 0) - (r.started or 0), default=None)


def span(ran: Sequence[Result], to_longest: bool = False) -> tuple[float | None, float | None]:
    """When a step's commands began and ended on their host (the earliest start; the latest
    end, or with to_longest the end of its longest command: a restore's, not the ARP announce
    it starts after)."""
    stamped = [r for r in ran if r.started is not None and r.ended is not None]
    if not stamped:
        return None, None
    last = longest(stamped) if to_longest else max(stamped, key=lambda r: r.ended or 0)
    return min(r.started or 0 for r in stamped), last.ended if last else None


def _ms(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round((b - a) * 1000, 1)


def measure(ctx: Context) -> None:
    """Fill ctx.clock.freeze (once the destination runs; the images are still there)."""
    clock = ctx.clock
    if ctx.plan.dry_run or clock.downtime_ms is None:
        return
    dump_ms = _ms(clock.frozen_at, clock.dumped_at)
    restore_ms = _ms(clock.restore_started_at, clock.running_at)
    breakdown: dict[str, float | int | None] = {
        "downtime_ms": clock.downtime_ms,
        "criu_dump_ms": dump_ms,
        "criu_frozen_ms": None,
        "pages_written": None,
        "pages_lazy": None,
        "page_bytes": 0,
        "transfer_ms": clock.transfer_ms,
        "transfer_bytes": clock.transfer_bytes,
        "restore_ms": restore_ms,
        "criu_restore_ms": None,
        "overhead_ms": None,
    }
    if not ctx.strategy.lazy:  # a lazy dump's stats come at its end and count the serving
        dump = _stats(ctx, ctx.src, f"{ctx.src_images.final}/{images.STATS_DUMP}")
        if isinstance(dump, images.DumpStats):
            breakdown["criu_frozen_ms"] = dump.frozen_ms
            breakdown["pages_written"] = dump.pages_written
            breakdown["pages_lazy"] = dump.pages_lazy
            if ctx.page_channel is not None:  # streamed into the destination inside the dump
                breakdown["page_bytes"] = dump.pages_written * PAGE_SIZE
    restore = _stats(ctx, ctx.dst, f"{ctx.dst_images.final}/{images.STATS_RESTORE}")
    if isinstance(restore, images.RestoreStats):
        breakdown["criu_restore_ms"] = restore.restore_time_us / 1000
    parts = (dump_ms, clock.transfer_ms, restore_ms)
    if all(p is not None for p in parts):
        left = clock.downtime_ms - sum(p for p in parts if p is not None)
        breakdown["overhead_ms"] = round(max(0.0, left), 1)
    clock.freeze = breakdown


def _stats(ctx: Context, host: Host, path: str) -> images.DumpStats | images.RestoreStats | None:
    try:
        data = host.read_file(path)
        if not data:
            return None
        if path.endswith(images.STATS_DUMP):
            return images.dump_stats(data)
        return images.restore_stats(data)
    except MigrationError as e:
        ctx.notes.append(f"freeze breakdown: {path} on {host.name}: {e}")
        return None
