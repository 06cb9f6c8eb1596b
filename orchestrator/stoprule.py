"""When to stop pre-copy rounds and freeze: pure logic over what the rounds measured."""

from __future__ import annotations

from dataclasses import dataclass

PAGE_SIZE = 4096

# Why pre-copy stopped (the report names one).
DOWNTIME = "downtime"  # the estimated final freeze fits in max_downtime_ms
GOAL = "goal"  # a round wrote <= goal percent of the previous round's pages
NO_PROGRESS = "no-progress"  # pages stopped shrinking
MAX_ITERATIONS = "max-iterations"
MAX_SECONDS = "max-precopy-seconds"


@dataclass(frozen=True)
class Limits:
    max_downtime_ms: int
    goal: float  # percent
    max_iterations: int
    max_precopy_seconds: float


@dataclass(frozen=True)
class RoundFacts:
    """What one pre-dump round measured."""

    pages_written: int
    bytes_sent: int  # by rsync (compressed, if asked): for the report, not the rate
    dump_seconds: float  # the pre-dump command, wall clock
    memwrite_seconds: float  # of which CRIU spent writing pages (its memwrite_time)
    transfer_seconds: float  # rsync of the round's dir


def transfer_rate(rounds: list[RoundFacts]) -> float | None:
    """Bytes of pages per second the link was seen to move (compression included): the best
    round (small rounds are mostly overhead)."""
    rates = [r.pages_written * PAGE_SIZE / r.transfer_seconds
             for r in rounds if r.transfer_seconds > 0 and r.pages_written]  # fmt: skip
    return max(rates) if rates else None


def fixed_cost_ms(last: RoundFacts) -> float:
    """What a freeze costs besides moving pages: the last pre-dump's own work without its page
    writing (freezing, collecting the tree), counted twice: the dump and the restore."""
    return 2 * 1000 * max(0.0, last.dump_seconds - last.memwrite_seconds)


def estimated_freeze_ms(rounds: list[RoundFacts]) -> float | None:
    """The final freeze if we stopped now: the pages one round's interval dirtied (the last
    round's pages_written) at the measured rate, plus the fixed cost. None: no rate yet."""
    rate = transfer_rate(rounds)
    if not rounds or not rate:
        return None
    last = rounds[-1]
    return last.pages_written * PAGE_SIZE / rate * 1000 + fixed_cost_ms(last)


def decide(limits: Limits, rounds: list[RoundFacts], elapsed: float) -> str | None:
    """After a round: the reason to stop now (one of the constants above), or None to go on."""
    if not rounds:
        return None
    estimate = estimated_freeze_ms(rounds)
    if estimate is not None and estimate <= limits.max_downtime_ms:
        return DOWNTIME
    if len(rounds) >= 2:
        prev, last = rounds[-2].pages_written, rounds[-1].pages_written
        if last * 100 <= limits.goal * prev:
            return GOAL
        if last >= prev:
            return NO_PROGRESS
    if len(rounds) >= limits.max_iterations:
        return MAX_ITERATIONS
    if elapsed >= limits.max_precopy_seconds:
        return MAX_SECONDS
    return None
