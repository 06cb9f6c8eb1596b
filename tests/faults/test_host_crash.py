"""Fault: the destination host dies while CRIU restores the workload on it (its sshd pid 1 is
killed: the whole host, the half-restored copy with it). host-c is the destination, so the
other cases' hosts stay healthy; it is revived afterwards (the fixture does it even on failure).

With the default crash the kernel still closes the host's connections; with `power-loss` its
interface goes down first and the controller only notices by its timeouts."""

from __future__ import annotations

import shutil
from collections.abc import Callable

import pytest

from orchestrator import lab as labmod
from tests.faults.kit import FaultCase, assert_one_copy, leftovers

pytestmark = pytest.mark.lab


@pytest.mark.parametrize("silent", [False, True], ids=["crash", "power-loss"])
def test_destination_dies_during_restore(
    lab: labmod.Lab,
    fault_case: Callable[..., FaultCase],
    crash: Callable[..., None],
    silent: bool,
) -> None:
    fault = "dst host-c " + ("loses power" if silent else "crashes") + " at restore begin"
    policy = {"command_timeout": 10} if silent else {}
    fc = fault_case(fault, f"fault-crash-{int(silent)}", policy=policy)
    wl, before = fc.wl, fc.before

    run = fc.background("host-c")
    run.wait("restore", "begin")
    crash("host-c", silent=silent)
    try:
        # Bounded: a restore timeout, then an unreachable host given up on after the deadline.
        out = run.finish(timeout=60)
    finally:
        labmod.revive_host(lab, "host-c")
        fc.count()
    fc.case.ended(out)
    # host-c's disk outlives the crash: its half-received images are the only thing the
    # controller could not clean (and the report says so). Not left for the next cases.
    if out.id:
        shutil.rmtree(lab.host("host-c").workdir / "images" / out.id, ignore_errors=True)

    # Whatever the exit code: exactly one copy, the source's own, counting on.
    c = assert_one_copy(lab, wl, "host-a", before)
    assert c.where() == {"host-a": [wl.root_pid]}
    assert out.rc == 3, out
    assert out.status == "rolled_back"
    assert "host-c" in out.error, out.error
    assert any("host-c" in n and "check" in n for n in out.notes), out.notes
    assert [x for x in leftovers(lab, out.id) if not x.startswith("host-c: ")] == []
