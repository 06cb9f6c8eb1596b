"""Pre-copy for real: this machine's kernel has no soft-dirty tracking, so a qemu VM with
Debian 12's stock kernel (which has it) boots this machine's / and runs
tests/vm/guest_precopy.py there: a two-host lab, a 256 MiB writer, precopy then stop-copy."""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.lab import vm

REPO = Path(__file__).resolve().parents[2]
GUEST_TEST = "tests/vm/guest_precopy.py"


@pytest.fixture
def machine(tmp_path: Path) -> Iterator[vm.Machine]:
    """A VM with 3 GiB (the writer, and its images on both lab hosts, live in its RAM), torn
    down (qemu killed by its pid) in the finalizer whatever happened."""
    reason = vm.missing()
    if reason:
        pytest.skip(f"no soft-dirty VM here: {reason}")
    m = vm.Machine(memory="3G", keep=tmp_path / "vm-out", share=REPO)  # (a clone under /tmp)
    try:
        yield m
    finally:
        m.close()


def test_precopy_in_a_soft_dirty_vm(
    machine: vm.Machine, record_property: pytest.RecordProperty
) -> None:
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-x", "-rA",
            GUEST_TEST]  # fmt: skip
    script = f"cd {shlex.quote(str(REPO))}\n{shlex.join(argv)}\n"
    env = {"PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    r = machine.run(script, timeout=1200, env=env)
    assert machine.keep is not None
    assert r.exit_code == 0, f"guest test failed (exit {r.exit_code}):\n{r.output[-4000:]}"
    assert "2 passed" in r.output, r.output[-2000:]  # #14: and hybrid with attackers
    result = json.loads((machine.keep / "result.json").read_text())
    pre, stop, hyb = result["precopy"], result["stopcopy"], result["hybrid"]
    rounds = pre["rounds"]
    assert sum(x["kind"] == "pre-dump" for x in rounds) >= 2
    assert rounds[-1]["pages_written"] * 4 < rounds[0]["pages_written"]
    assert pre["downtime_ms"] < stop["downtime_ms"]
    assert hyb["postcopy_tail_ms"] is not None and hyb["downtime_ms"] < stop["downtime_ms"]
    table = ", ".join(f"{x['kind']} {x['pages_written']}p {x['seconds']:.1f}s" for x in rounds)
    print(json.dumps(result, indent=1))  # the whole of it, with -rA
    record_property(
        "measured",
        f"VM {r.seconds:.0f}s; precopy freeze {pre['downtime_ms']} ms (stopped by "
        f"{pre['stopped_by']}; {table}) vs stopcopy freeze {stop['downtime_ms']} ms; hybrid "
        f"freeze {hyb['downtime_ms']} ms, post-copy tail {hyb['postcopy_tail_ms']} ms",
    )
