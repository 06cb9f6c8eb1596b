"""Fixtures of the fault-injection suite: a record of each case (one JSON line per test in the file
named by $MIGRATE_FAULT_RESULTS, for scripts/fault-suite), background migrations, and faults
that are always repaired (hosts revived, links mended), even when a test fails."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator import lab as labmod
from tests.faults.kit import (
    Background,
    Case,
    FaultCase,
    block_ssh,
    fault_config,
    start_big,
    unblock_ssh,
)
from tests.labkit import COUNTER, Workload, on, start, start_net_container, wait_for

RESULTS_ENV = "MIGRATE_FAULT_RESULTS"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture(autouse=True)
def case(request: pytest.FixtureRequest) -> Iterator[Case]:
    """Set first, torn down last: one line per test, whatever happened in it."""
    c = Case(fault=request.node.name)
    t0 = time.monotonic()
    yield c
    path = os.environ.get(RESULTS_ENV)
    if not path:
        return
    setup = getattr(request.node, "rep_setup", None)
    call = getattr(request.node, "rep_call", None)
    rep = call if call is not None else setup
    if rep is None:
        result, why = "error", ""
    elif rep.skipped:
        result, why = "skipped", str(rep.longrepr[-1]) if isinstance(rep.longrepr, tuple) else ""
    elif rep.failed:
        result = "FAILED" if rep is call else "ERROR"
        crash = getattr(rep.longrepr, "reprcrash", None)
        why = (crash.message if crash else str(rep.longrepr)).strip().splitlines()
        why = why[0] if why else ""
    else:
        result, why = "passed", ""
    line = {
        "test": request.node.nodeid,
        "fault": c.fault,
        "strategy": c.strategy,
        "runtime": c.runtime,
        "outcome": c.outcome,
        "copies": c.copies,
        "seconds": round(time.monotonic() - t0, 1),
        "result": result,
        "why": why[:300],
        "error": c.error,
        "notes": list(c.notes),
    }
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")


@pytest.fixture(autouse=True)
def scrub(lab: labmod.Lab) -> Iterator[None]:
    """Whatever a case leaves in any host's workdir/images (a failed case, or a controller the
    test had to kill, may leave image dirs) is removed after it, so that no case inherits the
    last one's mess. Cases assert on leftovers themselves before this runs."""

    def entries() -> dict[Path, set[str]]:
        out = {}
        for h in lab.hosts:
            d = h.workdir / "images"
            out[d] = set(os.listdir(d)) if d.is_dir() else set()
        return out

    before = entries()
    yield
    for d, names in entries().items():
        for name in sorted(names - before.get(d, set())):
            path = d / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


@pytest.fixture
def background(lab: labmod.Lab, cleanup: list[Path]) -> Iterator[Callable[..., Background]]:
    """Start `migrate` runs in the background; any still running at the end is killed (by pid)."""
    runs: list[Background] = []

    def start(*args: str, config: Path, state_dir: Path) -> Background:
        run = Background(*args, config=config, state_dir=state_dir)
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.stop()


@pytest.fixture
def crash(lab: labmod.Lab, cleanup: list[Path]) -> Iterator[Callable[..., None]]:
    """crash(host, silent=False) kills a lab host; every host killed is revived at the end
    (before `cleanup`, which needs the hosts up), so the session's lab is whole again."""
    killed: list[str] = []

    def kill(host: str, silent: bool = False) -> None:
        killed.append(host)
        labmod.kill_host(lab, host, silent=silent)

    yield kill
    for host in killed:
        labmod.revive_host(lab, host)


@pytest.fixture
def links(lab: labmod.Lab) -> Iterator[Callable[..., None]]:
    """links(a, b, mode) cuts the link between two lab hosts; all are mended at the end."""
    cut: list[tuple[str, str]] = []

    def cut_link(a: str, b: str, mode: str = "drop") -> None:
        cut.append((a, b))
        labmod.cut_link(lab, a, b, mode)

    yield cut_link
    for a, b in cut:
        labmod.mend_link(lab, a, b)


