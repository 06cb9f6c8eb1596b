"""One migration end to end: its plan, its two host connections, its journal and the runner.

The one path every migration takes, whether started by `migrate run` or by `migrate evacuate`
(several at once, one session per thread). An evacuation's sessions share what gives the same
answer to each of them (Shared): the hosts' connections and agents, the source's ssh link
masters and the hosts' facts; each keeps its own plan, journal, images, lock and undo.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import secrets
import threading
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
from orchestrator.transport.link import Master
from orchestrator.transport.ssh import Host, HostError

log = logging.getLogger("migrate")
#: Migrations of one evacuation at once on one shared ssh link master (each may hold two ssh
#: sessions on it while it pushes: sshd's MaxSessions is 10 by default).
MIGRATIONS_PER_MASTER = 4


class Busy(MigrationError):
    """The workload has an unfinished migration: recover it first."""


class Shared:
    """What the migrations of one evacuation share (thread-safe): one Host per host, its
    connection and agent opened once (and again if dropped); the source's ssh link master to
    each destination (one per MIGRATIONS_PER_MASTER migrations in flight), probed and opened
    once; and the hosts' facts. close() ends them all."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.facts = FactsCache()
        self._per_pair = 1
        self._tag = f"evac-{secrets.token_hex(3)}"  # names its masters' sockets
        self._lock = threading.Lock()
        self._hosts: dict[str, Host] = {}
        self._masters: dict[tuple[str, str, int], Master | None] = {}
        self._started: dict[tuple[str, str], int] = {}  # migrations per pair so far

    def share_among(self, parallel: int, facts: FactsCache | None = None) -> None:
        """Before the migrations start: how many run at once (masters per pair), and the
        facts to use if some were asked already."""
        self._per_pair = max(1, math.ceil(parallel / MIGRATIONS_PER_MASTER))
        if facts is not None:
            self.facts = facts

    def host(self, name: str) -> Host:
        """The host's one Host (not connected until used); a migration takes a view()."""
        with self._lock:
            if name not in self._hosts:
                self._hosts[name] = Host(self.config.host(name), self.config.policy)
            return self._hosts[name]

    def view(self, name: str, dry_run: bool, planned: list[str]) -> Host:
        """One migration's view of the host: the shared connection, its own dry run, notes."""
        return self.host(name).share(dry_run, planned)

    def master(self, plan: Plan) -> Master | None:
        """The ssh link master this migration uses (None: its own, as alone: dry run, or too
        long a socket path). The pair's masters take the migrations in turn."""
        if plan.dry_run or not plan.link_spec.socket:
            return None
        pair = (plan.source.name, plan.destination.name)
        with self._lock:
            n = self._started.get(pair, 0)
            self._started[pair] = n + 1
            key = (*pair, n % self._per_pair)
            if key not in self._masters:
                self._masters[key] = Master.for_pair(
                    plan.link_spec, f"{self._tag}-{len(self._masters)}"
                )
            return self._masters[key]

    def close(self) -> None:
        """Close the masters, then the connections (best effort: logged)."""
        with self._lock:
            masters, self._masters = self._masters, {}
            hosts = self._hosts
        for (src, _, _), master in masters.items():
            if master is not None:
                try:
                    master.close(self.host(src))
                except (HostError, MigrationError) as e:
                    log.warning("closing the ssh link master on %s: %s", src, e)
        for host in hosts.values():
            host.close()


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
    shared: Shared | None = None,
) -> Session:
    """Plan one migration (ConfigError on unknown names; Busy if one is unfinished).

    `workload_config` replaces the config's entry for the workload. Without it, a configured
    workload that an earlier migration moved to `source` is looked for under the pid it was
    restored with there (orchestrator.location), not the config's stale one. `facts`: host
    facts already asked (by an evacuation), reused instead of asking again; `shared`: an
    evacuation's connections, link masters and facts (then `facts` is its)."""
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
        if busy and busy[-1].running:
            raise Busy(
                f"workload {workload_config.name} is being migrated now: migration "
                f"{busy[-1].id} (in {busy[-1].last_phase}), whose controller runs: wait for it"
            )
        if busy:
            raise Busy(
                f"workload {workload_config.name} has an unfinished migration "
                f"{busy[-1].id} (its controller died): run `migrate recover {busy[-1].id}` first"
            )
    planned: list[str] = []
    plan = Plan(new_id(), workload_config, src_cfg, dst_cfg, strategy, config.policy,
                keep_images, dry_run)  # fmt: skip
    if shared is not None:
        facts = shared.facts
        src = shared.view(plan.source.name, plan.dry_run, planned)
        dst = shared.view(plan.destination.name, plan.dry_run, planned)
    else:
        src = Host(plan.source, plan.policy, dry_run=plan.dry_run, planned=planned)
        dst = Host(plan.destination, plan.policy, dry_run=plan.dry_run, planned=planned)
    runtime = for_workload(plan.workload)
    auto_note = None
    if plan.strategy == "auto":
        name, auto_note = settle_auto(plan.policy, src, dst, runtime, facts)
        plan = dataclasses.replace(plan, strategy=name)
    ctx = Context.for_plan(plan, strategies.get(plan.strategy), src, dst, runtime)
    master = shared.master(plan) if shared is not None else None
    if master is not None:
        ctx.link = master.link(src)
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
    try:
        python = ("python3",) if src.agent is not None and dst.agent is not None else ()
    except HostError as e:  # nothing will move: pre-flight fails on it, in the report
        return "stopcopy", f"auto: undecided ({e})"
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
