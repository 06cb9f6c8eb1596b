"""`migrate run --temporal` on the real lab through a real engine; an unreachable engine."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from orchestrator import lab as labmod
from tests.faults.kit import assert_one_copy, census, image_dirs
from tests.fleet.conftest import Engine, cli, fleet_config, free_port, terminate
from tests.labkit import migrate, start, wait_for

pytestmark = pytest.mark.lab


def test_unreachable_engine_is_exit_2_and_touches_nothing(
    lab: labmod.Lab, cleanup: list[Path], tmp_path: Path
) -> None:
    wl = start(lab, "host-a", "fleet-unreachable", container=False)
    cleanup.append(wl.count_file)
    state = tmp_path / "state"
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    cfg = fleet_config(lab, tmp_path / "m.yaml", engine=None, state_dir=state, address=address,
                       workloads={"counter": {"pidfile": f"{wl.count_file}.pid",
                                              "host": "host-a"}})  # fmt: skip
    before = {h: image_dirs(lab, h) for h in lab.names}
    for args in (("run", "counter", "host-a", "host-b", "--json", "--temporal"),
                 ("evacuate", "host-a", "--temporal", address),
                 ("schedule", "list", "--temporal"),
                 ("worker", "--temporal")):  # fmt: skip
        r = migrate(*args, config=cfg, timeout=60)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and address in lines[0], r.stderr
        assert r.stdout == ""
    assert not (state / "journal").exists()  # no migration began
    assert {h: image_dirs(lab, h) for h in lab.names} == before
    c = census(lab, wl.count_file)
    assert c.where() == {"host-a": [wl.root_pid]} and not any(c.stopped.values()), c
    # A bad address in the config: one line naming the key, exit 2.
    bad = fleet_config(lab, tmp_path / "bad.yaml", engine=None, state_dir=state,
                       address="no-port")  # fmt: skip
    r = migrate("evacuate", "host-a", "--temporal", config=bad)
    assert r.returncode == 2 and "temporal.address" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_run_through_the_engine(
    lab: labmod.Lab, cleanup: list[Path], tmp_path: Path, engine: Engine, workers
) -> None:
    wl = start(lab, "host-a", "fleet-run", container=True)
    cleanup.append(wl.count_file)
    # The first run is held at verify (its health check waits for the gate) while a second
    # controller asks for the same workload: the engine must refuse it while the first runs.
    gate = tmp_path / "gate"
    gated = {"gated": {"pid": wl.root_pid,
                       "health": f'while [ ! -e "{gate}" ]; do sleep 0.05; done'}}  # fmt: skip
    cfg = fleet_config(lab, tmp_path / "m.yaml", engine=engine, state_dir=tmp_path / "state",
                       task_queue="run", workloads=gated)  # fmt: skip
    workers(cfg)
    before = wl.count()
    first = subprocess.Popen(
        cli("run", "gated", "host-a", "host-b", "--strategy", "stopcopy", "--json",
            "--temporal", "--config", str(cfg)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        jdir = tmp_path / "state" / "journal"
        wait_for(lambda: any('"verify"' in p.read_text() for p in jdir.glob("*.jsonl")),
                 timeout=60, what="the first run to be held at verify")  # fmt: skip
        # A second run of the same workload, from another controller: refused by the engine.
        other = fleet_config(lab, tmp_path / "other.yaml", engine=engine,
                             state_dir=tmp_path / "other", task_queue="run",
                             workloads=gated)  # fmt: skip
        second = migrate("run", "gated", "host-a", "host-c", "--json", "--temporal",
                         config=other)  # fmt: skip
        gate.touch()
        out, err = first.communicate(timeout=180)
    finally:
        gate.touch()
        if first.poll() is None:
            first.kill()
            first.wait()
    assert second.returncode == 1 and second.stdout == "", second.stdout + second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    assert "refused by the engine: migrate/gated" in second.stderr, second.stderr
    assert not (tmp_path / "other").exists()  # nothing began there
    assert first.returncode == 0, out + err
    report = json.loads(out)
    assert report["status"] == "succeeded" and report["destination"] == "host-b"
    names = [p["name"] for p in report["phases"]]
    assert names[:2] == ["preflight", "prepare"] and "dump" in names and "restore" in names
    assert report["downtime_ms"] and report["bytes_transferred"] > 0
    assert_one_copy(lab, wl, "host-b", before)
    # No worker on a task queue: said at once (the workflow waits for one; Ctrl-C leaves it).
    lonely = subprocess.Popen(
        cli("run", wl.spec, "host-b", "host-a", "--dry-run", "--json", "--temporal",
            "--task-queue", "nobody", "--config", str(cfg)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert lonely.stderr is not None
        line = lonely.stderr.readline()
        assert "no worker polls task queue nobody" in line, line
    finally:
        lonely.kill()
        lonely.wait()
        terminate(engine.address, f"migrate/{wl.spec.replace(':', '-')}/dry-run")
    # A survey refused (a name the worker's config lacks): one line, exit 2, as locally.
    r = migrate("evacuate", "host-a", "--only", "nosuch", "--temporal", config=cfg)
    assert r.returncode == 2 and "--only nosuch: no such workload" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    # The same journal as local mode: `history` on the worker's controller shows it.
    hist = json.loads(migrate("history", "--json", config=cfg).stdout)
    assert [h["status"] for h in hist if h["id"] == report["id"]] == ["succeeded"]
