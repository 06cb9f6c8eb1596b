"""Fault: the workload exits by itself while the migration prepares to move it. The report says
so, and nothing is left behind: no image dirs, no processes, no copies anywhere."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator import lab as labmod
from tests.faults.kit import Background, Case, census, fault_config, leftovers
from tests.labkit import counter_pids, on, start

pytestmark = pytest.mark.lab


@pytest.mark.parametrize("phase", ["preflight", "prepare"])
def test_workload_exits_before_the_freeze(
    lab: labmod.Lab,
    cleanup: list[Path],
    case: Case,
    tmp_path: Path,
    background: Callable[..., Background],
    phase: str,
) -> None:
    case.fault = f"workload exits at {phase} begin"
    wl = start(lab, "host-a", f"fault-exit-{phase}", container=False)
    cleanup.append(wl.count_file)
    state = tmp_path / "state"
    cfg = fault_config(lab, tmp_path / "migrate.yaml", state_dir=state)

    run = background("run", wl.spec, "host-a", "host-b", "--json", config=cfg, state_dir=state)
    run.wait(phase, "begin")
    pids = counter_pids(lab, "host-a", wl.count_file)
    on(lab, "host-a", 'kill -KILL "$@"', *map(str, pids))
    out = run.finish()
    c = census(lab, wl.count_file)
    case.ended(out)
    case.counted(c)

    assert out.rc == 1, out
    assert out.status == "failed"
    assert c.copies == 0, f"the workload exited: no copy may appear anywhere: {c}"
    assert leftovers(lab, out.id) == []
    assert "exited" in out.error, out.error
