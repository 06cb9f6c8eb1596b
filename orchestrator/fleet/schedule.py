"""`migrate schedule evacuate SRC --cron EXPR | --every DURATION`, `schedule list`, `schedule
delete ID`: scheduled evacuations as Temporal Schedules (the fleet's systemd timer).

A schedule's id is `evacuate/<host>` (one per host). Each run it starts evacuates as the child
`evacuate/<host>`, so a scheduled run and a manual one never run at once; overlapping runs
of one schedule are skipped.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import timedelta
from typing import Any

from temporalio.client import (
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
)
from temporalio.service import RPCError, RPCStatusCode

from orchestrator.config import Config, ConfigError
from orchestrator.fleet.client import timing
from orchestrator.fleet.engine import Engine, connect
from orchestrator.fleet.types import EVACUATE_WORKFLOW, EvacuateInput, evacuate_id

_DURATION = re.compile(r"^(\d+)(s|m|h|d)$")


def duration(text: str) -> timedelta:
    m = _DURATION.match(text.strip())
    if not m or int(m.group(1)) < 1:
        raise ConfigError(f"--every {text!r}: give a duration like 30s, 15m, 6h or 7d")
    n = int(m.group(1))
    return timedelta(**{{"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[m.group(2)]: n})


async def create(args: argparse.Namespace, config: Config, engine: Engine) -> int:
    config.host(args.source)
    for d in args.to:
        config.host(d)
    if bool(args.cron) == bool(args.every):
        raise ConfigError("schedule evacuate: give exactly one of --cron EXPR or --every DURATION")
    if args.cron and len(args.cron.split()) not in (5, 6, 7) and not args.cron.startswith("@"):
        raise ConfigError(f"--cron {args.cron!r}: not a cron expression (5 fields, e.g. "
                          "'0 2 * * 0')")  # fmt: skip
    spec = (
        ScheduleSpec(cron_expressions=[args.cron])
        if args.cron
        else ScheduleSpec(intervals=[ScheduleIntervalSpec(every=duration(args.every))])
    )
    client = await connect(engine)
    inp = EvacuateInput(
        source=args.source, to=list(args.to), only=list(args.only), parallel=args.parallel,
        strategy=args.strategy, dry_run=args.dry_run, timing=timing(engine), scheduled=True,
    )  # fmt: skip
    sid = evacuate_id(args.source)
    try:
        await client.create_schedule(
            sid,
            Schedule(
                action=ScheduleActionStartWorkflow(
                    EVACUATE_WORKFLOW, inp, id=f"scheduled/{sid}", task_queue=engine.task_queue
                ),
                spec=spec,
                policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
            ),
        )
    except ScheduleAlreadyRunningError:
        print(f"migrate: error: schedule {sid} exists: `migrate schedule delete {sid}` first",
              file=sys.stderr)  # fmt: skip
        return 1
    when = f"cron {args.cron!r}" if args.cron else f"every {args.every}"
    print(f"schedule {sid}: evacuate {args.source} {when}" + (" (dry run)" if args.dry_run
          else "") + f" on {engine.address}")  # fmt: skip
    return 0


async def list_(args: argparse.Namespace, engine: Engine) -> int:
    client = await connect(engine)
    rows: list[dict[str, Any]] = []
    async for entry in await client.list_schedules():
        desc = await client.get_schedule_handle(entry.id).describe()
        spec = desc.schedule.spec
        crons = [f"cron {c!r}" for c in spec.cron_expressions]
        when = ", ".join(crons + [f"every {int(i.every.total_seconds())}s" for i in spec.intervals])
        recent = [
            {
                "workflow_id": a.action.workflow_id,
                "run_id": getattr(a.action, "first_execution_run_id", None),
                "started": a.started_at.isoformat(),
            }  # fmt: skip
            for a in desc.info.recent_actions
            if hasattr(a.action, "workflow_id")
        ]
        nxt = [t.isoformat() for t in desc.info.next_action_times[:3]]
        rows.append({"id": entry.id, "spec": when, "paused": desc.schedule.state.paused,
                     "next": nxt, "recent": recent,
                     "runs": desc.info.num_actions})  # fmt: skip
    rows.sort(key=lambda r: r["id"])
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no schedule")
        return 0
    print(f"{'schedule':<24} {'when':<24} {'runs':>5}  next")
    for r in rows:
        print(f"{r['id']:<24} {r['spec']:<24} {r['runs']:>5}  {(r['next'] or ['-'])[0]}")
    return 0


async def delete(args: argparse.Namespace, engine: Engine) -> int:
    client = await connect(engine)
    try:
        await client.get_schedule_handle(args.id).delete()
    except RPCError as e:
        if e.status == RPCStatusCode.NOT_FOUND:
            print(f"migrate: error: no schedule {args.id}", file=sys.stderr)
            return 1
        raise
    print(f"schedule {args.id} deleted")
    return 0
