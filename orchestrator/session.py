"""One migration end to end: its plan, its own two host connections, its journal and the runner.

The one path every migration takes, whether started by `migrate run` or by `migrate evacuate`
(several at once, one session per thread: nothing here is shared between sessions).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from orchestrator import journal, phases, runner, strategies, workloadcheck
from orchestrator.checkpoint import Pages
from orchestrator.config import Config, Policy, WorkloadConfig
from orchestrator.criu import commands as criu
from orchestrator.errors import MigrationError
from orchestrator.hostcheck import FactsCache, check_hosts
from orchestrator.journal import Journal, NullJournal
from orchestrator.location import whereabouts
from orchestrator.phases.preflight import Preflight
from orchestrator.plan import Context, Plan, new_id
from orchestrator.report import Report
from orchestrator.runtimes import for_workload
from orchestrator.runtimes.base import Runtime
from orchestrator.strategies import DIRTY_TRACKING
from orchestrator.transport.ssh import Host, HostError


class Busy(MigrationError):
    """The workload has an unfinished migration: recover it first."""


@dataclass
class Session:
    """A migration ready to run: hosts not yet connected, journal not yet written."""

    ctx: Context
    journal: Journal
    facts: FactsCache | None = None  # an evacuation's host facts, shared by its migrations

    @property
    def plan(self) -> Plan:
        return self.ctx.plan

    def run(self, listen: runner.Listener | None = None) -> Report:
        """Run the strategy's phases; the host connections are closed whatever happens."""
        try:
            built = phases.build(self.ctx.strategy)
            for phase in built:
                if isinstance(phase, Preflight):
                    phase.facts = self.facts
            return runner.run(self.ctx, built, self.journal, listen)
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
    facts: FactsCache | None = None,
) -> Session:
    """Plan one migration (ConfigError on unknown names; Busy if one is unfinished).

    `workload_config` replaces the config's entry for the workload. Without it, a configured
    workload that an earlier migration moved to `source` is looked for under the pid it was
    restored with there (orchestrator.location), not the config's stale one. `facts`: host
    facts already asked (by an evacuation), reused instead of asking again."""
    strategies.resolve(strategy)
    src_cfg, dst_cfg = config.route(source, destination)
    history = journal.summaries(config.state_dir)  # read once, for both questions below
    if workload_config is None:
        workload_config = config.workload(workload)
        if workload in config.workloads:
            host, moved = whereabouts(config, history).get(workload, (None, None))
            if host == src_cfg.name and moved is not None:
                workload_config = moved
    if not dry_run:
        busy = [j for j in history if j.status is None and j.workload == workload_config.name]
        if busy:
            raise Busy(
                f"workload {workload_config.name} has an unfinished migration "
                f"{busy[-1].id} (its controller died, or it still runs): "
                f"run `migrate recover {busy[-1].id}` first"
            )
    planned: list[str] = []
    plan = Plan(new_id(), workload_config, src_cfg, dst_cfg, strategy, config.policy,
                keep_images, dry_run)  # fmt: skip
    src = Host(plan.source, plan.policy, dry_run=plan.dry_run, planned=planned)
    dst = Host(plan.destination, plan.policy, dry_run=plan.dry_run, planned=planned)
    runtime = for_workload(plan.workload)
    auto_note = None
    if plan.strategy == "auto":
        name, auto_note = settle_auto(plan.policy, src, dst, runtime, facts)
        plan = dataclasses.replace(plan, strategy=name)
    ctx = Context.for_plan(plan, strategies.get(plan.strategy), src, dst, runtime)
    if auto_note:
        ctx.notes.append(auto_note)
    ctx.unfinished = tuple(j for j in history if j.status is None)
    record = NullJournal() if plan.dry_run else Journal(config.state_dir, plan.id)
    return Session(ctx, record, facts)


def settle_auto(
    policy: Policy, src: Host, dst: Host, runtime: Runtime, facts: FactsCache | None = None
) -> tuple[str, str]:
    """Pick the strategy `auto` stands for on these hosts (probing them only if it matters;
    from `facts` if given)."""
    src_f: list[str] = []
    dst_f: list[str] = []
    if policy.allow_postcopy or facts is not None:
        checks = check_hosts([src, dst], features=True, cache=facts)
        src_f, dst_f = list(checks[0].features), list(checks[1].features)
    elif any(DIRTY_TRACKING in s.needs.src_features and s.needs.runtime <= runtime.capabilities
             for s in strategies.TABLE.values()):  # fmt: skip
        src_f = [DIRTY_TRACKING] if _has_feature(src, DIRTY_TRACKING) else []
    # Each host's agent is python3 running there (transport/agent.py).
    python = ("python3",) if src.agent is not None and dst.agent is not None else ()
    name, why = strategies.choose(policy, src_f, dst_f, runtime.capabilities, python)
    if strategies.get(name).pages is not Pages.FILES:
        traits = _holds(policy, src, runtime)  # what only stop-copy's own images can carry
        if traits:
            name, why = strategies.choose(policy, src_f, dst_f, runtime.capabilities, python,
                                          traits)  # fmt: skip
    return name, why


def _holds(policy: Policy, src: Host, runtime: Runtime) -> frozenset[str]:
    """What of strategies.TRAITS the workload has (read-only; nothing if it cannot be read:
    pre-flight says why)."""
    if not runtime.inspects_tree:
        return frozenset()
    try:
        target = runtime.locate(src)
        verdict = workloadcheck.judge(workloadcheck.read_facts(src, target), policy.tcp_outside)
    except MigrationError:
        return frozenset()
    held = {strategies.FILE_LOCKS: verdict.locked_files, strategies.HOST_TCP: verdict.connections}
    return frozenset(trait for trait, found in held.items() if found)


def _has_feature(host: Host, feature: str) -> bool:
    """Whether host's kernel and CRIU have feature (False if it cannot be asked)."""
    try:
        return host.run(criu.feature(host.config.criu, feature), mutates=False).ok
    except HostError:
        return False
