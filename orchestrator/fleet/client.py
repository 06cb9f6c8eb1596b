"""`migrate run ... --temporal` and `migrate evacuate SRC --temporal`: start the workflow and
follow it, with the same live view, per-phase lines, final output and `--json` as local mode.

Progress comes from the engine: the running migration activity's heartbeat details (phase,
bytes, round), read with `describe` a few times a second; an evacuation's workflow answers a
query with its placement so far, and each child `migrate/<workload>` is described likewise.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
from collections.abc import Callable
from typing import Any

from temporalio.client import Client, WorkflowHandle
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError

from orchestrator import metrics, progress
from orchestrator.config import Config, ConfigError, check_policy
from orchestrator.evacuate import Survey, exit_code
from orchestrator.fleet.engine import Engine, connect
from orchestrator.fleet.types import (
    EVACUATE_WORKFLOW,
    MIGRATE_WORKFLOW,
    PROGRESS,
    EvacuateInput,
    MigrateInput,
    Timing,
    evacuate_id,
    migrate_id,
    report_from_dict,
)
from orchestrator.placement import Bin, Placement

POLL = 0.3  # seconds between progress reads

EXIT_REFUSED = 1


def timing(engine: Engine) -> Timing:
    return Timing(engine.settings.heartbeat_timeout, engine.settings.max_attempts)


async def warn_if_no_worker(client: Client, engine: Engine) -> None:
    """One line on stderr when no worker polls the task queue: the workflow will wait."""
    from temporalio.api.enums.v1 import TaskQueueType
    from temporalio.api.taskqueue.v1 import TaskQueue
    from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest

    try:
        resp = await client.workflow_service.describe_task_queue(
            DescribeTaskQueueRequest(
                namespace=engine.settings.namespace,
                task_queue=TaskQueue(name=engine.task_queue),
                task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
            )
        )
    except RPCError:
        return
    if not resp.pollers:
        print(f"migrate: warning: no worker polls task queue {engine.task_queue} on "
              f"{engine.address}; the workflow waits until one does (`migrate worker`)",
              file=sys.stderr, flush=True)  # fmt: skip


def refused(wid: str, e: Exception) -> int:
    print(f"migrate: error: refused by the engine: {wid} is already running "
          f"(another controller started it); nothing was touched", file=sys.stderr)  # fmt: skip
    return EXIT_REFUSED


async def _details(client: Client, handle: WorkflowHandle[Any, Any]) -> dict[str, Any] | None:
    """The heartbeat details of the workflow's running migration activity, if any."""
    try:
        desc = await handle.describe()
    except RPCError:
        return None
    for pa in desc.raw_description.pending_activities:
        if pa.heartbeat_details.payloads:
            values = await client.data_converter.decode(pa.heartbeat_details.payloads)
            if values and isinstance(values[0], dict) and values[0].get("phase"):
                return values[0] | {"attempt": pa.attempt}
    return None


def _event(d: dict[str, Any]) -> progress.Event:
    return progress.Event(
        workload=d.get("workload") or "-",
        destination=d.get("destination") or "-",
        phase=d.get("phase") or "-",
        status=d.get("state"),
        bytes=int(d.get("bytes") or 0),
        round=d.get("round"),
    )


async def _follow_one(
    client: Client, handle: WorkflowHandle[Any, Any], sink: Callable[[dict[str, Any]], None]
) -> dict[str, Any]:
    result = asyncio.ensure_future(handle.result())
    last = None
    while not result.done():
        d = await _details(client, handle)
        if d is not None and d != last:
            sink(d)
            last = d
        await asyncio.wait([result], timeout=POLL)
    out: dict[str, Any] = result.result()
    return out


# -- migrate run --temporal -------------------------------------------------------------------


