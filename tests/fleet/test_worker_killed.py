"""A worker SIGKILLed mid-migration (at dump, transfer, restore): after the heartbeat timeout
the other worker, on another controller (its own state dir: the dead worker's journal is not
there), settles the migration from the journal carried in the heartbeat: it finishes or rolls
back. Exactly one running copy at the end, with its state; nothing left behind; no human."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from orchestrator import lab as labmod
from tests.faults.kit import assert_one_copy, census, leftovers
from tests.fleet.conftest import Engine, cli, fleet_config
from tests.labkit import start

pytestmark = pytest.mark.lab

EXPECTED = {"dump": "rolled_back", "transfer": None, "restore": None}
#: Cases: the phase at which the worker dies, and whether its heartbeats carry the journal
#: (without: the retry has only the journal the attempt anchored in the workflow before it
#: changed anything, as when the last heartbeats are lost with the worker).
CASES = [("dump", True), ("transfer", True), ("restore", True), ("transfer", False)]


def begun(state_dir: Path, phase: str) -> Path | None:
    """The journal in state_dir whose migration has begun `phase`, if any."""
    for path in (state_dir / "journal").glob("*.jsonl"):
        for line in path.read_text().splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if e.get("event") == "phase" and e.get("name") == phase and e.get("state") == "begin":
                return path
    return None


@pytest.mark.parametrize(
    "phase, beat_journal", CASES, ids=[p + ("" if j else "-anchor-only") for p, j in CASES]
)
def test_worker_killed_another_settles(
    lab: labmod.Lab,
    cleanup: list[Path],
    tmp_path: Path,
    engine: Engine,
    workers,
    phase: str,
    beat_journal: bool,
    record_property,
) -> None:
    wl = start(lab, "host-a", f"fleet-kill-{phase}-{beat_journal}", container=True)
    cleanup.append(wl.count_file)
    # Two controllers: the same hosts and engine, each its own state dir (journal).
    dirs = {name: tmp_path / f"controller-{name}" for name in ("a", "b")}
    cfgs = {name: fleet_config(lab, tmp_path / f"{name}.yaml", engine=engine, state_dir=d,
                               task_queue=f"kill-{phase}-{beat_journal}")
            for name, d in dirs.items()}  # fmt: skip
    fault = "" if beat_journal else "lose-heartbeat-journal"
    running = {name: workers(cfg, fault=fault) for name, cfg in cfgs.items()}
    before = wl.count()
    t0 = time.monotonic()
    client = subprocess.Popen(
        cli("run", wl.spec, "host-a", "host-b", "--strategy", "stopcopy", "--json",
            "--temporal", "--config", str(cfgs["a"])),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        victim = path = None
        deadline = time.monotonic() + 60
        while victim is None:
            for name, d in dirs.items():
                path = begun(d, phase)
                if path is not None:
                    victim = name
                    break
            assert client.poll() is None, client.communicate()
            assert time.monotonic() < deadline, f"{phase} never began"
            time.sleep(0.005)
        os.kill(running[victim].pid, signal.SIGKILL)
        killed_at = time.monotonic()
        out, err = client.communicate(timeout=180)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert client.returncode in (0, 3), out + err
    report = json.loads(out)
    survivor = "b" if victim == "a" else "a"
    assert path is not None
    attempt = next((n.rsplit("(", 1)[1].rstrip(")") for n in report["notes"]
                    if n.startswith("run by worker")), "?")  # fmt: skip
    recover_s = next((p["seconds"] for p in report["phases"] if p["name"] == "recover"), None)
    record_property("measured", f"killed at {phase}: {report['status']} by {attempt}, "
                    f"recover {recover_s} s, "
                    f"{time.monotonic() - killed_at:.1f} s after the kill "
                    f"(total {time.monotonic() - t0:.1f} s)")  # fmt: skip
    assert report["id"] == path.stem  # the same migration, settled: not a second one
    assert EXPECTED[phase] in (None, report["status"]), report
    assert any("was cut off" in n and "settled by" in n for n in report["notes"]), json.dumps(
        report, indent=1
    )
    # The survivor had no journal of it: it came with the heartbeat (or the anchor, which ends
    # where the first phase after pre-flight begins); recover closed it.
    theirs = dirs[survivor] / "journal" / path.name
    events = [json.loads(ln) for ln in theirs.read_text().splitlines()]
    assert events[0]["event"] == "start" and events[-1]["event"] == "end"
    phases = [e["name"] for e in events if e["event"] == "phase" and e["state"] == "begin"]
    if not beat_journal:
        assert phases == ["preflight", "prepare"], events
    assert events[-1].get("recovered") and events[-1]["status"] == report["status"]
    host = "host-b" if report["status"] == "succeeded" else "host-a"
    assert_one_copy(lab, wl, host, before)
    assert leftovers(lab, report["id"]) == []
    c = census(lab, wl.count_file)
    assert c.copies == 1, c
