"""Strategies choose which phases run, in which order; they never talk SSH themselves."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection

from orchestrator.config import ConfigError, Policy
from orchestrator.phases.base import Phase
from orchestrator.phases.confirm import Confirm
from orchestrator.phases.dump import Dump
from orchestrator.phases.pageserver import PageServer, PageTunnel
from orchestrator.phases.postcopy import LazyDump, LazyRestore, PullPages
from orchestrator.phases.precopy import FinalRound, Precopy
from orchestrator.phases.preflight import LAZY_PIPE_BYTES, Needs, Preflight
from orchestrator.phases.prepare import Prepare
from orchestrator.phases.restore import Restore
from orchestrator.phases.transfer import Transfer
from orchestrator.phases.verify import Verify

# python3: to unlock a rolled-back workload's TCP sockets (see runtimes/net.unlock_argv).
# #14: python3 on both hosts runs the page channel's helper (criu/pagechannel.py).
POSTCOPY_NEEDS = Needs(dst_features=("uffd-noncoop",), pipe_max_bytes=LAZY_PIPE_BYTES,
                       src_commands=("python3",), dst_commands=("python3",),
                       why="post-copy")  # fmt: skip
STREAM_NEEDS = Needs(src_commands=("python3",), dst_commands=("python3",), why="stream")
PRECOPY_NEEDS = Needs(src_features=("mem_dirty_track",), why="pre-copy")  # soft-dirty tracking
HYBRID_NEEDS = dataclasses.replace(POSTCOPY_NEEDS, src_features=PRECOPY_NEEDS.src_features,
                                   why="hybrid (pre-copy, then post-copy)")  # fmt: skip


def stopcopy() -> list[Phase]:
    """Freeze, dump everything, copy, restore: the freeze grows with memory size."""
    return [Preflight(), Prepare(), Dump(), Transfer(), Restore(), Verify(), Confirm()]


def stream() -> list[Phase]:
    """Like stopcopy, but the dump streams pages straight to the destination (a page server
    through the source's ssh link): nothing is written twice, only small images are rsynced."""
    return [Preflight(STREAM_NEEDS), Prepare(), PageServer(), Dump(), Transfer(), Restore(),
            Verify(), Confirm()]  # fmt: skip  # #14: STREAM_NEEDS


def precopy() -> list[Phase]:
    """Rounds of pre-dumps while the workload runs (each sends only the pages dirtied since
    the one before), until the stop rule says freeze; the final dump is then small."""
    rounds = Precopy()
    return [Preflight(PRECOPY_NEEDS), Prepare(), rounds, Dump(), Transfer(), Restore(), Verify(),
            FinalRound(rounds), Confirm()]  # fmt: skip


def postcopy() -> list[Phase]:
    """Freeze, move only the small images, run on the destination at once; its memory follows
    on demand and in the background. The freeze no longer grows with memory size; there is no
    rollback once the destination runs (see phases/postcopy.py)."""
    return [Preflight(POSTCOPY_NEEDS), Prepare(), PageTunnel(), LazyDump(), Transfer(),
            LazyRestore(), PullPages(), Verify(), Confirm()]  # fmt: skip


def hybrid() -> list[Phase]:
    """Pre-copy rounds while the workload runs, then post-copy for what they left: the freeze
    moves no pages, and fewer pages are left to pull after the destination resumes. No
    rollback once the destination runs, as for post-copy."""
    rounds = Precopy()
    return [Preflight(HYBRID_NEEDS), Prepare(), rounds, PageTunnel(), LazyDump(), Transfer(),
            LazyRestore(), PullPages(), Verify(), FinalRound(rounds), Confirm()]  # fmt: skip


STRATEGIES: dict[str, Callable[[], list[Phase]]] = {
    "stopcopy": stopcopy,
    "stream": stream,
    "precopy": precopy,
    "postcopy": postcopy,
    "hybrid": hybrid,
}
CHOICES = ("auto", *STRATEGIES)


def resolve(name: str) -> str:
    """Check a requested strategy name (`auto` is settled later, by `choose`)."""
    if name != "auto" and name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r} (known: {', '.join(CHOICES)})")
    return name


def choose(policy: Policy, src_features: Collection[str], dst_features: Collection[str],
           runtime_can: Collection[str]) -> tuple[str, str]:  # fmt: skip
    """What `auto` means for these hosts: (strategy, why). Post-copy only when the policy
    allows it (like libvirt's --postcopy), since it cannot roll back once the destination runs;
    else pre-copy where the source tracks dirty memory; else stop-copy."""
    if policy.allow_postcopy and "postcopy" in runtime_can:
        if "uffd-noncoop" in dst_features:
            if "hybrid" in runtime_can and "mem_dirty_track" in src_features:
                return "hybrid", (
                    "auto: hybrid (post-copy allowed by policy, the destination has uffd, the "
                    "source tracks dirty memory: pre-copy rounds, then post-copy for the rest)"
                )
            return "postcopy", "auto: post-copy (allowed by policy; the destination has uffd)"
        reason = "the destination's kernel has no userfaultfd (uffd-noncoop)"
    elif policy.allow_postcopy:
        reason = "this runtime cannot do post-copy"
    else:
        reason = "post-copy is not allowed by policy (allow_postcopy)"
    # Pre-copy next: it can still roll back, and its freeze moves only the last dirty pages.
    if "precopy" not in runtime_can:
        return "stopcopy", f"auto: stop-copy ({reason}; this runtime cannot do pre-copy)"
    if "mem_dirty_track" in src_features:
        return "precopy", "auto: pre-copy (the source's kernel tracks dirty memory)"
    return "stopcopy", (
        f"auto: stop-copy ({reason}; the source's kernel has no dirty-memory tracking "
        "for pre-copy: mem_dirty_track)"
    )


def phases(name: str) -> list[Phase]:
    if name == "auto":
        raise ConfigError("strategy auto must be settled (strategies.choose) before running")
    return STRATEGIES[resolve(name)]()
