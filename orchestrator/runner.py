"""The migration runner: walks the phases, times them, journals them, and rolls back on failure."""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from orchestrator.config import ConfigError
from orchestrator.errors import MigrationError
from orchestrator.journal import Journal, PhaseState
from orchestrator.phases.base import Phase
from orchestrator.plan import Context
from orchestrator.report import PhaseResult, Report
from orchestrator.runtimes import procs

log = logging.getLogger("migrate")

Listener = Callable[[str, PhaseResult | None], None]


@dataclass
class _Walk:
    """Where walking the phases ended."""

    done: list[Phase] = field(default_factory=list)
    failure: BaseException | None = None  # before the point of no return: roll back
    stranded: BaseException | None = None  # after it: undo nothing, alarm
    unconfirmed: BaseException | None = None  # verified on dst, src unlocked: left to recover


def run(
    ctx: Context, phases: list[Phase], journal: Journal, listen: Listener | None = None
) -> Report:
    """Run phases in order; on failure before the point of no return, undo newest first."""
    plan = ctx.plan
    report = Report(id=plan.id, workload=plan.workload.name, source=plan.source.name,
                    destination=plan.destination.name, strategy=ctx.strategy.name)  # fmt: skip
    emit = listen or (lambda _name, _result: None)
    started = time.monotonic()
    try:
        journal.hold()  # released at the end: while held, recover knows this run is live
        journal.write(
            "start", id=plan.id, workload=plan.workload.name, source=plan.source.name,
            destination=plan.destination.name, strategy=ctx.strategy.name,
            src_images=ctx.src_images.root, dst_images=ctx.dst_images.root,
            keep_images=plan.keep_images, workload_config=asdict(plan.workload),
        )  # fmt: skip
    except MigrationError as e:  # nothing was done yet: a one-line failure
        walk = _Walk(failure=e)
    else:
        walk = _walk(ctx, phases, journal, report, emit)
    settled = True  # False: left for `recover` (no end record)
    if walk.stranded is not None:
        report.status = "stranded"
        _fail(report, walk.stranded)
        report.notes.append(
            f"NO ROLLBACK: {plan.destination.name} had resumed the workload; nothing was undone "
            f"and {plan.source.name} was not confirmed. Journal {journal.path}"
        )
    elif walk.unconfirmed is not None:
        report.status, settled = "failed", False
        _fail(report, walk.unconfirmed)
        report.notes.append(
            f"NOT CONFIRMED: the workload runs on {plan.destination.name} (verified); nothing was "
            f"undone and {plan.source.name}'s copy and images are left as they were: run "
            f"`migrate recover {plan.id}` once {plan.source.name} answers (journal "
            f"{journal.path}; it stays open)"
        )
    elif walk.failure is None:
        report.status = "succeeded"
    else:
        _fail(report, walk.failure)
        report.status, settled = _rollback(ctx, walk.done, journal, report, emit)
        # Refused for what was asked (pid 1, a zombie, ...): bad input, exit 2.
        report.bad_input = isinstance(walk.failure, ConfigError) and len(walk.done) <= 1
    _fill(report, ctx)
    report.total_ms = round((time.monotonic() - started) * 1000)
    try:
        if settled:
            journal.write("end", status=report.status, error=report.error, freeze=report.freeze)
    except MigrationError as e:
        report.notes.append(f"{e}: `migrate recover {plan.id}` will find it unfinished")
    if ctx.lock is not None:
        ctx.lock.release()
    journal.release()
    return report


def _walk(
    ctx: Context, phases: list[Phase], journal: Journal, report: Report, emit: Listener
) -> _Walk:
    """Act each phase in turn, journaled before and after, until one fails."""
    walk = _Walk()
    for phase in phases:
        lost = _keep_lock(ctx, phase)
        if lost is not None:  # never go on unlocked: stop here, as if the last phase failed
            report.phases.append(PhaseResult(phase.name, "failed", 0.0, _message(lost)))
            if phase.cleanup:  # the destination's copy is verified: never undo it for a lock
                walk.unconfirmed = lost
            else:
                walk.failure = lost
            break
        emit(phase.name, None)
        t0 = time.monotonic()
        acting = False  # False while its begin is not journaled: nothing of it has happened
        try:
            journal.advance(phase.stage)
            _record(journal, phase, PhaseState.BEGIN, ctx)
            acting = True
            phase.act(ctx)
            _passed(ctx, phase)
            _record(journal, phase, PhaseState.DONE, ctx)
        except (Exception, KeyboardInterrupt) as e:  # the one broad catch: all roads roll back
            if not isinstance(e, (MigrationError, KeyboardInterrupt)):
                log.exception("unexpected error in %s (a bug): rolling back", phase.name)
            result = PhaseResult(phase.name, "failed", _secs(t0), _message(e))
            report.phases.append(result)
            _record(journal, phase, PhaseState.FAILED, ctx, error=_message(e), report=report)
            emit(phase.name, result)
            if phase.cleanup and acting:  # verified on the destination: never roll back
                report.notes.append(
                    f"{phase.name}: {_message(e)} (the workload runs on "
                    f"{ctx.plan.destination.name}; clean up {ctx.plan.source.name})"
                )
                continue
            if ctx.committed:  # the destination has resumed: stop, undo nothing, alarm
                walk.stranded = e
                break
            walk.failure = e
            walk.done.append(phase)  # a failed phase may have acted in part: undo it too
            break
        result = PhaseResult(phase.name, "ok", _secs(t0))
        report.phases.append(result)
        emit(phase.name, result)
        walk.done.append(phase)
    return walk


