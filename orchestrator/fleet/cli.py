"""Fleet mode's command line: `--temporal` on `run` and `evacuate`, and the `worker` and
`schedule` commands. Parsing only: temporalio is imported when a fleet command runs, so the
local mode works without the `temporal` extra."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

from orchestrator import strategies
from orchestrator.config import ConfigError, config_path, load

EXIT_USAGE = 2


def _engine_flags(p: argparse.ArgumentParser, required: bool = False) -> None:
    g = p.add_argument_group("fleet mode (Temporal)")
    g.add_argument(
        "--temporal",
        nargs="?",
        const="",
        default=None,
        metavar="ADDR",
        help="run through the engine at ADDR (HOST:PORT; bare: temporal.address from the config)",
    )
    g.add_argument("--namespace", help="the engine's namespace (default: config, else default)")
    g.add_argument("--task-queue", help="the workers' task queue (default: config, else migrate)")


def register(sub: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    """Add the fleet options and commands to the top-level subparsers."""
    for name in ("run", "evacuate"):
        _engine_flags(sub.choices[name])
    w = sub.add_parser("worker", help="run migrations for the fleet (Temporal worker)")
    w.add_argument("--config")
    w.add_argument("--max-migrations", type=int, default=4, metavar="N",
                   help="migrations this worker runs at once")  # fmt: skip
    _engine_flags(w)
    s = sub.add_parser("schedule", help="scheduled evacuations (Temporal Schedules)")
    ssub = s.add_subparsers(dest="schedule_command", required=True, parser_class=parser_class)
    se = ssub.add_parser("evacuate", help="evacuate SRC on a schedule")
    se.add_argument("source")
    se.add_argument("--cron", metavar="EXPR", help="when, as cron (UTC), e.g. '0 2 * * 0'")
    se.add_argument("--every", metavar="DURATION", help="or every DURATION (30s, 15m, 6h, 7d)")
    se.add_argument("--to", action="append", default=[], metavar="DST")
    se.add_argument("--only", action="append", default=[], metavar="WORKLOAD")
    se.add_argument("--parallel", type=int, default=1, metavar="N")
    se.add_argument("--strategy", default="auto", choices=strategies.CHOICES)
    se.add_argument("--dry-run", action="store_true")
    se.add_argument("--config")
    _engine_flags(se)
    sl = ssub.add_parser("list", help="the schedules, their next and recent runs")
    sl.add_argument("--config")
    sl.add_argument("--json", action="store_true")
    _engine_flags(sl)
    sd = ssub.add_parser("delete", help="remove a schedule (e.g. evacuate/host-a)")
    sd.add_argument("id")
    sd.add_argument("--config")
    _engine_flags(sd)


def dispatch(args: argparse.Namespace) -> int | None:
    """Run a fleet command; None when args is a local-mode command."""
    fleet = args.command in ("worker", "schedule") or (
        args.command in ("run", "evacuate") and args.temporal is not None
    )
    if not fleet:
        return None
    try:
        import temporalio  # noqa: F401
    except ImportError:
        print("migrate: error: fleet mode needs the temporal extra: pip install -e '.[temporal]'",
              file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    code = _fleet(args)
    # The SDK's native (Rust) runtime was seen to crash the interpreter's teardown (SIGSEGV
    # after the output was complete): leave at once, output flushed, with the real code.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _fleet(args: argparse.Namespace) -> int:
    from orchestrator.fleet import engine  # (each command imports only what it needs)

    try:
        config = load(config_path(args.config))
    except ConfigError as e:
        print(f"migrate: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        eng = engine.resolve(config, args.temporal, args.namespace, args.task_queue)
        if args.command == "worker":
            from orchestrator.fleet import worker

            if args.max_migrations < 1:
                raise ConfigError(f"--max-migrations must be at least 1, not {args.max_migrations}")
            asyncio.run(worker.serve(eng, config.path, args.max_migrations))
            return 0
        if args.command in ("run", "evacuate"):
            from orchestrator.fleet import client

            run = client.run if args.command == "run" else client.evacuate
            return asyncio.run(run(args, config, eng))
        from orchestrator.fleet import schedule

        if args.schedule_command == "evacuate":
            return asyncio.run(schedule.create(args, config, eng))
        if args.schedule_command == "list":
            return asyncio.run(schedule.list_(args, eng))
        return asyncio.run(schedule.delete(args, eng))
    except ConfigError as e:  # also an unreachable engine (orchestrator.fleet.engine)
        print(f"migrate: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("migrate: interrupted; the workflow goes on in the engine", file=sys.stderr)
        return 130
