"""Workflows: one migration (`migrate/<workload>`) and one evacuation (`evacuate/<host>`).

The ids are the fleet's mutual exclusion: the engine refuses a second running workflow with
the same id, so a second evacuation of a host, or a second migration of one workload, from any
controller, is refused before anything touches a host. An evacuation surveys (activity),
places (pure, here), then starts one child `migrate/<workload>` per placed workload, at most
`parallel` at once; a child that fails or is refused fails only its own workload. Before it
surveys, an evacuation holds the source's evacuation lock for its whole length (the hold
activity), the lock a local `migrate evacuate` takes: so neither mode evacuates a host the
other is evacuating.
"""

from __future__ import annotations

import asyncio
from contextlib import suppress
from dataclasses import replace
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, ChildWorkflowError

with workflow.unsafe.imports_passed_through():
    from orchestrator.fleet.types import (
        ANCHOR,
        EVACUATE_WORKFLOW,
        HELD,
        HOLD,
        JOURNAL,
        MIGRATE,
        MIGRATE_WORKFLOW,
        PROGRESS,
        REFUSED,
        SURVEY,
        EvacuateInput,
        HoldInput,
        MigrateInput,
        SurveyInput,
        Timing,
        evacuate_id,
        failed_report,
        migrate_id,
        side_queue,
    )
    from orchestrator.placement import Bin, Item, place

#: A migration may take long (pre-copy of a big workload, a slow link); the heartbeat, not
#: this, is what notices a dead worker.
MIGRATION_TIMEOUT = timedelta(hours=6)
#: The longest an evacuation holds its source's lock (its heartbeat notices a dead worker).
HOLD_TIMEOUT = timedelta(days=2)


def _retry(timing: Timing) -> RetryPolicy:
    return RetryPolicy(
        initial_interval=timedelta(seconds=1),
        backoff_coefficient=2.0,
        maximum_interval=timedelta(seconds=15),
        maximum_attempts=timing.max_attempts,
        non_retryable_error_types=[REFUSED],
    )


def _type(err: BaseException | None) -> str | None:
    """The innermost ApplicationError's type of an activity/child failure."""
    while isinstance(err, ActivityError | ChildWorkflowError) and err.cause is not None:
        err = err.cause
    return err.type if isinstance(err, ApplicationError) else None


def _why(err: BaseException) -> str:
    """The innermost message of an activity/child failure."""
    while isinstance(err, ActivityError | ChildWorkflowError) and err.cause is not None:
        err = err.cause
    return str(err.message if isinstance(err, ApplicationError) else err)


@workflow.defn(name=MIGRATE_WORKFLOW)
class MigrateWorkflow:
    def __init__(self) -> None:
        self.status = "running"
        self.journal: list[dict[str, Any]] = []  # as the activity anchored it (see activities)

    @workflow.run
    async def run(self, inp: MigrateInput) -> dict[str, Any]:
        try:
            report: dict[str, Any] = await workflow.execute_activity(
                MIGRATE,
                inp,
                start_to_close_timeout=MIGRATION_TIMEOUT,
                heartbeat_timeout=timedelta(seconds=inp.timing.heartbeat_timeout),
                retry_policy=_retry(inp.timing),
                result_type=dict,
            )
        except ActivityError as e:
            name = (inp.workload_config or {}).get("name") or inp.workload
            report = failed_report(name, inp.source, _why(e), inp.destination)
        self.status = report.get("status", "failed")
        return report

    @workflow.query
    def outcome(self) -> str:
        return self.status

    @workflow.signal(name=ANCHOR)
    def anchor(self, events: list[dict[str, Any]]) -> None:
        """The running attempt's journal up to the end of pre-flight (before anything changes
        on a host); kept in the workflow's history, read by a later attempt."""
        if len(events) >= len(self.journal):
            self.journal = events

    @workflow.query(name=JOURNAL)
    def anchored(self) -> list[dict[str, Any]]:
        return self.journal


