"""Command line: parse, load config, hand over to the runner, render. No migration logic here."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from orchestrator import (
    __version__,
    evacuate,
    gc,
    journal,
    metrics,
    progress,
    render,
    strategies,
    workloadcheck,
)
from orchestrator.config import Config, ConfigError, config_path, load
from orchestrator.errors import MigrationError
from orchestrator.hostcheck import check_hosts
from orchestrator.recover import recover
from orchestrator.session import Busy, open_session
from orchestrator.transport.ssh import Host

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell says it


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit 2
        print(f"migrate: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="migrate", description="Live-migrate Linux workloads between hosts on CRIU.")
    p.add_argument("--version", action="version", version=f"migrate {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log every remote command")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    r = sub.add_parser("run", help="migrate one workload from SRC to DST")
    r.add_argument("workload", help="a workload name from the config, or pid:N, or pidfile:PATH")
    r.add_argument("source")
    r.add_argument("destination")
    r.add_argument("--config", help="config file (default $MIGRATE_CONFIG or ./migrate.yaml)")
    r.add_argument("--strategy", default="auto", choices=strategies.CHOICES)
    r.add_argument(
        "--dry-run", action="store_true", help="print the remote commands; change nothing"
    )
    r.add_argument("--json", action="store_true", help="print one JSON report")
    r.add_argument("--keep-images", action="store_true", help="keep image dirs (they hold memory)")
    r.add_argument("--bwlimit", type=int, metavar="KIB_S", help="limit rsync's bandwidth")
    r.add_argument("--compress", action="store_true", help="compress what rsync sends")
    pre = r.add_argument_group("pre-copy stop rule (policy in the config; these override it)")
    pre.add_argument("--max-downtime-ms", type=int, metavar="MS",
                     help="freeze once the estimated freeze fits in MS")  # fmt: skip
    pre.add_argument(
        "--goal",
        type=int,
        metavar="PERCENT",
        help="freeze once a round writes <= PERCENT of the previous round's pages",
    )
    pre.add_argument("--max-iterations", type=int, metavar="N", help="at most N rounds")
    pre.add_argument("--max-precopy-seconds", type=float, metavar="S",
                     help="freeze after S seconds of rounds")  # fmt: skip
    r.add_argument("--metrics-file", metavar="PATH", help="write Prometheus metrics (textfile)")
    _policy_words(r)

    e = sub.add_parser("evacuate", help="migrate every workload on SRC to other hosts")
    e.add_argument("source")
    e.add_argument("--to", action="append", default=[], metavar="DST",
                   help="a destination (repeat; default: all other hosts)")  # fmt: skip
    e.add_argument("--only", action="append", default=[], metavar="WORKLOAD",
                   help="move just this workload (repeat)")  # fmt: skip
    e.add_argument("--parallel", type=int, default=1, metavar="N", help="migrations at once")
    e.add_argument("--config")
    e.add_argument("--strategy", default="auto", choices=strategies.CHOICES)
    e.add_argument("--dry-run", action="store_true", help="print placement and commands")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--metrics-file", metavar="PATH", help="write Prometheus metrics (textfile)")

    c = sub.add_parser(
        "check",
        help="HOST...: the host half of pre-flight, as a table; WORKLOAD SRC DST: will it move?",
    )
    c.add_argument("hosts", nargs="+", metavar="HOST | WORKLOAD SRC DST")
    c.add_argument("--config")
    c.add_argument("--json", action="store_true")
    _policy_words(c)

    h = sub.add_parser("history", help="journaled migrations, oldest first")
    h.add_argument("--config")
    h.add_argument("--json", action="store_true")

    sh = sub.add_parser("show", help="one migration's journal")
    sh.add_argument("id")
    sh.add_argument("--config")
    sh.add_argument("--json", action="store_true")

    rc = sub.add_parser("recover", help="finish or roll back migrations whose controller died")
    rc.add_argument("id", nargs="?", help="default: every unfinished migration")
    rc.add_argument("--config")
    rc.add_argument("--json", action="store_true")

    gc = sub.add_parser("gc", help="leftovers no migration owns, on every host (dry run)")
    gc.add_argument("hosts", nargs="*", help="default: every configured host")
    gc.add_argument("--apply", action="store_true", help="remove them (default: only show)")
    gc.add_argument("--unknown", action="store_true",
                    help="also those of migrations this controller never journaled")  # fmt: skip
    gc.add_argument("--config")
    gc.add_argument("--json", action="store_true")

    lab = sub.add_parser("lab", help="a local lab of hosts in network namespaces (root)")
    lsub = lab.add_subparsers(dest="lab_command", required=True, parser_class=_Parser)
    up = lsub.add_parser("up", help="create the lab and write DIR/migrate.yaml")
    up.add_argument("--dir", type=Path)
    up.add_argument("--hosts", type=int, default=2)
    down = lsub.add_parser("down", help="remove everything the lab made")
    down.add_argument("--dir", type=Path)
    st = lsub.add_parser("status", help="the lab's hosts")
    st.add_argument("--dir", type=Path)
    ex = lsub.add_parser("exec", help="run a command inside a lab host: lab exec HOST -- CMD...")
    ex.add_argument("--dir", type=Path)
    ex.add_argument("host")
    ex.add_argument("argv", nargs=argparse.REMAINDER)

    # Fleet mode (Temporal): --temporal on run/evacuate, `worker`, `schedule` (no import of
    # temporalio unless one of them runs).
    from orchestrator.fleet.cli import register as register_fleet

    register_fleet(sub, _Parser)
    return p


def _policy_words(p: argparse.ArgumentParser) -> None:
    """The workload check's policy settings, as options (override the config's)."""
    p.add_argument("--tcp-outside", choices=("refuse", "close"),
                   help="a TCP peer outside a plain tree: refuse or close")  # fmt: skip
    p.add_argument("--cpu-check", choices=("strict", "off"),
                   help="criu cpuinfo check of the source's CPU on the destination")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # -v is for operators: migrate's own lines (one per remote command, with its host and
    # duration), timestamped; never Fabric's, Invoke's or paramiko's debug lines.
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s.%(msecs)03d migrate: %(message)s" if args.verbose
        else "migrate: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )  # fmt: skip
    logging.getLogger("migrate").setLevel(logging.INFO if args.verbose else logging.WARNING)
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)
    try:
        from orchestrator.fleet.cli import dispatch as fleet_dispatch

        fleet = fleet_dispatch(args)  # fleet mode (Temporal); None: a local command
        if fleet is not None:
            return fleet
        if args.command == "run":
            return cmd_run(args)
        if args.command == "evacuate":
            return cmd_evacuate(args)
        if args.command == "check":
            return cmd_check(args)
        if args.command == "history":
            return cmd_history(args)
        if args.command == "show":
            return cmd_show(args)
        if args.command == "recover":
            return cmd_recover(args)
        if args.command == "gc":
            return cmd_gc(args)
        return cmd_lab(args)
    except ConfigError as e:
        print(f"migrate: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except MigrationError as e:  # e.g. a host that cannot be reached before anything began
        render.failure(e, getattr(args, "json", False))
        return 1
    except KeyboardInterrupt:  # outside a migration's run (which rolls back itself)
        print(f"migrate: error: {args.command} interrupted before it finished; run it "
              "again (`migrate history` lists any migration left unfinished)",
              file=sys.stderr)  # fmt: skip
        return _interrupted()


def _interrupted() -> int:
    """Exit 130 now: threads still waiting on a host (a connect that hangs) would otherwise
    hold the exit until their timeouts. Locks and connections end with the process."""
    if threading.active_count() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)
    return EXIT_INTERRUPTED


def _config(args: argparse.Namespace) -> Config:
    return load(config_path(args.config))


def cmd_run(args: argparse.Namespace) -> int:
    config = _config(args).with_policy(
        bwlimit=args.bwlimit, compress=args.compress or None, tcp_outside=args.tcp_outside,
        cpu_check=args.cpu_check,
        **{k: getattr(args, k) for k in ("max_downtime_ms", "goal", "max_iterations",
                                          "max_precopy_seconds")},
    )  # fmt: skip
    if args.metrics_file:
        metrics.check_path(args.metrics_file)
    try:
        session = open_session(
            config,
            args.workload,
            args.source,
            args.destination,
            strategy=args.strategy,
            keep_images=args.keep_images,
            dry_run=args.dry_run,
        )
    except Busy as e:
        render.failure(e, args.json)
        return 1
    plan, ctx = session.plan, session.ctx
    if not args.json:
        render.run_header(plan, str(ctx.src), str(ctx.dst), ctx.notes)
    _interrupt_on_sigterm()
    if args.json or not progress.interactive():
        report = session.run(None if args.json else render.phase_line)
    else:
        with progress.LiveView() as view:
            report = session.run(progress.listener(ctx, view))
    if args.metrics_file and not plan.dry_run:
        metrics.write(args.metrics_file, [report])
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        render.report(report)
    return report.exit_code


def cmd_evacuate(args: argparse.Namespace) -> int:
    config = _config(args)
    if args.parallel < 1:
        raise ConfigError(f"--parallel must be at least 1, not {args.parallel}")
    if args.metrics_file:
        metrics.check_path(args.metrics_file)
    s = evacuate.survey(config, args.source, args.to, args.only, lock=not args.dry_run)
    if not args.json:
        render.placement(s)
    if not s.workloads:
        if args.metrics_file and not args.dry_run:
            metrics.write(args.metrics_file, [])  # the job ran; nothing to move
        if args.json:
            print(json.dumps(render.evacuation_dict(s, []), indent=2))
        return 0
    opts = evacuate.Options(parallel=args.parallel, strategy=args.strategy, dry_run=args.dry_run)
    _interrupt_on_sigterm()
    if args.json or not progress.interactive():
        reports = evacuate.evacuate(config, s, opts)
    else:
        with progress.LiveView(sorted(s.placement.assigned)) as view:
            reports = evacuate.evacuate(config, s, opts, sink=view)
    if args.metrics_file and not args.dry_run:
        metrics.write(args.metrics_file, reports)
    if args.json:
        print(json.dumps(render.evacuation_dict(s, reports), indent=2))
    else:
        render.outcomes(reports, dry_run=args.dry_run)
    return evacuate.exit_code(reports)


def _interrupt_on_sigterm() -> None:
    def _raise(_sig: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _raise)


def cmd_check(args: argparse.Namespace) -> int:
    config = _config(args).with_policy(tcp_outside=args.tcp_outside, cpu_check=args.cpu_check)
    first = args.hosts[0]
    if first not in config.hosts and len(args.hosts) == 3:  # WORKLOAD SRC DST
        result = workloadcheck.check_workload(config, *args.hosts)
        render.workload_check(result, args.json)
        return 0 if result.moves else EXIT_USAGE
    hosts = [Host(config.host(name), config.policy) for name in args.hosts]
    results = check_hosts(hosts, features=True)
    for host in hosts:
        host.close()
    render.checks(results, args.json)
    return 0 if all(c.ok for c in results) else 1


def cmd_history(args: argparse.Namespace) -> int:
    render.history(journal.summaries(_config(args).state_dir), args.json)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    render.show(journal.find(_config(args).state_dir, args.id), args.json)
    return 0


def cmd_recover(args: argparse.Namespace) -> int:
    config = _config(args)
    if args.id:
        todo = [journal.find(config.state_dir, args.id)]
        if todo[0].status is not None:
            print(f"{args.id}: already ended ({todo[0].status}); nothing to recover")
            return 0
    else:
        todo = [j for j in journal.summaries(config.state_dir) if j.status is None]
        if not todo:
            print("no unfinished migration")
            return 0
    codes = []
    for j in todo:
        try:
            report = recover(config, j)
        except MigrationError as err:
            print(f"migrate: recover {j.id}: {err} (the journal stays unfinished)", file=sys.stderr)
            codes.append(1)
            continue
        if args.json:
            print(json.dumps(report.to_dict(), indent=2))
        else:
            print(f"recover {j.id}:")
            render.report(report)
        codes.append(report.exit_code)
    return max(codes)


def cmd_gc(args: argparse.Namespace) -> int:
    config = _config(args)
    names = args.hosts or sorted(config.hosts)
    verdicts, failed = [], []
    for name in names:
        host = Host(config.host(name), config.policy)
        try:
            found = gc.survey(host, config.state_dir, args.unknown)
            verdicts += found
            if args.apply:
                failed += gc.remove(host, found)
        except MigrationError as e:
            failed.append(str(e))
        finally:
            host.close()
    render.leftovers(verdicts, args.apply, failed, args.json)
    return 1 if failed else 0


def cmd_lab(args: argparse.Namespace) -> int:
    from orchestrator import lab

    lab_dir = args.dir or lab.DEFAULT_DIR
    try:
        if args.lab_command == "up":
            render.lab_up(lab.up(lab_dir, hosts=args.hosts))
            return 0
        if args.lab_command == "down":
            lab.down(lab_dir)
            print("lab down")
            return 0
        if args.lab_command == "status":
            render.lab_status(lab.status(lab_dir))
            return 0
        cmd = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        if not cmd:
            raise ConfigError("lab exec: give a command after --")
        argv = lab.exec_argv(lab.load(lab_dir), args.host, cmd)
        # Inherited descriptors would follow a workload started this way into its dump
        # (CRIU cannot look up their mounts from inside the host): keep only stdio.
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        os.execvp(argv[0], argv)
    except lab.LabError as e:
        print(f"migrate: lab: {e}", file=sys.stderr)
        return 1
    return 1


if __name__ == "__main__":
    sys.exit(main())