@pytest.fixture
def fault_case(
    lab: labmod.Lab,
    cleanup: list[Path],
    case: Case,
    tmp_path: Path,
    background: Callable[..., Background],
) -> Callable[..., FaultCase]:
    """fault_case(fault, workload, mib=None, policy=None, hosts=None, strategy="auto"): the
    setup fault cases
    share. Names the case's fault for the table, starts the counter `workload` on host-a (with
    `mib`: a python3 holding that much touched memory) and kills every copy of it at the end,
    writes a config with the short policy (plus `policy`, `hosts` changes) and its own
    state_dir under tmp_path, and takes the count before the fault."""

    def prepare(
        fault: str,
        workload: str,
        *,
        mib: int | None = None,
        policy: dict[str, Any] | None = None,
        hosts: dict[str, dict[str, Any]] | None = None,
        strategy: str = "auto",
    ) -> FaultCase:
        case.fault = fault
        if mib:
            wl = start_big(lab, "host-a", workload, mib=mib)
        else:
            wl = start(lab, "host-a", workload, container=False)
        cleanup.append(wl.count_file)
        state = tmp_path / "state"
        config = fault_config(
            lab, tmp_path / "migrate.yaml", state_dir=state, policy=policy, hosts=hosts
        )
        return FaultCase(lab, case, wl, state, config, wl.count(), background, strategy)

    return prepare


@pytest.fixture
def gate(lab: labmod.Lab) -> Iterator[Path]:
    """A file whose appearance lets a gated command (a health check, a held criu) go on;
    opened at the end in any case, so nothing stays held."""
    path = lab.dir / "workloads" / f"gate-{os.getpid()}"
    path.parent.mkdir(exist_ok=True)
    for f in (path, Path(f"{path}.held")):
        f.unlink(missing_ok=True)
    yield path
    path.touch()


@pytest.fixture
def mounts() -> Iterator[Callable[..., None]]:
    """mounts(argv...) runs a `mount` on the controller's side (the suite's own mount
    namespace); every mount point made is unmounted at the end, newest first."""
    made: list[str] = []

    def mount(*argv: str) -> None:
        subprocess.run(["mount", *argv], check=True)
        made.append(argv[-1])

    yield mount
    for point in reversed(made):
        subprocess.run(["umount", "-l", point], check=False)


@pytest.fixture
def ssh_blocks(lab: labmod.Lab) -> Iterator[Callable[[str], None]]:
    """ssh_blocks(host) drops all ssh to host (kit.block_ssh); every block is lifted at the
    end."""
    blocked: list[str] = []

    def block(host: str) -> None:
        blocked.append(host)
        block_ssh(lab, host)

    yield block
    for host in blocked:
        unblock_ssh(lab, host)


@pytest.fixture
def net_counter(lab: labmod.Lab, cleanup: list[Path]) -> Iterator[Callable[..., Workload]]:
    """net_counter(name, address, mac, veth): the counter as init of a container with its own
    network (veth, address) on host-a; every copy killed and its veth gone at the end."""
    made: list[tuple[Path, str]] = []

    def start(name: str, address: str, mac: str, veth: str) -> Workload:
        work = lab.dir / "workloads"
        work.mkdir(exist_ok=True)
        script, count = work / "counter.sh", work / f"counter-{name}"
        script.write_text(COUNTER)
        cleanup.append(count)
        made.append((count, veth))
        pid = start_net_container(lab, "host-a", f"{address}/24", mac, veth, "sh", str(script),
                                  str(count))  # fmt: skip
        wl = Workload(name, count, f"pid:{pid}", pid)
        wait_for(lambda: wl.count() >= 20, what="the counter to reach 20")
        return wl

    yield start
    for count, veth in made:
        for host in lab.names:  # its namespace, and veth, go asynchronously after the kill
            pids = [int(p) for p in on(lab, host, 'pgrep -f -- "$1" || true', str(count)).split()]
            if pids:
                on(lab, host, 'kill -KILL "$@"', *map(str, pids), check=False)
        for host in lab.names:
            wait_for(lambda h=host, v=veth: not on(lab, h, f"ip link show {v}", check=False),
                     what=veth)  # fmt: skip
