"""All human rendering: a run's phases and report, pre-copy rounds, host checks, history,
one migration's journal, and evacuations (placement, outcomes, JSON). The CLI only parses,
calls, and prints what these print."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from typing import Any

from orchestrator.evacuate import Survey, exit_code
from orchestrator.facts import HostFacts
from orchestrator.gc import Verdict
from orchestrator.journal import Summary
from orchestrator.plan import Plan
from orchestrator.progress import human_bytes
from orchestrator.report import PhaseResult, Report
from orchestrator.workloadcheck import CheckResult as WorkloadCheck


def failure(e: Exception, as_json: bool = False) -> None:
    """A command that could not begin (a host that cannot be reached, a workload with an
    unfinished migration): one line on stderr; with --json also an object saying so."""
    if as_json:
        print(json.dumps({"status": "failed", "error": str(e)}, indent=2))
    print(f"migrate: error: {e}", file=sys.stderr)


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
        "status": {0: "succeeded", 3: "rolled_back", 4: "stranded"}.get(
            exit_code(reports), "failed"
        ),
        "placement": {
            "assigned": s.placement.assigned,
            "unplaced": s.placement.unplaced,
            "missing": s.missing,
            "rss_kb": s.rss_kb,
            "hosts": [asdict(b) for b in s.placement.bins],
        },
        "workloads": [r.to_dict() for r in reports],
    }


def phase_line(name: str, result: PhaseResult | None) -> None:
    if result is None:
        print(f"  {name:<16} ...", flush=True)
        return
    line = f"  {name:<16} {result.status} ({result.seconds:.2f}s)"
    if result.error:
        line += f": {result.error}"
    print(line, flush=True)


def report(r: Report) -> None:
    if r.planned_commands:
        print("dry run: these commands would run, in this order:")
        for line in r.planned_commands:
            print(f"  {line}")
        if r.status == "succeeded":
            print("dry run: pre-flight passed; nothing was changed on either host")
            return
    for line in r.criu_errors:
        print(f"  criu: {line}")
    for note in r.notes:
        print(f"  note: {note}")
    if r.network:
        n = r.network
        print(
            f"  network: {', '.join(n['addresses'])} ({n['mac']}) on {r.destination}'s "
            f"{n['bridge']}; {n['connections_kept']} established TCP connection(s) kept"
        )
    if r.rounds:
        rounds(r)
    if r.freeze:
        freeze(r.freeze)
    downtime = f"{r.downtime_ms} ms" if r.downtime_ms is not None else "-"
    if r.postcopy_tail_ms is not None:
        pulled = r.transfer.get("postcopy_bytes", 0)
        downtime += (
            f", post-copy tail {r.postcopy_tail_ms} ms ({pulled / 2**20:.0f} MiB pulled at "
            f"{r.transfer.get('postcopy_mib_s') or '-'} MiB/s)"
        )
    print(
        f"{r.status}: {r.workload} {r.source} -> {r.destination}; downtime {downtime}, "
        f"total {r.total_ms} ms, {r.bytes_transferred} bytes"
        + (
            f" (bwlimit {r.transfer['bwlimit_kib_s']} KiB/s)"
            if r.transfer.get("bwlimit_kib_s")
            else ""
        )
        + (" (compressed)" if r.transfer.get("compress") else "")
        + (f", pid {r.restored_pid} on {r.destination}" if r.restored_pid else "")
    )
    if r.error:
        print(f"error: {r.error}", file=sys.stderr)


def freeze(f: dict[str, Any]) -> None:
    """The freeze taken apart: what each part took, and what CRIU itself says."""

    def ms(key: str) -> str:
        v = f.get(key)
        return f"{v:.0f} ms" if isinstance(v, (int, float)) else "-"

    moved = (f.get("transfer_bytes") or 0) + (f.get("page_bytes") or 0)
    print(f"  {'freeze':<8} {'criu dump':>10} {'transfer':>10} {'restore':>10} {'overhead':>10}")
    print(f"  {ms('downtime_ms'):<8} {ms('criu_dump_ms'):>10} {ms('transfer_ms'):>10} "
          f"{ms('restore_ms'):>10} {ms('overhead_ms'):>10}   (CRIU: frozen "
          f"{ms('criu_frozen_ms')}, restore {ms('criu_restore_ms')}; "
          f"{human_bytes(moved)} moved inside the freeze)")  # fmt: skip


def rounds(r: Report) -> None:
    """Pre-copy's rounds as a table, and what stopped them."""
    print(f"  {'round':>5} {'kind':<8} {'pages':>9} {'skipped':>9} {'MiB sent':>9} "
          f"{'seconds':>8} {'dirty pages/s':>13} {'frozen ms':>9}")  # fmt: skip
    for x in r.rounds:
        rate = f"{x.dirty_rate:.0f}" if x.dirty_rate is not None else "-"
        print(f"  {x.number:>5} {x.kind:<8} {x.pages_written:>9} {x.pages_skipped_parent:>9} "
              f"{x.bytes_sent / 2**20:>9.1f} {x.seconds:>8.2f} {rate:>13} "
              f"{x.frozen_ms:>9.0f}")  # fmt: skip
    if r.stopped_by:
        print(f"  pre-copy stopped by: {r.stopped_by}")


def summary_dict(j: Summary) -> dict[str, Any]:
    return {
        "id": j.id, "started": j.started, "workload": j.workload, "source": j.source,
        "destination": j.destination, "strategy": j.strategy, "status": j.status,
        "last_phase": j.last_phase, "running": j.running, "journal": str(j.path),
    }  # fmt: skip