def _passed(ctx: Context, phase: Phase) -> None:
    """After a phase succeeded: past the strategy's point of no return, nothing is undone."""
    if phase.name != ctx.strategy.no_return:
        return
    ctx.committed = True
    if ctx.strategy.lazy:
        ctx.notes.append(f"{ctx.strategy.title}: {ctx.plan.destination.name} runs the workload "
                         "from here on; no rollback is possible")  # fmt: skip


def _keep_lock(ctx: Context, phase: Phase) -> MigrationError | None:
    """Before each phase: the source's lock is still held, or taken again if its connection
    dropped and came back; the error that stops the migration if it cannot be."""
    if ctx.lock is None:
        return None
    try:
        if ctx.lock.ensure():
            ctx.notes.append(
                f"the lock on {ctx.src.name} was lost with its ssh connection and taken again "
                f"before {phase.name}"
            )
        return None
    except MigrationError as e:
        return MigrationError(
            f"lost the workload's lock on {ctx.src.name} (its ssh connection dropped) and "
            f"cannot take it again before {phase.name}: {e}"
        )


def _record(journal: Journal, phase: Phase, state: str, ctx: Context, error: str | None = None,
            report: Report | None = None) -> None:  # fmt: skip
    """Journal one phase transition; while failing already, a journal error is only noted."""
    stage = journal.stage if state == PhaseState.BEGIN else None
    fields: dict[str, Any] = {"name": phase.name, "state": state, "facts": facts(ctx)}
    if stage is not None:
        fields["stage"] = int(stage)
    if error is not None:
        fields["error"] = error
    try:
        journal.write("phase", **fields)
    except MigrationError as e:
        if report is None:
            raise
        report.notes.append(str(e))


def _fail(report: Report, e: BaseException) -> None:
    report.error = _message(e)
    report.criu_errors = getattr(e, "details", [])


def _fill(report: Report, ctx: Context) -> None:
    """What the run measured, from the context."""
    plan, link = ctx.plan, ctx.link
    report.downtime_ms = None if plan.dry_run else ctx.clock.downtime_ms
    report.freeze = ctx.clock.freeze
    report.postcopy_tail_ms = ctx.postcopy_tail_ms
    report.bytes_transferred = ctx.bytes_transferred
    report.transfer = {
        "bwlimit_kib_s": plan.policy.bwlimit,
        "compress": plan.policy.compress,
        "rsync_bytes": link.bytes_sent,
        "rsync_mib_s": _rate(link.bytes_sent, link.seconds),
    }
    if ctx.postcopy.pulled_bytes:
        pulled = ctx.postcopy.pulled_bytes
        report.transfer["postcopy_bytes"] = pulled
        report.transfer["postcopy_mib_s"] = _rate(pulled, (ctx.postcopy_tail_ms or 0) / 1000)
    report.restored_pid = ctx.restored_pid or None
    report.rounds, report.stopped_by = ctx.precopy.rounds, ctx.precopy.stopped_by
    if ctx.target is not None and ctx.target.net is not None:
        report.network = {
            "addresses": ctx.target.net.addresses,
            "mac": ctx.target.net.mac,
            "veth": ctx.target.net.veth,
            "bridge": plan.destination.bridge,
            "connections_kept": ctx.connections_kept,
            "connections": ctx.target.net.connections,
            "freeze_ms": report.downtime_ms,
        }
    report.notes.extend(ctx.notes + link.notes + ctx.src.notes + ctx.dst.notes)
    if plan.dry_run:
        report.planned_commands = list(ctx.src.planned)


