"""How an evacuation is shown: its placement, its per-workload outcomes, and as JSON."""

from __future__ import annotations

import sys
from dataclasses import asdict
from typing import Any

from orchestrator.evacuate import Survey
from orchestrator.progress import human_bytes
from orchestrator.report import Report


def _mib(kb: int | None) -> str:
    return "-" if kb is None else f"{kb / 1024:.0f}"


def placement(s: Survey) -> None:
    """Where each workload goes, and the room each destination had."""
    if not s.workloads:
        print(f"evacuate {s.source}: no workload is placed there (config `host:` or journal)")
        return
    print(f"evacuate {s.source} -> {', '.join(s.destinations)}: {len(s.workloads)} workload(s)")
    print(f"  {'host':<12} {'free MiB':>9} {'capacity MiB':>13} {'in use MiB':>11}  placed")
    for b in s.placement.bins:
        cap = _mib(b.capacity_kb)
        print(f"  {b.name:<12} {_mib(b.free_kb):>9} {cap:>13} {_mib(b.used_kb):>11}  "
              f"{', '.join(b.placed) or '-'}")  # fmt: skip
    missing = [d for d in s.destinations if d not in {b.name for b in s.placement.bins}]
    for d in missing:
        print(f"  {d:<12} unreachable: not used")
    for name in sorted(s.workloads):
        dest = s.placement.assigned.get(name)
        why = s.missing.get(name) or s.placement.unplaced.get(name)
        rss = _mib(s.rss_kb.get(name))
        print(f"  {name:<20} {rss:>6} MiB -> {dest or 'NOWHERE: ' + str(why)}")


def outcomes(reports: list[Report], dry_run: bool = False) -> None:
    """The final table: one line per workload; errors and notes below it."""
    if dry_run:
        for r in reports:
            print(f"{r.workload} -> {r.destination}: dry run {r.status}")
            for line in r.planned_commands:
                print(f"  {line}")
            if r.error:
                print(f"  error: {r.error}")
        return
    head = f"{'workload':<20} {'destination':<12} {'outcome':<12} {'downtime':>9} "
    print(head + f"{'total':>9} {'bytes':>11}  id")
    for r in reports:
        down = f"{r.downtime_ms} ms" if r.downtime_ms is not None else "-"
        total = f"{r.total_ms / 1000:.1f} s" if r.total_ms else "-"
        moved = human_bytes(r.bytes_transferred) if r.bytes_transferred else "-"
        print(f"{r.workload:<20} {r.destination:<12} {r.status:<12} {down:>9} {total:>9} "
              f"{moved:>11}  {r.id}")  # fmt: skip
    for r in reports:
        if r.error:
            print(f"{r.workload}: {r.status}: {r.error}", file=sys.stderr)
        for line in r.criu_errors:
            print(f"  criu: {line}", file=sys.stderr)
    ok = sum(r.status == "succeeded" for r in reports)
    print(f"{ok} of {len(reports)} workload(s) moved")


def evacuation_dict(s: Survey, reports: list[Report]) -> dict[str, Any]:
    return {
        "source": s.source,
        "destinations": s.destinations,
        "status": "succeeded" if all(r.status == "succeeded" for r in reports) else "failed",
        "placement": {
            "assigned": s.placement.assigned,
            "unplaced": s.placement.unplaced,
            "missing": s.missing,
            "rss_kb": s.rss_kb,
            "hosts": [asdict(b) for b in s.placement.bins],
        },
        "workloads": [r.to_dict() for r in reports],
    }
