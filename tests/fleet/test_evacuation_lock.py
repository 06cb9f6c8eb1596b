"""A local `migrate evacuate` and a fleet one (`--temporal`) of the same host exclude each other:
each holds the source's evacuation lock for its whole length (fleet: the workflow's hold
activity), so the other, started while the first is held at verify, is refused at once in one
line naming the first and begins nothing; the first finishes untouched and frees the lock."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator import lab as labmod
from tests.faults.test_evacuate_shared import (
    assert_free_to_evacuate,
    at,
    clean_host_b,
    held_at_verify,
    journals,
)
from tests.fleet.conftest import Engine, cli, fleet_config
from tests.integration.test_evacuate import Holder, evac_config, start_holders
from tests.labkit import migrate, running_pids, wait_for

pytestmark = pytest.mark.lab


def gated(workloads: dict[str, Any], gate: Path) -> dict[str, Any]:
    """The workloads, each held at verify until the gate exists (its health check waits)."""
    health = f'while [ ! -e "{gate}" ]; do sleep 0.05; done'
    return {name: {**wl, "health": health} for name, wl in workloads.items()}


def one_error(r: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1 and len(lines) == 1, r.stdout + r.stderr
    return lines[0]


def test_a_local_evacuation_refuses_a_fleet_one(
    lab: labmod.Lab, cleanup: list[Path], tmp_path: Path, engine: Engine, workers
) -> None:
    holders, cfg, proc, held = held_at_verify(lab, cleanup, tmp_path, "lockloc")
    try:
        wls = yaml.safe_load(cfg.read_text())["workloads"]
        fleet = fleet_config(lab, tmp_path / "fleet.yaml", engine=engine,
                             state_dir=tmp_path / "fleet", task_queue="evaclock-a",
                             workloads=wls)  # fmt: skip
        workers(fleet)
        r = migrate("evacuate", "host-a", "--to", "host-b", "--temporal", config=fleet,
                    timeout=120)  # fmt: skip
    finally:
        (tmp_path / "gate").touch()
    out, err = proc.communicate(timeout=180)
    error = one_error(r)
    assert error.startswith("migrate: error: host-a is being evacuated already (evacuation by"), (
        error
    )
    assert f"pid {proc.pid}" in error, error
    assert journals(tmp_path / "fleet") == {}, "the fleet evacuation began a migration"
    assert proc.returncode == 0, out + err
    assert [w["status"] for w in json.loads(out)["workloads"]] == ["succeeded"] * 3, out
    assert sorted(journals(tmp_path / "state")) == sorted(held)
    clean_host_b(lab, holders)


def test_a_fleet_evacuation_refuses_a_local_one(
    lab: labmod.Lab, cleanup: list[Path], tmp_path: Path, engine: Engine, workers
) -> None:
    holders = start_holders(lab, cleanup, "lockfleet", 2)
    gate = tmp_path / "gate"
    local = evac_config(lab, tmp_path / "local.yaml", holders)
    config = yaml.safe_load(local.read_text())
    wls = gated(config["workloads"], gate)
    config["state_dir"] = str(tmp_path / "local")
    local.write_text(yaml.safe_dump(config))
    fleet = fleet_config(lab, tmp_path / "fleet.yaml", engine=engine,
                         state_dir=tmp_path / "fleet", task_queue="evaclock-b",
                         workloads=wls)  # fmt: skip
    workers(fleet)
    proc = subprocess.Popen(cli("evacuate", "host-a", "--to", "host-b", "--parallel", "2",
                                "--json", "--temporal", "--config", str(fleet)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_for(lambda: len(j := journals(tmp_path / "fleet")) == 2
                 and all(at(ev, "verify") for ev in j.values()),
                 timeout=120, what="the fleet's two migrations at verify")  # fmt: skip
        r = migrate("evacuate", "host-a", "--to", "host-b", config=local, timeout=120)
    finally:
        gate.touch()
        out, err = proc.communicate(timeout=180)
    error = one_error(r)
    assert error.startswith(
        "migrate: error: host-a is being evacuated already (fleet evacuation evacuate/host-a "
        "by worker "
    ), error
    assert not (tmp_path / "local" / "journal").exists(), "the local evacuation began something"
    assert proc.returncode == 0, out + err
    assert [w["status"] for w in json.loads(out)["workloads"]] == ["succeeded"] * 2, out
    # The hold ended with the fleet evacuation: host-a can be evacuated again (nothing left).
    empty = tmp_path / "empty.yaml"
    empty.write_text(yaml.safe_dump({**config, "workloads": {}}))
    assert_free_to_evacuate(empty)
    for h in holders:
        assert running_pids(lab, "host-b", h.count_file), h.name
    clean_host_b(lab, holders)


def test_two_evacuations_on_one_small_worker_both_finish(
    lab: labmod.Lab, cleanup: list[Path], tmp_path: Path, engine: Engine, workers
) -> None:
    """One worker with two slots (`--max-migrations 1`: a migration and a survey) runs two
    evacuations at once: their holds, which last as long as the evacuations, take none of those
    slots (else they would fill both, and neither evacuation could survey: stalled for good)."""
    holders = {h: Holder(lab, h, f"lockpair-{h}", mib=8) for h in ("host-a", "host-c")}
    cleanup.extend(h.count_file for h in holders.values())
    wls = {h.name: {"pid": h.pid, "host": host} for host, h in holders.items()}
    fleet = fleet_config(lab, tmp_path / "fleet.yaml", engine=engine,
                         state_dir=tmp_path / "fleet", task_queue="evaclock-c",
                         workloads=wls)  # fmt: skip
    workers(fleet, "--max-migrations", "1")
    procs = [subprocess.Popen(cli("evacuate", host, "--to", "host-b", "--json", "--temporal",
                                  "--config", str(fleet)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for host in holders]  # fmt: skip
    try:
        outs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], outs
    for out, _err in outs:
        assert [w["status"] for w in json.loads(out)["workloads"]] == ["succeeded"], out
    clean_host_b(lab, list(holders.values()))


def test_the_hold_moves_to_another_worker_when_its_worker_dies(
    lab: labmod.Lab, cleanup: list[Path], tmp_path: Path, engine: Engine, workers
) -> None:
    """The worker holding an evacuation's lock is SIGKILLed while the evacuation is held at
    verify: its connection, and so the lock, go with it; after the heartbeat timeout the other
    worker takes the lock back (not refused by the dead hold's name on it), so a local
    evacuation is still refused, naming that worker; the evacuation ends and frees it."""
    gate = tmp_path / "gate"
    h = Holder(lab, "host-a", "lockkill", mib=8)
    cleanup.append(h.count_file)
    wls = gated({h.name: {"pid": h.pid, "host": "host-a"}}, gate)
    fleet = fleet_config(lab, tmp_path / "fleet.yaml", engine=engine,
                         state_dir=tmp_path / "fleet", task_queue="evaclock-d",
                         workloads=wls)  # fmt: skip
    pool = {w.pid: w for w in (workers(fleet), workers(fleet))}
    empty = tmp_path / "empty.yaml"
    empty.write_text(yaml.safe_dump({**yaml.safe_load(fleet.read_text()), "workloads": {},
                                     "state_dir": str(tmp_path / "local")}))  # fmt: skip
    lockfile = lab.host("host-a").workdir / "locks" / "evacuate.lock"

    def holder_pid() -> int | None:
        m = re.search(r"by worker \S+:(\d+) ", lockfile.read_text() if lockfile.exists() else "")
        return int(m.group(1)) if m else None

    proc = subprocess.Popen(cli("evacuate", "host-a", "--to", "host-b", "--json", "--temporal",
                                "--config", str(fleet)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_for(lambda: (j := journals(tmp_path / "fleet")) and all(at(ev, "verify")
                                                                    for ev in j.values()),
                 timeout=120, what="the migration at verify")  # fmt: skip
        dead = holder_pid()
        assert dead in pool, (lockfile.read_text(), sorted(pool))
        pool[dead].proc.kill()
        pool[dead].proc.wait()
        (alive,) = [pid for pid in pool if pid != dead]
        wait_for(lambda: holder_pid() == alive, timeout=60, what="the other worker to hold it")
        r = migrate("evacuate", "host-a", "--to", "host-b", config=empty, timeout=120)
    finally:
        gate.touch()
        out, err = proc.communicate(timeout=180)
    error = one_error(r)
    assert "being evacuated already (fleet evacuation evacuate/host-a by worker" in error, error
    assert f":{alive} since" in error, error
    assert proc.returncode == 0, out + err
    assert [w["status"] for w in json.loads(out)["workloads"]] == ["succeeded"], out
    assert_free_to_evacuate(empty)
    wait_for(lambda: len(running_pids(lab, "host-b", h.count_file)) == 1, what="one copy")
    clean_host_b(lab, [h])
