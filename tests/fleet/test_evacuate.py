"""`migrate evacuate --temporal`: six workloads from host-a over host-b and host-c, run by two
workers in separate processes, and a seventh that fails (rolled back) without stopping them; a
second evacuation of host-a started at the same moment is refused by the engine in one line."""

from __future__ import annotations

import json
import re
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator import lab as labmod
from tests.faults.kit import census
from tests.fleet.conftest import Engine, cli, fleet_config
from tests.integration.test_evacuate import Holder
from tests.labkit import wait_for

pytestmark = pytest.mark.lab


def test_evacuate_six_with_two_workers_and_a_refused_twin(
    lab: labmod.Lab, cleanup: list[Path], tmp_path: Path, engine: Engine, workers,
    record_property,
) -> None:  # fmt: skip
    holders = []
    for i in range(6):
        holders.append(Holder(lab, "host-a", f"fleet-evac-{i}", mib=8))
        cleanup.append(holders[-1].count_file)
    placed = {h.name: {"pid": h.pid, "host": "host-a"} for h in holders}
    # A seventh whose migration fails (its health check fails on the destination, so verify
    # rolls it back): it must stop none of the six.
    sick = Holder(lab, "host-a", "fleet-evac-sick", mib=8)
    cleanup.append(sick.count_file)
    placed[sick.name] = {"pid": sick.pid, "host": "host-a", "health": "false"}
    cfg = fleet_config(lab, tmp_path / "m.yaml", engine=engine, state_dir=tmp_path / "state",
                       task_queue="evacuate", workloads=placed)  # fmt: skip
    # One migration each at a time (surveys run aside): three need both workers.
    workers(cfg, "--max-migrations", "1")
    workers(cfg, "--max-migrations", "1")
    before = {h.name: h.count() for h in holders}

    argv = cli("evacuate", "host-a", "--to", "host-b", "--to", "host-c", "--parallel", "3",
               "--json", "--temporal", "--config", str(cfg))  # fmt: skip
    proms = [tmp_path / f"twin-{i}.prom" for i in range(2)]
    twins = [subprocess.Popen([*argv, "--metrics-file", str(prom)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for prom in proms]  # fmt: skip
    outs = [p.communicate(timeout=240) for p in twins]
    codes = sorted(p.returncode for p in twins)
    assert codes == [1, 3], outs  # refused; the evacuation (one rolled back: exit 3)
    (out, _err), (refused_out, refused_err) = sorted(outs, key=lambda o: 0 if o[0].strip() else 1)
    # The refused one: one line, nothing on stdout, nothing touched.
    assert refused_out == "" and len(refused_err.strip().splitlines()) == 1, refused_err
    assert "refused" in refused_err and "evacuate/host-a" in refused_err

    result = json.loads(out)
    reports = {w["workload"]: w for w in result["workloads"]}
    assert result["status"] == "failed"
    assert reports.pop(sick.name)["status"] == "rolled_back", out
    c = census(lab, sick.count_file)
    assert list(c.where()) == ["host-a"] and c.copies == 1, c
    assert sorted(reports) == sorted(h.name for h in holders), out
    assert all(w["status"] == "succeeded" for w in reports.values()), out
    assert len({w["id"] for w in reports.values()}) == 6
    assert sorted(result["placement"]["assigned"]) == sorted([*reports, sick.name])
    assert set(result["placement"]["assigned"].values()) == {"host-b", "host-c"}
    by_worker = Counter(
        m.group(1) for w in reports.values() for n in w["notes"]
        if (m := re.match(r"run by worker (\S+)", n))
    )  # fmt: skip
    assert len(by_worker) == 2 and sum(by_worker.values()) == 6, by_worker
    # Each moved once: one journal each, one copy each, on its destination, counting on.
    journals = list((tmp_path / "state" / "journal").glob("*.jsonl"))
    assert len(journals) == 7
    for h in holders:
        dest = reports[h.name]["destination"]
        wait_for(lambda h=h: census(lab, h.count_file).copies == 1, what=f"{h.name}: one copy")
        c = census(lab, h.count_file)
        assert c.where() == {dest: [reports[h.name]["restored_pid"]]}, (h.name, c)
        now = h.count()
        assert now >= before[h.name]
        wait_for(lambda h=h, now=now: h.count() > now + 3, what=f"{h.name} to count on")
    # The metrics file, as local mode writes it (only by the one that ran).
    (prom,) = [p for p in proms if p.exists()]
    families = {f.name: f for f in text_string_to_metric_families(prom.read_text())}
    ok = {s.labels["workload"]: s.value for s in families["migrate_succeeded"].samples}
    assert ok == {**{h.name: 1.0 for h in holders}, sick.name: 0.0}
    record_property("measured", "evacuate 6 x 8 MiB, 2 workers, parallel 3: downtime "
                    + ", ".join(str(w["downtime_ms"]) for w in reports.values()) + " ms, "
                    + f"per worker {dict(by_worker)}")  # fmt: skip
