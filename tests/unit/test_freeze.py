"""The freeze breakdown's pure parts: which command's stamps bound a step."""

from __future__ import annotations

from orchestrator import freeze
from orchestrator.transport.ssh import Result


def _r(started: float | None, ended: float | None) -> Result:
    return Result("h", ["x"], 0, started=started, ended=ended)


def test_a_step_spans_its_commands() -> None:
    ran = [_r(10.0, 10.5), _r(10.6, 12.0), _r(12.1, 12.2)]  # e.g. restore, then ARP announce
    assert freeze.span(ran) == (10.0, 12.2)
    assert freeze.span(ran, to_longest=True) == (10.0, 12.0)
    assert freeze.longest(ran) is ran[1]


def test_without_stamps_there_is_no_span() -> None:
    assert freeze.span([_r(None, None)]) == (None, None)
    assert freeze.longest([]) is None
