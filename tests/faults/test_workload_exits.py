"""Fault: the workload exits by itself while the migration prepares to move it. The report says
so, and nothing is left behind: no image dirs, no processes, no copies anywhere."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from orchestrator import lab as labmod
from tests.faults.kit import FaultCase, leftovers
from tests.labkit import counter_pids, on

pytestmark = pytest.mark.lab


@pytest.mark.parametrize("phase", ["preflight", "prepare"])
def test_workload_exits_before_the_freeze(
    lab: labmod.Lab, fault_case: Callable[..., FaultCase], phase: str
) -> None:
    fc = fault_case(f"workload exits at {phase} begin", f"fault-exit-{phase}")
    wl = fc.wl

    run = fc.background("host-b")
    run.wait(phase, "begin")
    pids = counter_pids(lab, "host-a", wl.count_file)
    on(lab, "host-a", 'kill -KILL "$@"', *map(str, pids))
    out = run.finish()
    c = fc.ended(out)

    assert out.rc == 1, out
    assert out.status == "failed"
    assert c.copies == 0, f"the workload exited: no copy may appear anywhere: {c}"
    assert leftovers(lab, out.id) == []
    assert "exited" in out.error, out.error
