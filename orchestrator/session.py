"""One migration end to end: its plan, its own two host connections, its journal and the runner.

The one path every migration takes, whether started by `migrate run` or by `migrate evacuate`
(several at once, one session per thread: nothing here is shared between sessions).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from orchestrator import journal, runner, strategies
from orchestrator.config import Config, WorkloadConfig
from orchestrator.errors import MigrationError
from orchestrator.journal import Journal, NullJournal
from orchestrator.location import whereabouts
from orchestrator.phases import precopy
from orchestrator.phases.preflight import check_hosts
from orchestrator.plan import Context, Plan, make_plan
from orchestrator.report import Report
from orchestrator.runtimes import for_workload
from orchestrator.transport.ssh import Host


class Busy(MigrationError):
    """The workload has an unfinished migration: recover it first."""


@dataclass
class Session:
    """A migration ready to run: hosts not yet connected, journal not yet written."""

    ctx: Context
    journal: Journal

    @property
    def plan(self) -> Plan:
        return self.ctx.plan

    def run(self, listen: runner.Listener | None = None) -> Report:
        """Run the strategy's phases; the host connections are closed whatever happens."""
        try:
            return runner.run(self.ctx, strategies.phases(self.plan.strategy), self.journal, listen)
        finally:
            self.ctx.src.close()
            self.ctx.dst.close()


def open_session(
    config: Config,
    workload: str,
    source: str,
    destination: str,
    *,
    strategy: str = "auto",
    keep_images: bool = False,
    dry_run: bool = False,
    workload_config: WorkloadConfig | None = None,
) -> Session:
    """Plan one migration (ConfigError on unknown names; Busy if one is unfinished).

    `workload_config` replaces the config's entry for the workload. Without it, a configured
    workload that an earlier migration moved to `source` is looked for under the pid it was
    restored with there (orchestrator.location), not the config's stale one."""
    plan = make_plan(
        config,
        workload,
        source,
        destination,
        strategy=strategies.resolve(strategy),
        keep_images=keep_images,
        dry_run=dry_run,
    )
    if workload_config is None and workload in config.workloads:
        host, moved = whereabouts(config).get(workload, (None, None))
        workload_config = moved if host == plan.source.name else None
    if workload_config is not None:
        plan = dataclasses.replace(plan, workload=workload_config)
    if not plan.dry_run:
        busy = [j for j in journal.summaries(config.state_dir) if j.status is None
                and j.workload == plan.workload.name]  # fmt: skip
        if busy:
            raise Busy(
                f"workload {plan.workload.name} has an unfinished migration "
                f"{busy[-1].id} (its controller died, or it still runs): "
                f"run `migrate recover {busy[-1].id}` first"
            )
    planned: list[str] = []
    src = Host(plan.source, plan.policy, dry_run=plan.dry_run, planned=planned)
    dst = Host(plan.destination, plan.policy, dry_run=plan.dry_run, planned=planned)
    runtime = for_workload(plan.workload)
    auto_note = None
    if plan.strategy == "auto":
        plan, auto_note = _settle_auto(plan, src, dst, runtime.strategies)
    ctx = Context(plan=plan, src=src, dst=dst, runtime=runtime)
    if auto_note:
        ctx.notes.append(auto_note)
    record = NullJournal() if plan.dry_run else Journal(config.state_dir, plan.id)
    return Session(ctx, record)


def _settle_auto(plan: Plan, src: Host, dst: Host, runtime_can: frozenset[str]) -> tuple[Plan, str]:
    """Pick the strategy `auto` stands for on these hosts (probing them only if it matters)."""
    src_f: list[str] = []
    dst_f: list[str] = []
    if plan.policy.allow_postcopy:
        checks = check_hosts([src, dst], features=True)
        src_f, dst_f = checks[0].features or [], checks[1].features or []
    elif "precopy" in runtime_can:  # one question to the source (unreachable: pre-flight says)
        src_f = [precopy.FEATURE] if precopy.dirty_tracking(src) else []
    name, why = strategies.choose(plan.policy, src_f, dst_f, runtime_can)
    return dataclasses.replace(plan, strategy=name), why
