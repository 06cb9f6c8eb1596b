"""`migrate schedule evacuate`: a Temporal Schedule fires (every 2 s here) and runs an
evacuation dry run as `evacuate/host-a`; it is listed, refused twice, and removed."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client

from orchestrator import lab as labmod
from tests.faults.kit import census
from tests.fleet.conftest import Engine, fleet_config
from tests.integration.test_evacuate import Holder
from tests.labkit import migrate

pytestmark = pytest.mark.lab


def result_of(address: str, workflow_id: str) -> dict[str, Any]:
    async def get() -> dict[str, Any]:
        client = await Client.connect(address)
        out: dict[str, Any] = await asyncio.wait_for(
            client.get_workflow_handle(workflow_id).result(), timeout=120
        )
        return out

    return asyncio.run(get())


def test_schedule_fires_a_dry_run_evacuation(
    lab: labmod.Lab, cleanup: list[Path], tmp_path: Path, engine: Engine, workers
) -> None:
    h = Holder(lab, "host-a", "fleet-sched", mib=4)
    cleanup.append(h.count_file)
    cfg = fleet_config(lab, tmp_path / "m.yaml", engine=engine, state_dir=tmp_path / "state",
                       task_queue="schedule",
                       workloads={h.name: {"pid": h.pid, "host": "host-a"}})  # fmt: skip
    workers(cfg)
    r = migrate("schedule", "evacuate", "host-a", "--every", "2s", "--dry-run", "--temporal",
                config=cfg)  # fmt: skip
    assert r.returncode == 0 and "schedule evacuate/host-a" in r.stdout, r.stdout + r.stderr
    try:
        again = migrate("schedule", "evacuate", "host-a", "--cron", "0 2 * * 0", "--temporal",
                        config=cfg)  # fmt: skip
        assert again.returncode == 1 and len(again.stderr.strip().splitlines()) == 1
        assert "exists" in again.stderr
        deadline = time.monotonic() + 60
        while True:
            listed = migrate("schedule", "list", "--json", "--temporal", config=cfg)
            assert listed.returncode == 0, listed.stderr
            (row,) = [s for s in json.loads(listed.stdout) if s["id"] == "evacuate/host-a"]
            if row["recent"]:
                break
            assert time.monotonic() < deadline, "the schedule never fired"
            time.sleep(0.5)
        assert row["spec"] == "every 2s"
        fired = row["recent"][0]["workflow_id"]
        out = result_of(engine.address, fired)
        # The scheduled run evacuated as `evacuate/host-a` (a dry run): placement and commands.
        assert out["source"] == "host-a", out
        assert out["placement"]["assigned"][h.name] in ("host-b", "host-c"), out
        (w,) = out["workloads"]
        assert w["status"] == "succeeded" and any("criu dump" in c for c in w["planned_commands"])
        table = migrate("schedule", "list", "--temporal", config=cfg).stdout
        assert "evacuate/host-a" in table and "every 2s" in table
    finally:
        gone = migrate("schedule", "delete", "evacuate/host-a", "--temporal", config=cfg)
    assert gone.returncode == 0, gone.stderr
    assert "no schedule" in migrate("schedule", "list", "--temporal", config=cfg).stdout
    missing = migrate("schedule", "delete", "evacuate/host-a", "--temporal", config=cfg)
    assert missing.returncode == 1 and "no schedule evacuate/host-a" in missing.stderr
    # A dry run: nothing moved, no journal.
    c = census(lab, h.count_file)
    assert list(c.where()) == ["host-a"] and len(c.where()["host-a"]) == 1, c
    assert not (tmp_path / "state" / "journal").exists()