def _undo_all(
    ctx: Context, phases: list[Phase], journal: Journal, report: Report, emit: Listener
) -> bool:
    """Undo each phase (newest first); go on past a failed undo, whatever it raised. True if
    all succeeded."""
    clean = True
    for phase in phases:
        t0 = time.monotonic()
        try:
            phase.undo(ctx)
            result = PhaseResult(f"undo {phase.name}", "undone", _secs(t0))
        except (Exception, KeyboardInterrupt) as e:
            if not isinstance(e, MigrationError):
                log.exception("unexpected error undoing %s (a bug): going on", phase.name)
            clean = False
            result = PhaseResult(f"undo {phase.name}", "undo_failed", _secs(t0), _message(e))
            log.error("undo of %s failed: %s", phase.name, _message(e))
        report.phases.append(result)
        try:
            journal.write("undo", name=phase.name, state=result.status, error=result.error)
        except MigrationError as e:
            report.notes.append(str(e))
        emit(result.name, result)
    return clean


def _rollback(
    ctx: Context, done: list[Phase], journal: Journal, report: Report, emit: Listener
) -> tuple[str, bool]:
    """Undo phases newest first; `rolled_back` only if the source copy is seen running again.
    Also whether that settles it (False: no copy is seen running, the journal stays open and
    the images stay for `recover`)."""
    if [p.name for p in done] in ([], ["preflight"]):
        report.notes.append("refused in preflight: nothing was changed on either host")
        return "failed", True
    failed = done[-1].name
    undoable = [p for p in reversed(done) if type(p).undo is not Phase.undo]
    try:
        journal.write("rollback", phases=[p.name for p in undoable])
    except MigrationError as e:
        report.notes.append(str(e))
    with _shielded(report):
        clean = _undo_all(ctx, undoable, journal, report, emit)

    ctx.restored_pid = 0
    if ctx.target is None:
        return "failed", True
    src, dst = ctx.plan.source.name, ctx.plan.destination.name
    try:
        state = "running" if ctx.plan.dry_run else ctx.runtime.state(ctx.src, ctx.target.root_pid)
    except MigrationError as e:
        report.notes.append(f"cannot tell whether the workload runs on {src}: {e}")
        state = "unknown"
    if state == procs.RUNNING:
        if not clean:
            report.notes.append(
                f"some undo steps failed (above): check {src} and {dst} for leftovers "
                "(`migrate gc` lists them)"
            )
        report.notes.append(
            f"rolled back: the workload runs on {src} again (pid {ctx.target.root_pid})"
        )
        return "rolled_back", True
    if state == procs.GONE and clean:
        report.notes.append(f"first error: {report.error}")
        report.error = (
            f"workload {ctx.plan.workload.name} (pid {ctx.target.root_pid}) exited by itself "
            f"on {src} during {failed}: nothing to migrate; nothing was left on either host"
        )
        return "failed", True
    report.notes.append(
        f"ROLLBACK INCOMPLETE: the workload is {state} on {src}; check {src} and {dst} by hand "
        f"or run `migrate recover {ctx.plan.id}` (journal {journal.path}; it stays open, "
        "with the images)"
    )
    return "failed", False


@contextmanager
def _shielded(report: Report) -> Iterator[None]:
    """SIGINT/SIGTERM cannot stop a rollback half way: they are noted and ignored until done."""

    def note(sig: int, _frame: object) -> None:
        report.notes.append(f"signal {signal.Signals(sig).name} ignored during rollback")

    try:
        old = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: nothing to shield
        yield
        return
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def facts(ctx: Context) -> dict[str, object]:
    """What undo and recovery need to know at each step."""
    t = ctx.target
    return {
        "root_pid": t.root_pid if t else None,
        "start_time": t.start_time if t else None,
        "command": t.command if t else None,
        "namespaces": [n for n in ("pidns_init", "own_mntns", "own_netns") if getattr(t, n)]
        if t
        else None,
        "restored_pid": ctx.restored_pid or None,
        "restored_start": ctx.restored_start,
        "net": asdict(t.net) if t and t.net else None,
        "network_lock": t.network_lock if t else None,
        "new_paths": list(t.new_paths) if t and t.new_paths else None,
        "self_stopped": list(t.self_stopped) if t and t.self_stopped else None,
        "committed": ctx.committed,
        "rounds": ctx.src_images.rounds or None,
    }


def _message(e: BaseException) -> str:
    if isinstance(e, KeyboardInterrupt):
        return "interrupted (SIGINT/SIGTERM)"
    return str(e) or type(e).__name__


def _rate(nbytes: int, seconds: float) -> float | None:
    """MiB/s, or None when nothing was timed."""
    return round(nbytes / seconds / 2**20, 1) if seconds > 0 else None


def _secs(t0: float) -> float:
    return round(time.monotonic() - t0, 3)
