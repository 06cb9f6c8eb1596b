"""Strategies choose which phases run, in which order; they never talk SSH themselves."""

from __future__ import annotations

from collections.abc import Callable

from orchestrator.config import ConfigError
from orchestrator.phases.base import Phase
from orchestrator.phases.confirm import Confirm
from orchestrator.phases.dump import Dump
from orchestrator.phases.pageserver import PageServer
from orchestrator.phases.precopy import FinalRound, Precopy, has_dirty_tracking
from orchestrator.phases.preflight import Preflight
from orchestrator.phases.prepare import Prepare
from orchestrator.phases.restore import Restore
from orchestrator.phases.transfer import Transfer
from orchestrator.phases.verify import Verify
from orchestrator.transport.ssh import Host, HostError


def stopcopy() -> list[Phase]:
    """Freeze, dump everything, copy, restore: the freeze grows with memory size."""
    return [Preflight(), Prepare(), Dump(), Transfer(), Restore(), Verify(), Confirm()]


def stream() -> list[Phase]:
    """Like stopcopy, but the dump streams pages straight to the destination (a page server
    through the source's ssh link): nothing is written twice, only small images are rsynced."""
    return [Preflight(), Prepare(), PageServer(), Dump(), Transfer(), Restore(), Verify(),
            Confirm()]  # fmt: skip


def precopy() -> list[Phase]:
    """Rounds of pre-dumps while the workload runs (each sends only the pages dirtied since
    the one before), until the stop rule says freeze; the final dump is then small."""
    rounds = Precopy()
    return [Preflight(), Prepare(), rounds, Dump(), Transfer(), Restore(), Verify(),
            FinalRound(rounds), Confirm()]  # fmt: skip


STRATEGIES: dict[str, Callable[[], list[Phase]]] = {
    "stopcopy": stopcopy,
    "stream": stream,
    "precopy": precopy,
}
CHOICES = ("auto", *STRATEGIES)


def resolve(name: str) -> str:
    """The concrete strategy for a requested one (`auto` picks the best this build has)."""
    if name == "auto":
        return "stopcopy"
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r} (known: {', '.join(CHOICES)})")
    return name


def choose_auto(src: Host) -> tuple[str, str | None]:
    """What `auto` means for this source: precopy where its kernel tracks dirty memory, else
    stopcopy, with a note saying why (read-only; an unreachable source is left to pre-flight)."""
    try:
        if has_dirty_tracking(src):
            return "precopy", None
    except HostError:
        return "stopcopy", None
    return "stopcopy", (
        f"auto: {src.name} has no dirty-memory tracking (`criu check --feature "
        "mem_dirty_track` fails): stop-copy instead of pre-copy"
    )


def phases(name: str) -> list[Phase]:
    return STRATEGIES[resolve(name)]()