@workflow.defn(name=EVACUATE_WORKFLOW)
class EvacuateWorkflow:
    def __init__(self) -> None:
        self.assigned: dict[str, str] = {}
        self.done: dict[str, str] = {}
        self.stage = "survey"
        self.holder: str | None = None  # who holds the source's evacuation lock for us

    @workflow.signal(name=HELD)
    def held(self, holder: str) -> None:
        self.holder = holder

    @workflow.run
    async def run(self, inp: EvacuateInput) -> dict[str, Any]:
        if inp.scheduled:
            return await self._as_child(inp)
        if inp.dry_run:  # read-only: no lock (as in local mode)
            return await self._evacuate(inp)
        self.stage = "lock"
        hold = workflow.start_activity(
            HOLD,
            HoldInput(inp.source),
            task_queue=side_queue(workflow.info().task_queue),
            start_to_close_timeout=HOLD_TIMEOUT,
            heartbeat_timeout=timedelta(seconds=inp.timing.heartbeat_timeout),
            retry_policy=_retry(inp.timing),
            cancellation_type=workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
        )
        await workflow.wait_condition(lambda: self.holder is not None or hold.done())
        if self.holder is None:  # busy (a local evacuation), or no worker could take it
            try:
                await hold
                why = "the evacuation lock's hold ended before it held the lock"
            except ActivityError as e:
                why = _why(e)
            return {"source": inp.source, "destinations": inp.to, "status": "failed",
                    "error": why, "refused": False, "placement": {},
                    "workloads": []}  # fmt: skip
        try:
            return await self._evacuate(inp)
        finally:
            if not hold.done():
                hold.cancel()
                with suppress(ActivityError, asyncio.CancelledError):
                    await hold

    async def _evacuate(self, inp: EvacuateInput) -> dict[str, Any]:
        self.stage = "survey"
        try:
            s: dict[str, Any] = await workflow.execute_activity(
                SURVEY,
                SurveyInput(inp.source, inp.to, inp.only),
                task_queue=side_queue(workflow.info().task_queue),
                start_to_close_timeout=timedelta(minutes=10),
                heartbeat_timeout=timedelta(seconds=max(inp.timing.heartbeat_timeout, 30)),
                retry_policy=_retry(inp.timing),
                result_type=dict,
            )
        except ActivityError as e:  # bad names (refused), or no worker could survey
            refused = _type(e) == REFUSED
            return {"source": inp.source, "destinations": inp.to, "status": "failed",
                    "error": _why(e), "refused": refused, "placement": {},
                    "workloads": []}  # fmt: skip
        bins = [Bin(**b) for b in s["bins"]]
        placement = place([Item(n, kb) for n, kb in sorted(s["rss_kb"].items())], bins)
        self.assigned = dict(placement.assigned)
        self.stage = "migrate"
        reports: dict[str, dict[str, Any]] = {}
        for name, why in s["missing"].items():
            reports[name] = failed_report(name, inp.source, why)
        for name, why in placement.unplaced.items():
            reports[name] = failed_report(name, inp.source, f"not placed: {why}")
        gate = asyncio.Semaphore(max(1, inp.parallel))

        async def one(name: str, dest: str) -> None:
            async with gate:
                child = MigrateInput(
                    workload=name, source=inp.source, destination=dest, strategy=inp.strategy,
                    dry_run=inp.dry_run, keep_images=inp.keep_images,
                    workload_config=s["workloads"][name], timing=inp.timing,
                )  # fmt: skip
                try:
                    reports[name] = await workflow.execute_child_workflow(
                        MIGRATE_WORKFLOW,
                        child,
                        id=migrate_id(name) + ("/dry-run" if inp.dry_run else ""),
                        result_type=dict,
                    )
                except ChildWorkflowError as e:
                    reports[name] = failed_report(name, inp.source, _why(e), dest)
                except Exception as e:  # e.g. WorkflowAlreadyStartedError: refused, not fatal
                    why = f"refused: {migrate_id(name)} is already running ({e})"
                    if "already" not in str(e).lower():
                        why = f"could not start {migrate_id(name)}: {e}"
                    reports[name] = failed_report(name, inp.source, why, dest)
                self.done[name] = reports[name].get("status", "failed")

        await asyncio.gather(*(one(n, d) for n, d in sorted(placement.assigned.items())))
        self.stage = "done"
        ordered = [reports[n] for n in sorted(reports)]
        return {
            "source": inp.source,
            "destinations": s["destinations"],
            "status": "succeeded"
            if all(r.get("status") == "succeeded" for r in ordered)
            else "failed",
            "placement": {
                "assigned": placement.assigned,
                "unplaced": placement.unplaced,
                "missing": s["missing"],
                "rss_kb": s["rss_kb"],
                "hosts": [_bin_dict(b) for b in placement.bins],
            },
            "workloads": ordered,
            "workload_names": sorted(s["workloads"]),
        }

    async def _as_child(self, inp: EvacuateInput) -> dict[str, Any]:
        """A scheduled run: the evacuation itself runs as `evacuate/<host>` (refused, and
        reported so, while another evacuation of the host runs)."""
        self.stage = "child"
        try:
            result: dict[str, Any] = await workflow.execute_child_workflow(
                EVACUATE_WORKFLOW,
                replace(inp, scheduled=False),
                id=evacuate_id(inp.source),
                result_type=dict,
            )
            return result
        except ChildWorkflowError as e:
            why = _why(e)
        except Exception as e:  # WorkflowAlreadyStartedError
            why = f"refused: {evacuate_id(inp.source)} is already running ({e})"
        return {"source": inp.source, "destinations": inp.to, "status": "failed", "error": why,
                "placement": {}, "workloads": []}  # fmt: skip

    @workflow.query(name=PROGRESS)
    def progress(self) -> dict[str, Any]:
        return {"stage": self.stage, "assigned": self.assigned, "done": self.done}


def _bin_dict(b: Bin) -> dict[str, Any]:
    return {"name": b.name, "free_kb": b.free_kb, "capacity_kb": b.capacity_kb,
            "used_kb": b.used_kb, "placed": list(b.placed)}  # fmt: skip