def checks(results: list[HostFacts], as_json: bool = False) -> None:
    """The host half of pre-flight, one row per host."""
    if as_json:
        print(json.dumps([asdict(c) | {"ok": c.ok, "problems": c.problems()} for c in results]))
        return
    print(f"{'host':<12} {'criu':<8} {'check':<6} {'rsync':<6} {'free MiB':>9}  "
          f"{'features':<62}  problems")  # fmt: skip
    for c in results:
        ver = ".".join(map(str, c.criu_version)) if c.criu_version else "-"
        print(
            f"{c.host:<12} {ver:<8} {'ok' if c.criu_ok else 'FAIL':<6} "
            f"{'ok' if c.rsync else 'no':<6} {c.free_kb // 1024:>9}  "
            f"{' '.join(c.features or []) or '-':<62}  " + ("; ".join(c.problems()) or "-")
        )


def workload_check(c: WorkloadCheck, as_json: bool = False) -> None:
    """`migrate check WORKLOAD SRC DST`: will it move; each refusal one line."""
    if as_json:
        print(json.dumps({**asdict(c), "moves": c.moves}, indent=2))
        return
    where = f"pid {c.root_pid}, {c.pids} task(s)" if c.root_pid else "not found"
    print(f"{c.workload} ({where}) {c.source} -> {c.destination}: "
          + ("it will move" if c.moves else "it will NOT move"))  # fmt: skip
    for line in c.refusals:
        print(f"  refused: {line}")
    for path in c.locked_files:
        print(f"  lock: {path} (moves with it: the source copy ends at the dump)")
    for conn in c.connections:
        print(f"  tcp: {conn}")


def history(rows: list[Summary], as_json: bool = False) -> None:
    if as_json:
        print(json.dumps([summary_dict(j) for j in rows], indent=2))
        return
    print(f"{'id':<24} {'started (UTC)':<20} {'workload':<20} {'route':<20} status")
    for j in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(j.started))
        status = j.status or _unfinished(j)
        print(f"{j.id:<24} {when:<20} {j.workload:<20} {j.source + ' -> ' + j.destination:<20} "
              f"{status}")  # fmt: skip


def _unfinished(j: Summary) -> str:
    if j.running:  # its controller lives (it holds the journal): nothing to recover
        return f"RUNNING (in {j.last_phase})"
    return f"UNFINISHED (in {j.last_phase}; migrate recover {j.id})"


def show(j: Summary, as_json: bool = False) -> None:
    """One migration's journal, event by event."""
    if as_json:
        print(json.dumps(summary_dict(j) | {"events": j.events}, indent=2))
        return
    print(f"{j.id}: {j.workload} {j.source} -> {j.destination}, {j.strategy}, "
          f"{j.status or ('RUNNING' if j.running else 'UNFINISHED')} "
          f"(stage {j.stage.name.lower()})")  # fmt: skip
    t0 = j.started
    for ev in j.events:
        rest = {
            k: v for k, v in ev.items() if k not in ("t", "event", "freeze") and v not in (None, [])
        }
        facts = rest.pop("facts", None) or {}
        rest.update({k: v for k, v in facts.items() if v not in (None, [], False)})
        detail = " ".join(f"{k}={v}" for k, v in rest.items() if k != "workload_config")
        t = ev.get("t")
        offset = f"+{t - t0:8.3f}s" if isinstance(t, (int, float)) else " " * 10
        print(f"  {offset} {ev['event']:<9} {detail}")
        if ev["event"] == "end" and isinstance(ev.get("freeze"), dict):
            freeze(ev["freeze"])


def leftovers(verdicts: list[Verdict], applied: bool, failed: list[str], as_json: bool) -> None:
    """`migrate gc`: one line per leftover, whether it is (or was) removed, and why."""
    if as_json:
        rows = [asdict(v.leftover) | {"garbage": v.garbage, "why": v.why} for v in verdicts]
        print(json.dumps({"applied": applied, "leftovers": rows, "failed": failed}, indent=2))
        return
    garbage = [v for v in verdicts if v.garbage]
    for v in verdicts:
        mark = ("removed" if applied else "would remove") if v.garbage else "kept"
        print(f"{v.leftover.host:<10} {mark:<13} {v.leftover.kind:<8} {v.leftover.what}: {v.why}")
    for line in failed:
        print(f"error: {line}", file=sys.stderr)
    if not applied and garbage:
        print(f"{len(garbage)} leftover(s) to remove: run `migrate gc --apply`")
    elif not verdicts:
        print("no leftovers" + (" on the hosts that answered" if failed else ""))


def run_header(plan: Plan, src: str, dst: str, notes: list[str]) -> None:
    print(f"migrate {plan.workload.name}: {src} -> {dst}, strategy {plan.strategy}, id {plan.id}")
    for note in (n for n in notes if n.startswith("auto: ")):
        print(f"  note: {note}")


def lab_up(made: Any) -> None:
    from orchestrator import lab

    for h in made.hosts:
        print(f"{h.name:<8} {h.address:<14} netns {h.netns}")
    print(f"{lab.CLIENT:<8} {lab.CLIENT_ADDRESS:<14} (for test clients: lab exec client)")
    print(f"config: {made.config_path}")
    names = " ".join(h.name for h in made.hosts)
    print(f"try: MIGRATE_CONFIG={made.config_path} migrate check {names}")


def lab_status(hosts: Any) -> None:
    for s in hosts:
        state = "up" if s.alive else "DOWN"
        print(f"{s.name:<8} {s.address:<14} sshd pid {s.sshd_pid:<8} {state}")
