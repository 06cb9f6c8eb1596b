"""Pre-flight: read-only checks on both hosts before anything is frozen; takes the lock."""

from __future__ import annotations

import os
import socket

from orchestrator import workloadcheck
from orchestrator.config import ConfigError
from orchestrator.errors import MigrationError
from orchestrator.hostcheck import IMAGE_OVERHEAD, IMAGE_SLACK_KB, FactsCache, check_hosts, unmet
from orchestrator.journal import Stage
from orchestrator.phases.base import Phase
from orchestrator.plan import Context


class Preflight(Phase):
    name = "preflight"
    stage = Stage.PLANNED
    #: The evacuation's host facts (asked once per host for all its migrations), if any.
    facts: FactsCache | None = None

    def act(self, ctx: Context) -> None:
        needs = ctx.strategy.needs
        checks = check_hosts([ctx.src, ctx.dst], needs.features, needs, cache=self.facts)
        problems = [p for c in checks for p in c.problems()]
        if not problems:
            problems = unmet(needs, ctx.strategy.title, checks[0], checks[1])
        if problems:
            raise MigrationError(problems[0], details=problems)
        src_v, dst_v = checks[0].criu_version, checks[1].criu_version
        assert src_v and dst_v
        if dst_v < src_v:
            raise MigrationError(
                f"criu on {ctx.dst.name} ({_v(dst_v)}) is older than on {ctx.src.name} "
                f"({_v(src_v)}): the destination must be at least as new"
            )
        lacking = ctx.strategy.needs.runtime - ctx.runtime.capabilities
        if lacking:
            raise MigrationError(
                f"the {ctx.runtime.name} runtime cannot migrate with strategy "
                f"{ctx.strategy.name}: it cannot do {', '.join(sorted(c.value for c in lacking))}"
            )
        target = ctx.runtime.locate(ctx.src)
        ctx.target = target
        for j in ctx.unfinished:
            if j.holds(ctx.plan.source.name, target.root_pid, target.start_time):
                raise MigrationError(
                    f"pid {target.root_pid} on {ctx.src.name} is the workload of the unfinished "
                    f"migration {j.id} ({j.workload}): run `migrate recover {j.id}` first"
                )
        if not ctx.plan.dry_run:
            holder = f"migration {ctx.plan.id} by {socket.gethostname()} pid {os.getpid()}"
            ctx.lock = ctx.src.lock(ctx.plan.lock_path(target.root_pid), holder)
        need_kb = int(target.rss_kb * IMAGE_OVERHEAD) + IMAGE_SLACK_KB
        files = ctx.strategy.pages_on_source  # else the source writes only the small images
        for host, free_kb, need in ((ctx.dst, checks[1].free_kb, need_kb),
                                    (ctx.src, checks[0].free_kb,
                                     need_kb if files else IMAGE_SLACK_KB)):  # fmt: skip
            if free_kb >= need:
                continue
            # (df of the workdir, else of its nearest existing parent: 0 on /proc, /sys, ...)
            hint = "" if free_kb else " (none at all: can the workdir be made there?)"
            if host is ctx.src and files and free_kb >= IMAGE_SLACK_KB:
                hint = " (--strategy stream or postcopy write no pages there)"
            raise MigrationError(
                f"not enough space on {host.name} in {host.config.workdir}: {free_kb // 1024} "
                f"MiB free, images need ~{need // 1024} MiB{hint}"
            )
        policy, inspects = ctx.plan.policy, ctx.runtime.inspects_tree
        verdict = workloadcheck.survey(ctx.src, ctx.dst, target, policy, ctx.strategy.pages,
                                       tree=inspects)  # fmt: skip
        if verdict.refusals:  # what the workload is: bad input (exit 2), nothing frozen
            raise ConfigError(verdict.refusals[0], details=verdict.refusals[1:])
        refusals = ctx.runtime.preflight(ctx.src, ctx.dst, target)
        if refusals:
            raise MigrationError(refusals[0], details=refusals)
        ctx.link.probe(open_master=not ctx.plan.dry_run)  # prepare's link, opened here


def _v(v: tuple[int, int, int]) -> str:
    return ".".join(map(str, v))
