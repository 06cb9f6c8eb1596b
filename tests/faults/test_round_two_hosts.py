"""Never lose a workload, round two (issue 13): hosts and processes fail under the migration.
Each fault is held at the phase it needs by a gate (a health check that waits for a file: the
run waits at `verify`), a cut link (the transfer cannot end) or a stopped process, and injected
when the journal shows that phase begin: never a sleep race.

- the SOURCE host crashes before the freeze, during the transfer, and at verify;
- CRIU's dump hangs (SIGSTOPped) past the policy's command timeout;
- the controller is SIGKILLed at transfer begin with a container (LXC, runc, Podman), then
  `migrate recover`;
- post-copy after the point of no return: the lazy-pages daemon killed, or the link cut, while
  the destination pulls its pages: stranded, with the source copy kept frozen;
- one workload moved a -> b -> a -> b ... ten times in a row.

What "exactly one copy" means when the source host crashes: a crash takes every process of
that host with it, the workload's frozen or running source copy included; that loss is the
crash's, not the tool's. Before the destination has restored, the workload dies with its host:
the tool must then leave no copy (not even a half-restored one) on the destination, and no copy
may appear later (e.g. when `recover` or a revived host runs). Once the destination has
restored it, that copy is the workload: it must survive the crash, and be confirmed (the run,
or `recover`, ends `succeeded` with it, counting on from the dump's state).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from orchestrator import lab as labmod
from tests.faults.kit import (
    FaultCase,
    assert_one_copy,
    fault_config,
    leftovers,
    run_migrate,
)  # fmt: skip

pytestmark = pytest.mark.lab


@pytest.fixture
def gate(lab: labmod.Lab) -> Iterator[Path]:
    """A file whose appearance lets a gated health check pass (made at the end in any case)."""
    path = lab.dir / "workloads" / "gate-hosts"
    path.parent.mkdir(exist_ok=True)
    path.unlink(missing_ok=True)
    yield path
    path.touch()


def gated(fc: FaultCase, gate: Path, tmp: Path, policy: dict[str, object] | None = None) -> Path:
    """fc's config with a workload `gated` (fc's counter, by pidfile) whose health check waits
    at verify until gate exists; the same state_dir as fc's own config."""
    health = f'while [ ! -e "{gate}" ]; do sleep 0.05; done'
    return fault_config(fc.lab, tmp / "gated.yaml", state_dir=fc.state,
                        policy={"command_timeout": 120, **(policy or {})},
                        workloads={"gated": {"pidfile": f"{fc.wl.count_file}.pid",
                                             "health": health}})  # fmt: skip


# -- 1. the source host crashes ------------------------------------------------------------------

SOURCE_CRASH = ["prepare", "transfer", "verify"]


@pytest.mark.parametrize("phase", SOURCE_CRASH)
def test_source_host_crashes(
    lab: labmod.Lab,
    fault_case: Callable[..., FaultCase],
    crash: Callable[..., None],
    links: Callable[..., None],
    gate: Path,
    tmp_path: Path,
    phase: str,
) -> None:
    """prepare: nothing dumped yet, the workload dies with host-a: no copy anywhere, ever (the
    run fails, `recover` says lost, and no copy appears on host-b). transfer: the dump is done
    and its images are on host-a's disk, which outlives the crash; host-b has none (the link is
    cut): the run fails with the journal open and, once host-a is back, `recover` restores the
    source from its images: one copy, on host-a, with the dump's state. verify: host-b runs the
    restored copy; it must outlive the crash and be confirmed (by the run or by `recover`)."""
    held = {"prepare": "", "transfer": " (link a-b cut)", "verify": " (held by a gate)"}[phase]
    fc = fault_case(f"src host-a crashes at {phase} begin{held}", f"fault-srccrash-{phase}")
    wl = fc.wl
    cfg = gated(fc, gate, tmp_path)
    run = fc.start("run", "gated", "host-a", "host-b", "--json", config=cfg, state_dir=fc.state)
    if phase == "transfer":  # the images cannot reach host-b: the run stays in transfer
        run.wait("dump")
        links("host-a", "host-b", "drop")
    run.wait(phase)
    dumped = wl.count()  # from transfer on, the source is frozen: the count its images hold
    crash("host-a")
    gate.touch()  # at verify: the health check on host-b passes now
    try:
        out = run.finish(timeout=90)
    finally:
        if phase == "transfer":
            labmod.mend_link(lab, "host-a", "host-b")
        labmod.revive_host(lab, "host-a")
    c = fc.ended(out)
    assert "host-a" in out.error, out.error

    if phase == "verify":  # the destination's copy is the workload now: it must live on
        assert c.where() == {"host-b": [out.report["restored_pid"]]}, f"{out}\n{c}"  # type: ignore[index]
        assert out.rc == 1 and out.status == "failed", out  # not confirmed: host-a is gone
        assert any(n.startswith("NOT CONFIRMED") for n in out.notes), out.notes
    else:  # failed, the journal left open for recover: host-a could not be asked
        assert out.rc == 1 and out.status == "failed", out
        assert c.copies == 0, f"no copy may run or wait anywhere: {c}"
    assert f"migrate recover {out.id}" in " ".join(out.notes), out.notes

    rec = run_migrate("recover", out.id, "--json", config=cfg)
    fc.case.outcome += f"; recover: {rec.status} (exit {rec.rc})"
    if phase == "prepare":  # nothing was dumped: lost with its host, and said so
        assert rec.rc == 1 and rec.status == "failed", rec
        assert "no copy runs" in " ".join(rec.notes), rec.notes
        assert fc.count().copies == 0
    elif phase == "transfer":  # restored on host-a from the images on its disk
        assert rec.rc == 3 and rec.status == "rolled_back", rec
        c = assert_one_copy(lab, wl, "host-a", dumped)
        fc.case.counted(c)
    else:  # confirmed where it runs
        assert rec.rc == 0 and rec.status == "succeeded", rec
        c = assert_one_copy(lab, wl, "host-b", dumped)
        fc.case.counted(c)
    # What the crash left that recover could not know of (the dead ssh master's control
    # socket, the lock file) is garbage to `migrate gc`.
    gc = run_migrate("gc", "--apply", config=cfg)
    assert gc.rc == 0, gc
    assert leftovers(lab, out.id) == []
    rows = json.loads(run_migrate("gc", "--json", config=cfg).stdout)["leftovers"]
    assert [r for r in rows if r["garbage"]] == [], rows