async def run(args: argparse.Namespace, config: Config, engine: Engine) -> int:
    wl = config.workload(args.workload)  # names checked here: no host is touched
    config.host(args.source)
    config.host(args.destination)
    if args.source == args.destination:
        raise ConfigError(f"source and destination are the same host ({args.source})")
    overrides: dict[str, Any] = {}
    if args.bwlimit is not None:
        if args.bwlimit < 1:
            raise ConfigError(f"--bwlimit must be a positive number of KiB/s, not {args.bwlimit}")
        overrides["bwlimit"] = args.bwlimit
    if args.compress:
        overrides["compress"] = True
    for key in ("max_downtime_ms", "goal", "max_iterations", "max_precopy_seconds"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    check_policy(dataclasses.replace(config.policy, **overrides), "", flags=True)
    if args.metrics_file:
        metrics.check_path(args.metrics_file)
    client = await connect(engine)  # unreachable: exit 2, before any host is touched
    inp = MigrateInput(
        workload=args.workload, source=args.source, destination=args.destination,
        strategy=args.strategy, dry_run=args.dry_run, keep_images=args.keep_images,
        policy=overrides, timing=timing(engine),
    )  # fmt: skip
    wid = migrate_id(wl.name) + ("/dry-run" if args.dry_run else "")
    try:
        handle = await client.start_workflow(
            MIGRATE_WORKFLOW, inp, id=wid, task_queue=engine.task_queue, result_type=dict
        )
    except WorkflowAlreadyStartedError as e:
        return refused(wid, e)
    await warn_if_no_worker(client, engine)
    if not args.json:
        print(f"migrate {wl.name}: {args.source} -> {args.destination}, strategy "
              f"{args.strategy}, workflow {wid} on {engine.address}")  # fmt: skip
    seen: set[str] = set()

    def lines(d: dict[str, Any]) -> None:
        """A line as each phase begins (as the engine last heard it); results at the end."""
        phase = d.get("phase") or "-"
        if phase not in seen and phase not in ("end", "start"):
            seen.add(phase)
            print(f"  {phase:<16} ...", flush=True)

    if args.json:  # nothing to show until the end: no polling
        raw = await handle.result()
    elif not progress.interactive():
        raw = await _follow_one(client, handle, lines)
        for p in report_from_dict(raw).phases:
            line = f"  {p.name:<16} {p.status} ({p.seconds:.2f}s)"
            print(line + (f": {p.error}" if p.error else ""), flush=True)
    else:
        with progress.LiveView([wl.name]) as view:
            raw = await _follow_one(client, handle, lambda d: view(_event(d)))
    report = report_from_dict(raw)
    if args.metrics_file and not args.dry_run:
        metrics.write(args.metrics_file, [report])
    if args.json:
        print(json.dumps(raw, indent=2))
    else:
        show_report(report)
    return report.exit_code


# -- migrate evacuate --temporal ---------------------------------------------------------------


async def evacuate(args: argparse.Namespace, config: Config, engine: Engine) -> int:
    config.host(args.source)
    for d in args.to:
        config.host(d)
    if args.parallel < 1:
        raise ConfigError(f"--parallel must be at least 1, not {args.parallel}")
    if args.metrics_file:
        metrics.check_path(args.metrics_file)
    client = await connect(engine)
    inp = EvacuateInput(
        source=args.source, to=list(args.to), only=list(args.only), parallel=args.parallel,
        strategy=args.strategy, dry_run=args.dry_run, timing=timing(engine),
    )  # fmt: skip
    wid = evacuate_id(args.source)
    try:
        handle = await client.start_workflow(
            EVACUATE_WORKFLOW, inp, id=wid, task_queue=engine.task_queue, result_type=dict
        )
    except WorkflowAlreadyStartedError as e:
        return refused(wid, e)
    await warn_if_no_worker(client, engine)
    if not args.json:
        print(f"evacuate {args.source}: workflow {wid} on {engine.address}", flush=True)
    if args.json or not progress.interactive():
        result = await handle.result()
    else:
        with progress.LiveView() as view:
            result = await _follow_evacuation(client, handle, view)
    return _evacuation_output(args, result)


async def _follow_evacuation(
    client: Client, handle: WorkflowHandle[Any, Any], view: progress.LiveView
) -> dict[str, Any]:
    result = asyncio.ensure_future(handle.result())
    while not result.done():
        try:
            state = await handle.query(PROGRESS, result_type=dict)
        except RPCError:
            state = {"assigned": {}, "done": {}}
        for name, dest in sorted(state["assigned"].items()):
            if name in state["done"]:
                view(progress.Event(name, dest, "end", state["done"][name], 0))
                continue
            d = await _details(client, client.get_workflow_handle(migrate_id(name)))
            if d is not None and d.get("workload") == name:
                view(_event(d))
            else:
                view(progress.Event(name, dest, "waiting", None, 0))
        await asyncio.wait([result], timeout=POLL * 2)
    out: dict[str, Any] = result.result()
    return out


def _evacuation_output(args: argparse.Namespace, result: dict[str, Any]) -> int:
    if result.get("error"):  # the survey was refused (bad names: exit 2) or failed
        print(f"migrate: error: {result['error']}", file=sys.stderr)
        return 2 if result.get("refused") else 1
    reports = [report_from_dict(r) for r in result["workloads"]]
    names = result.pop("workload_names", [])
    if args.metrics_file and not args.dry_run:
        metrics.write(args.metrics_file, reports)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        from orchestrator import render

        render.placement(survey_of(result, names))
        if reports:
            render.outcomes(reports, dry_run=args.dry_run)
    return exit_code(reports) if reports else 0


def show_report(report: Any) -> None:
    """The local mode's final lines for one migration (render.report on main since its
    render rework; cli._print_report before)."""
    from orchestrator import cli, render

    show = getattr(render, "report", None) or getattr(cli, "_print_report")  # noqa: B009
    show(report)


def survey_of(result: dict[str, Any], names: list[str]) -> Survey:
    """The Survey the local renderer shows, from the workflow's result."""
    p = result.get("placement") or {}
    s = Survey(result["source"], result.get("destinations") or [], dict.fromkeys(names))  # type: ignore[arg-type]
    s.rss_kb, s.missing = p.get("rss_kb") or {}, p.get("missing") or {}
    s.placement = Placement(
        assigned=p.get("assigned") or {},
        unplaced=p.get("unplaced") or {},
        bins=[Bin(**b) for b in p.get("hosts") or []],
    )
    return s
