"""The pre-copy stop rule, with made-up rounds."""

from __future__ import annotations

import pytest

from orchestrator import stoprule
from orchestrator.stoprule import RoundFacts

LIMITS = stoprule.Limits(max_downtime_ms=500, goal=20, max_iterations=5, max_precopy_seconds=60)
MIB = 2**20


def rnd(pages: int, mib_s: float = 100, dump_s: float = 0.5, write_s: float = 0.4) -> RoundFacts:
    sent = pages * 4096
    return RoundFacts(pages, sent, dump_s, write_s, sent / (mib_s * MIB))


def test_estimate_is_last_rounds_pages_at_the_best_rate_plus_fixed_cost() -> None:
    rounds = [rnd(65536, mib_s=100), rnd(10240, mib_s=50, dump_s=0.3, write_s=0.1)]
    # 40 MiB at 100 MiB/s = 400 ms; fixed: 2 x (0.3 - 0.1) s = 400 ms
    assert stoprule.estimated_freeze_ms(rounds) == pytest.approx(800)
    assert stoprule.estimated_freeze_ms([]) is None


@pytest.mark.parametrize(
    "rounds, elapsed, reason",
    [
        ([rnd(256)], 1, stoprule.DOWNTIME),  # 1 MiB: fits at once
        ([rnd(65536)], 1, None),  # 256 MiB at 100 MiB/s: 2.6 s, go on
        ([rnd(65536), rnd(12000)], 5, stoprule.GOAL),  # 18% of the round before
        ([rnd(65536), rnd(30000)], 5, None),  # 46%: go on
        ([rnd(65536), rnd(30000), rnd(30000)], 9, stoprule.NO_PROGRESS),
        ([rnd(65536), rnd(30000), rnd(31000)], 9, stoprule.NO_PROGRESS),
        ([rnd(65536), rnd(40000), rnd(30000), rnd(25000), rnd(21000)], 9, stoprule.MAX_ITERATIONS),
        ([rnd(65536), rnd(40000)], 61, stoprule.MAX_SECONDS),
        ([], 0, None),
    ],
)
def test_decide(rounds: list[RoundFacts], elapsed: float, reason: str | None) -> None:
    assert stoprule.decide(LIMITS, rounds, elapsed) == reason


def test_downtime_wins_over_the_others_and_a_slow_link_does_not_stop_early() -> None:
    fast = [rnd(65536), rnd(1000, mib_s=200, dump_s=0.1, write_s=0.05)]
    assert stoprule.decide(LIMITS, fast, 1000) == stoprule.DOWNTIME
    slow = [rnd(65536, mib_s=1), rnd(30000, mib_s=1)]  # 117 s of pages: not within 500 ms
    assert stoprule.decide(LIMITS, slow, 1) is None


def test_no_rate_without_a_timed_transfer() -> None:
    assert stoprule.transfer_rate([RoundFacts(10, 0, 0.1, 0.0, 0.0)]) is None
    assert stoprule.decide(LIMITS, [RoundFacts(10, 0, 0.1, 0.0, 0.0)], 1) is None


def test_rate_counts_pages_moved_not_compressed_bytes() -> None:
    # 256 MiB of pages in 2 s, sent as 1 MiB compressed: the link moves 128 MiB/s of pages.
    assert stoprule.transfer_rate([RoundFacts(65536, MIB, 1, 0, 2)]) == 128 * MIB
