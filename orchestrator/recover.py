"""Finish or roll back a migration whose controller died, from its journal and both hosts' truth.

The rule, which never needs a human to choose: if the destination runs the restored workload
and the source copy does not run (it is still stopped from the dump, or already killed by
confirm), confirm; otherwise roll back (remove any destination copy, resume the source).
Both end states leave exactly one running copy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from orchestrator.config import Config, NetworkConfig, WorkloadConfig
from orchestrator.criu import background
from orchestrator.errors import MigrationError
from orchestrator.journal import Journal, Summary
from orchestrator.phases import precopy
from orchestrator.phases.base import remove_dir, settle
from orchestrator.phases.pageserver import end_channel, kill_criu
from orchestrator.phases.postcopy import LazyDump
from orchestrator.phases.prepare import close_link
from orchestrator.plan import Context, Plan
from orchestrator.report import PhaseResult, Report
from orchestrator.runtimes import for_workload, procs
from orchestrator.runtimes.base import Target
from orchestrator.runtimes.net import NetInfo
from orchestrator.transport.ssh import Host, HostError


@dataclass
class Copy:
    """One copy of the workload as a host shows it now."""

    pid: int | None
    state: str  # running | stopped | gone | unreachable


def recover(config: Config, summary: Summary) -> Report:
    start = summary.start
    wl_raw = dict(start["workload_config"])
    wl_raw["criu_options"] = tuple(wl_raw.get("criu_options") or ())
    wl_raw["network"] = NetworkConfig(**(wl_raw.get("network") or {}))
    wl_raw["sync_paths"] = tuple(wl_raw.get("sync_paths") or ())
    workload = WorkloadConfig(**wl_raw)
    plan = Plan(
        id=summary.id,
        workload=workload,
        source=config.host(summary.source),
        destination=config.host(summary.destination),
        strategy=summary.strategy,
        policy=config.policy,
        keep_images=bool(start.get("keep_images")),
    )
    if (plan.src_images, plan.dst_images) != (start["src_images"], start["dst_images"]):
        raise MigrationError(
            f"{summary.id}: the hosts' workdir changed in {config.path} since the migration began"
        )
    report = Report(summary.id, summary.workload, summary.source, summary.destination,
                    summary.strategy)  # fmt: skip
    journal = Journal(config.state_dir, summary.id)
    src, dst = Host(plan.source, plan.policy), Host(plan.destination, plan.policy)
    ctx = Context(plan=plan, src=src, dst=dst, runtime=for_workload(workload))
    if plan.strategy in ("precopy", "hybrid"):  # its final dump (the one restored): a subdir
        ctx.images_subdir = precopy.FINAL
    t0 = time.monotonic()
    try:
        report.status = _recover(ctx, summary, report)
    finally:
        src.close()
        dst.close()
    report.phases.append(PhaseResult("recover", report.status, round(time.monotonic() - t0, 3)))
    journal.write("recover", status=report.status, notes=report.notes)
    journal.write("end", status=report.status, error=report.error, recovered=True)
    return report


def _recover(ctx: Context, summary: Summary, report: Report) -> str:
    plan = ctx.plan
    if summary.root_pid is None:
        report.notes.append("the controller died in pre-flight: nothing had changed")
        ctx.runtime.locate(ctx.src)  # MigrationError if the workload is gone from the source
        report.notes.append(f"the workload runs on {plan.source.name}, as before")
        return "rolled_back"
    command = next((e["command"] for e in summary.events if e.get("command")), None)
    net_raw = next((e["net"] for e in summary.events if e.get("net")), None)
    ctx.target = Target(
        root_pid=summary.root_pid,
        pids=[],
        rss_kb=0,
        command=command or "",
        net=NetInfo(**net_raw) if net_raw else None,
        network_lock=next(
            (e["network_lock"] for e in summary.events if e.get("network_lock")), None
        ),  # fmt: skip
    )
    ctx.src.connect()  # the source must answer: without it nothing can be decided
    if plan.strategy == "stream":  # #14: a page channel helper still waiting would hold settle
        try:
            end_channel(ctx)
        except HostError:
            pass  # judged below as unreachable
    if plan.strategy in ("postcopy", "hybrid"):
        stranded = _postcopy(ctx, summary, report)
        if stranded:
            return stranded
    for host, images in ((ctx.src, plan.src_images), (ctx.dst, plan.dst_images)):
        try:
            settle(host, images, plan.policy.command_timeout)
        except HostError:
            pass  # judged below as unreachable
    source = _copy(ctx, ctx.src, summary.root_pid, command)
    if source.state == "gone" and ctx.runtime.checkpointed(ctx.src, plan.src_images):
        source = Copy(summary.root_pid, "stopped")  # its images are the source copy now
    restored = summary.restored_pid
    try:
        restored = restored or ctx.runtime.find_restored(ctx.dst, ctx.dst_dir) or None
    except HostError:
        pass
    dest = _copy(ctx, ctx.dst, restored, command)
    report.notes.append(
        f"found: {plan.source.name} {source.state}, {plan.destination.name} {dest.state} "
        f"(the controller died in {summary.last_phase})"
    )
    healthy = True
    if dest.state == "running" and plan.workload.health:  # as verify would have checked
        healthy = ctx.dst.run(["sh", "-c", plan.workload.health], mutates=False).ok
        if not healthy:
            report.notes.append(f"the copy on {plan.destination.name} fails its health check")
    # An unhealthy destination copy is rolled back only while a source copy exists to resume:
    # never remove the last copy.
    if (
        dest.state == "running"
        and source.state != "running"
        and (healthy or source.state == "gone")
    ):
        if source.state == "stopped":
            ctx.runtime.remove(ctx.src, summary.root_pid)
        report.restored_pid = dest.pid
        report.notes.append(f"confirmed: the workload runs on {plan.destination.name}")
        if not healthy:
            report.notes.append("kept although unhealthy: the source copy is gone; look at it")
        status = "succeeded"
    else:
        if dest.pid and dest.state in ("running", "stopped"):
            ctx.runtime.remove(ctx.dst, dest.pid)
        if source.state == "stopped":
            ctx.runtime.resume(ctx.src, ctx.target, ctx.src_dir)
        if ctx.runtime.running(ctx.src, ctx.target.root_pid):  # resume may have moved it
            report.notes.append(f"rolled back: the workload runs on {plan.source.name}")
            status = "rolled_back"
        else:
            report.error = f"the workload runs on neither host (source {source.state})"
            status = "failed"
    _wipe(ctx, report)
    return status


def _postcopy(ctx: Context, summary: Summary, report: Report) -> str | None:
    """Settle a post-copy migration before the usual rule can judge it: before the destination
    resumed, end its lazy-pages daemon and make the lazy dump let the source run on; after,
    wait for every page (up to the deadline). Returns `stranded` if the pages cannot all come."""
    plan = ctx.plan
    ctx.page_port = next((e["page_port"] for e in summary.events if e.get("page_port")), None)
    resumed = any(e.get("committed") for e in summary.events)
    if not resumed and not ctx.runtime.find_restored(ctx.dst, ctx.dst_dir):
        kill_criu(ctx.dst, "lazy-pages", plan.dst_images)
        LazyDump().undo(ctx)
        return None
    deadline = plan.policy.postcopy_deadline
    pulled = background.wait(ctx.dst, ctx.dst_dir, background.LAZY_PAGES, deadline)
    if pulled == 0:
        report.notes.append(f"post-copy: every page had reached {plan.destination.name}")
        return None
    report.error = (
        f"POST-COPY INCOMPLETE: {plan.destination.name} resumed the workload but its pages did "
        f"not all arrive ({'still pulling' if pulled is None else f'exit {pulled}'}); nothing "
        f"was changed: the source copy stays frozen on {plan.source.name}. Decide by hand."
    )
    return "stranded"


def _copy(ctx: Context, host: Host, pid: int | None, command: str | None) -> Copy:
    """The state of the copy at pid on host; a reused pid running something else is `gone`."""
    if not pid:
        return Copy(None, "gone")
    try:
        table = procs.table(host)
        if pid not in table or (command and table[pid].args != command):
            return Copy(pid, "gone")
        return Copy(pid, ctx.runtime.state(host, pid))
    except HostError:
        return Copy(pid, "unreachable")


def _wipe(ctx: Context, report: Report) -> None:
    """Close the source's ssh link and wipe the images on both hosts (best effort, noted)."""
    plan = ctx.plan
    steps = [
        (lambda: close_link(ctx), plan.source.name),
        (lambda: remove_dir(ctx.src, plan.src_images), plan.source.name),
        (lambda: remove_dir(ctx.dst, plan.dst_images), plan.destination.name),
    ]
    for step, host in steps if not plan.keep_images else steps[:1]:
        try:
            step()
        except HostError as e:
            report.notes.append(f"could not clean up on {host}: {e}")
