"""Finish or roll back a migration whose controller died, from its journal and both hosts' truth.

Three steps: read what the journal says (journal.Summary: stage, strategy, facts), ask both
hosts what is true now (`observe`: remote reads only), and decide with a pure rule (`decide`),
which never needs a human to choose and is unit-tested over every case; then `apply` acts.

The rule: if the destination runs the restored workload and the source copy does not run
(still stopped from the dump, or already killed by confirm), confirm; otherwise roll back
(remove any destination copy, resume the source). A post-copy migration whose destination had
resumed is confirmed only once every page has arrived, else left alone (stranded). Nothing is
decided while a host that may hold a copy cannot be asked, and images are removed only once a
copy is seen running: never the last copy.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from orchestrator import actions, strategies
from orchestrator.checkpoint import Pages
from orchestrator.config import Config, HostConfig, NetworkConfig, Policy, WorkloadConfig
from orchestrator.criu import background
from orchestrator.errors import MigrationError
from orchestrator.journal import Journal, Stage, Summary
from orchestrator.plan import Context, Plan
from orchestrator.report import PhaseResult, Report
from orchestrator.runtimes import for_workload, procs
from orchestrator.runtimes.base import Target
from orchestrator.runtimes.net import NetInfo
from orchestrator.transport.ssh import Host, HostError, LockBusy, RemoteLock

RUNNING, STOPPED, GONE, UNREACHABLE = procs.RUNNING, procs.STOPPED, procs.GONE, "unreachable"


class PageState(Enum):
    """Post-copy: where the pages are, once the destination had resumed."""

    NOT_LAZY = "n/a"
    ALL_THERE = "all there"
    STILL_PULLING = "still pulling"
    FAILED = "failed"


@dataclass(frozen=True)
class Seen:
    """What the hosts show now."""

    source: str  # running | stopped | gone | unreachable
    destination: str  # running | stopped | gone | unreachable
    source_images: bool = False  # the source copy exists only as its images (resume restores it)
    healthy: bool | None = None  # the destination copy's health check (None: none run)
    pages: PageState = PageState.NOT_LAZY


class Action(Enum):
    NOTHING = "nothing"  # nothing had changed (pre-flight)
    CONFIRM = "confirm"  # kill the source copy, wipe images: the destination keeps it
    ROLLBACK = "rollback"  # remove the destination copy, resume the source, wipe images
    ABORT_LAZY = "abort-lazy"  # post-copy before resume: end the lazy dump, then roll back
    STRANDED = "stranded"  # post-copy resumed but pages missing: touch nothing, alarm
    WAIT = "wait"  # a host that may hold a copy cannot be asked: change nothing
    LOST = "lost"  # no copy runs anywhere: keep every image, say where


@dataclass(frozen=True)
class Decision:
    action: Action
    why: str


def decide(stage: Stage, lazy: bool, committed: bool, seen: Seen) -> Decision:
    """The recovery rule, pure: what to do with a migration that reached `stage`."""
    if stage == Stage.PLANNED:
        return Decision(Action.NOTHING, "the controller died in pre-flight: nothing had changed")
    if seen.source == UNREACHABLE:
        return Decision(Action.WAIT, "the source cannot be asked")
    dest_may_hold = stage >= Stage.RESTORING
    if seen.destination == UNREACHABLE and dest_may_hold:
        return Decision(Action.WAIT, "the destination, which may run a copy, cannot be asked")
    dest = seen.destination if dest_may_hold else GONE
    if lazy and (committed or stage >= Stage.RESUMED or dest in (RUNNING, STOPPED)):
        if seen.pages is PageState.ALL_THERE:
            return Decision(Action.CONFIRM, "post-copy: every page had reached the destination")
        return Decision(
            Action.STRANDED, f"post-copy: the destination resumed; pages {seen.pages.value}"
        )
    source_copy = seen.source in (RUNNING, STOPPED) or seen.source_images
    if stage >= Stage.CONFIRMING and dest == RUNNING and seen.source != RUNNING:
        return Decision(Action.CONFIRM, "confirm had begun: the destination's copy was verified")
    if (
        dest == RUNNING
        and seen.source != RUNNING
        and (seen.healthy is not False or not source_copy)
    ):
        why = "the destination runs it and the source copy does not"
        if seen.healthy is False:
            why += " (kept although unhealthy: the source copy is gone)"
        return Decision(Action.CONFIRM, why)
    if not source_copy:
        return Decision(Action.LOST, f"no copy runs (source {seen.source}, destination {dest})")
    if lazy and stage >= Stage.FROZEN and not committed:
        return Decision(Action.ABORT_LAZY, "post-copy before the destination resumed")
    sick = " (the destination's copy fails its health check)" if seen.healthy is False else ""
    return Decision(Action.ROLLBACK, f"source {seen.source}, destination {dest}{sick}")


def recover(
    config: Config, summary: Summary, connect: Callable[[HostConfig, Policy], Host] = Host
) -> Report:
    """Settle one unfinished migration; journal what was done and end it (unless WAIT).
    `connect` makes the host objects (tests pass a fake)."""
    strategy = strategies.get(summary.strategy)
    plan = Plan(
        id=summary.id, workload=_workload(summary), source=config.host(summary.source),
        destination=config.host(summary.destination), strategy=strategy.name,
        policy=config.policy, keep_images=summary.keep_images,
    )  # fmt: skip
    src_root, dst_root = plan.src_layout.root, plan.dst_layout.root  # (the id is checked here)
    start = summary.start
    if (src_root, dst_root) != (start.get("src_images"), start.get("dst_images")):
        raise MigrationError(
            f"{summary.id}: the hosts' workdir changed in {config.path} since the migration began"
        )
    report = Report(summary.id, summary.workload, summary.source, summary.destination,
                    strategy.name)  # fmt: skip
    src, dst = connect(plan.source, plan.policy), connect(plan.destination, plan.policy)
    ctx = Context.for_plan(plan, strategy, src, dst, for_workload(plan.workload))
    rounds = summary.facts.get("rounds")
    if isinstance(rounds, int) and rounds > 0:
        ctx.src_images = ctx.src_images.after_rounds(rounds)
        ctx.dst_images = ctx.dst_images.after_rounds(rounds)
    ctx.target = _target(summary)
    ctx.restored_pid = summary.restored_pid or 0
    t0 = time.monotonic()
    journal = Journal(config.state_dir, summary.id)
    journal.hold()  # JournalError if its controller (or another recover) still runs
    lock = None
    try:
        lock, busy = _lock(ctx, summary)
        seen = observe(ctx, summary)
        decision = decide(summary.stage, strategy.lazy, summary.committed, seen)
        if busy:
            decision = Decision(Action.WAIT, busy)
        report.notes.append(
            f"found: {plan.source.name} {seen.source}, {plan.destination.name} "
            f"{seen.destination} (the controller died in {summary.last_phase}): "
            f"{decision.action.value}, {decision.why}"
        )
        report.status = apply(ctx, decision, seen, report)
        report.phases.append(PhaseResult("recover", report.status, round(time.monotonic() - t0, 3)))
        if decision.action is not Action.WAIT:
            journal.write("recover", status=report.status, action=decision.action.value,
                          notes=report.notes)  # fmt: skip
            journal.write("end", status=report.status, error=report.error, recovered=True)
    finally:
        if lock is not None:
            lock.release()
        journal.release()
        src.close()
        dst.close()
    return report


def _lock(ctx: Context, summary: Summary) -> tuple[RemoteLock | None, str | None]:
    """Take the workload's lock on the source, as a migration does: (lock, None), or (None,
    why not) when a live migration holds it; (None, None) if the source cannot be asked."""
    if ctx.target is None:
        return None, None
    holder = f"recover of {summary.id} by {socket.gethostname()} pid {os.getpid()}"
    try:
        return ctx.src.lock(ctx.plan.lock_path(ctx.target.root_pid), holder), None
    except LockBusy as e:
        return None, f"a live migration holds the workload's lock: {e}"
    except HostError:
        return None, None


def _workload(summary: Summary) -> WorkloadConfig:
    raw = dict(summary.workload_config)
    raw["criu_options"] = tuple(raw.get("criu_options") or ())
    raw["network"] = NetworkConfig(**(raw.get("network") or {}))
    raw["sync_paths"] = tuple(raw.get("sync_paths") or ())
    try:
        return WorkloadConfig(**raw)
    except TypeError as e:
        raise MigrationError(f"{summary.path}: its workload record is unreadable: {e}") from None


def _target(summary: Summary) -> Target | None:
    if summary.root_pid is None:
        return None
    f = summary.facts
    raw = f.get("namespaces")
    ns: list[str] = raw if isinstance(raw, list) else []
    return Target(
        root_pid=summary.root_pid, pids=[], rss_kb=0, command=str(f.get("command") or ""),
        start_time=summary.start_time,
        pidns_init="pidns_init" in ns,
        own_mntns="own_mntns" in ns,
        own_netns="own_netns" in ns,
        net=NetInfo(**f["net"]) if isinstance(f.get("net"), dict) else None,
        network_lock=f.get("network_lock") if isinstance(f.get("network_lock"), str) else None,
        new_paths=[p for p in f.get("new_paths") or [] if isinstance(p, str)],
        self_stopped=[p for p in f.get("self_stopped") or [] if isinstance(p, int)],
    )  # fmt: skip


def observe(ctx: Context, summary: Summary) -> Seen:
    """Ask both hosts what is true now (reads; waits for CRIU to let go of the images, and for
    post-copy's pages once the destination had resumed)."""
    if summary.stage == Stage.PLANNED or ctx.target is None:
        return Seen(source=_located(ctx), destination=GONE)
    policy, lazy = ctx.plan.policy, ctx.strategy.lazy
    # A page channel helper still waiting would hold the images dir for ever. (Post-copy's,
    # once its lazy dump began, holds the dump's connection: abort_lazy_dump needs it.)
    waiting = ctx.strategy.pages is Pages.PAGE_SERVER or summary.stage < Stage.FROZEN
    if ctx.strategy.pages is not Pages.FILES and waiting:
        _safe(lambda: actions.end_channel(ctx))
    if not lazy:  # (a lazy dump serves pages until they are pulled: it is not waited for)
        for host, root in ((ctx.src, ctx.src_images.root), (ctx.dst, ctx.dst_images.root)):
            _safe(lambda h=host, r=root: actions.settle(h, r, policy.command_timeout))
    command = ctx.target.command
    source = _copy(ctx, ctx.src, ctx.target.root_pid, command, ctx.target.start_time)
    images = False
    if source == GONE:
        images = bool(_safe(lambda: ctx.runtime.checkpointed(ctx.src, ctx.src_images.final)))
    found = _safe(lambda: ctx.runtime.find_restored(ctx.dst, ctx.dst_images.final))
    ctx.restored_pid = ctx.restored_pid or int(found or 0)
    if ctx.restored_pid:
        start = summary.facts.get("restored_start")
        dest = _copy(ctx, ctx.dst, ctx.restored_pid, command,
                     start if isinstance(start, int) else None)  # fmt: skip
    else:
        dest = _reachable(ctx.dst)
    pages = PageState.NOT_LAZY
    if lazy and (summary.committed or dest in (RUNNING, STOPPED)):
        final = ctx.dst_images.final
        code = _safe(lambda: background.wait(ctx.dst, final, background.LAZY_PAGES,
                                             policy.postcopy_deadline))  # fmt: skip
        pages = (
            PageState.ALL_THERE
            if code == 0
            else PageState.STILL_PULLING
            if code is None
            else PageState.FAILED
        )
    healthy = None
    health = ctx.plan.workload.health
    if dest == RUNNING and health:  # as verify would have checked
        r = _safe(lambda: ctx.dst.run(["sh", "-c", health]))
        healthy = bool(r and r.ok)
    return Seen(source, dest, images, healthy, pages)


def apply(ctx: Context, decision: Decision, seen: Seen, report: Report) -> str:
    """Carry the decision out; the status it ends with."""
    plan, action = ctx.plan, decision.action
    if action is Action.NOTHING:
        _safe(ctx.link.close)  # pre-flight's probe may have opened the link's master
        if seen.source == RUNNING:
            report.notes.append(f"the workload runs on {plan.source.name}, as before")
            return "rolled_back"
        report.error = f"the workload is {seen.source} on {plan.source.name}"
        return "failed"
    if action is Action.WAIT:
        report.error = f"cannot recover now: {decision.why}; nothing was changed (retry later)"
        return "failed"
    if action is Action.STRANDED:
        report.error = (
            f"POST-COPY INCOMPLETE: {plan.destination.name} resumed the workload but its pages "
            f"did not all arrive ({seen.pages.value}); nothing was changed: the source copy "
            f"stays frozen on {plan.source.name}. Decide by hand."
        )
        return "stranded"
    if action is Action.LOST:
        report.error = (
            f"the workload runs on neither host ({decision.why}); its images are kept: "
            f"{plan.source.name}:{ctx.src_images.root} and {plan.destination.name}:"
            f"{ctx.dst_images.root}"
        )
        return "failed"
    assert ctx.target is not None
    if action is Action.CONFIRM:
        if seen.source in (RUNNING, STOPPED):
            actions.remove_source(ctx)
        report.restored_pid = ctx.restored_pid or None
        report.notes.append(f"confirmed: the workload runs on {plan.destination.name}")
        _wipe(ctx, report)
        return "succeeded"
    if action is Action.ABORT_LAZY:
        actions.kill_criu(ctx.dst, "lazy-pages", ctx.dst_images.root)
        actions.abort_lazy_dump(ctx)
    if seen.destination in (RUNNING, STOPPED) and ctx.restored_pid:
        ctx.runtime.remove(ctx.dst, ctx.restored_pid)
    actions.unmirror(ctx)
    if action is Action.ROLLBACK and (seen.source == STOPPED or seen.source_images):
        ctx.runtime.resume(ctx.src, ctx.target, ctx.src_images.final)
    if ctx.runtime.running(ctx.src, ctx.target.root_pid):  # resume may have moved it
        report.notes.append(f"rolled back: the workload runs on {plan.source.name}")
        _wipe(ctx, report)
        return "rolled_back"
    report.error = (
        f"the workload runs on neither host (source {seen.source}); its images are kept: "
        f"{plan.source.name}:{ctx.src_images.root}"
    )
    return "failed"


def _located(ctx: Context) -> str:
    try:
        ctx.runtime.locate(ctx.src)
        return RUNNING
    except HostError:
        return UNREACHABLE
    except MigrationError:
        return GONE


def _reachable(host: Host) -> str:
    try:
        host.connect()
        return GONE
    except HostError:
        return UNREACHABLE


def _copy(ctx: Context, host: Host, pid: int, command: str, start: int | None = None) -> str:
    """The state of the copy at pid on host; a reused pid running something else is gone.
    With its start time known, (pid, start time) says whether it is the same process."""
    try:
        table = procs.table(host)
        if pid not in table or (command and table[pid].args != command):
            return GONE
        if start is not None:
            ns = procs.namespaces(host, pid)
            if ns is None or (ns.start_time is not None and ns.start_time != start):
                return GONE
        return ctx.runtime.state(host, pid)
    except HostError:
        return UNREACHABLE


def _safe(step):  # type: ignore[no-untyped-def]
    """A read whose failure is judged later (as unreachable, or no)."""
    try:
        return step()
    except MigrationError:
        return None


def _wipe(ctx: Context, report: Report) -> None:
    """Close the source's link and wipe the images on both hosts (best effort, noted)."""
    try:
        actions.wipe_images(ctx)
    except MigrationError as e:
        report.notes.append(f"could not clean up: {e}")
