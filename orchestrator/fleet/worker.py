"""`migrate worker --temporal ADDR`: run migrations and evacuations for the fleet.

Start one on each controller (any number); they share the task queue. A worker runs the
workflows and the activities: migrations in threads (`--max-migrations` at once), each the
ordinary session path with its own ssh connections, journal and lock; and, on a queue of their
own, evacuations' surveys and holds on their sources' locks. SIGTERM/SIGINT stop taking new
work and let the migrations running here end (past DRAIN the engine is told they are
cancelled; they still run to their end: a migration is never cut short from the SDK, see
activities.migrate). A worker that dies instead (SIGKILL, its machine gone) is noticed after
the heartbeat timeout, and another worker settles its migrations from the journal in their
last heartbeat.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

from temporalio.worker import Worker

from orchestrator.fleet.activities import Activities, identity
from orchestrator.fleet.engine import Engine, connect
from orchestrator.fleet.types import side_queue
from orchestrator.fleet.workflows import EvacuateWorkflow, MigrateWorkflow

#: How long a stopping worker lets its running migrations finish.
DRAIN = timedelta(minutes=10)
#: Evacuations' surveys and holds a worker runs at once (threads, the holds' idle).
SIDE = 32


async def serve(engine: Engine, config_path: Path, max_migrations: int = 4) -> None:
    client = await connect(engine)
    acts = Activities(config_path, client, asyncio.get_running_loop())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    throttle = timedelta(milliseconds=100)
    with (
        ThreadPoolExecutor(max_workers=max_migrations) as pool,
        ThreadPoolExecutor(max_workers=SIDE) as side_pool,
    ):
        worker = Worker(
            client,
            task_queue=engine.task_queue,
            workflows=[EvacuateWorkflow, MigrateWorkflow],
            activities=[acts.migrate],
            activity_executor=pool,
            max_concurrent_activities=max_migrations,
            identity=acts.identity,
            # Deliver each heartbeat (a phase change, with the journal) within 0.1 s: what a
            # retry knows of a dead attempt is what its last delivered heartbeat said.
            max_heartbeat_throttle_interval=throttle,
            default_heartbeat_throttle_interval=throttle,
            graceful_shutdown_timeout=DRAIN,
        )
        # Evacuations' surveys and holds on their sources' locks: on their own queue and
        # threads, so they never take a migration's slot (holds, waiting for their workflows
        # to end, filling every slot would stall their own evacuations for good).
        side = Worker(
            client,
            task_queue=side_queue(engine.task_queue),
            activities=[acts.survey, acts.hold],
            activity_executor=side_pool,
            max_concurrent_activities=SIDE,
            identity=acts.identity,
            max_heartbeat_throttle_interval=throttle,
            default_heartbeat_throttle_interval=throttle,
        )
        print(
            f"migrate worker {identity()}: engine {engine.address}, namespace "
            f"{engine.settings.namespace}, task queue {engine.task_queue}, config {config_path}",
            file=sys.stderr,
            flush=True,
        )
        async with worker, side:  # on stop, the holds end first: another worker retakes them
            await stop.wait()
        print(f"migrate worker {identity()}: stopped", file=sys.stderr, flush=True)
