"""The controller of an evacuation dies (SIGKILL) while its migrations, sharing its connections
and ssh link, are held at verify: `migrate recover` finishes each on its own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator import lab as labmod
from tests.faults.kit import Case
from tests.integration.test_evacuate import evac_config, start_holders
from tests.labkit import counter_pids, migrate, running_pids, wait_for

pytestmark = pytest.mark.lab


def journals(state_dir: Path) -> dict[str, list[dict]]:
    """Each migration's journal events, by id."""
    jdir = state_dir / "journal"
    return {p.stem: [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()]
            for p in jdir.glob("*.jsonl")} if jdir.is_dir() else {}  # fmt: skip


def at(events: list[dict], phase: str) -> bool:
    return any(e.get("event") == "phase" and e.get("name") == phase and e.get("state") == "begin"
               for e in events)  # fmt: skip


def test_controller_killed_mid_evacuation_then_recover_each(
    lab: labmod.Lab, cleanup: list[Path], case: Case, tmp_path: Path
) -> None:
    case.fault = "evacuate --parallel 3: controller SIGKILLed, all held at verify; recover each"
    holders = start_holders(lab, cleanup, "evkill", 3)
    gate = tmp_path / "gate"
    cfg = evac_config(lab, tmp_path / "m.yaml", holders)
    config = yaml.safe_load(cfg.read_text())
    config["state_dir"] = str(tmp_path / "state")
    for wl in config["workloads"].values():  # each waits at verify until the gate exists
        wl["health"] = f'while [ ! -e "{gate}" ]; do sleep 0.05; done'
    cfg.write_text(yaml.safe_dump(config))
    argv = [sys.executable, "-m", "orchestrator.cli", "evacuate", "host-a", "--to", "host-b",
            "--parallel", "3", "--json", "--config", str(cfg)]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        held = wait_for(lambda: (j := journals(tmp_path / "state")) and len(j) == 3
                        and all(at(ev, "verify") for ev in j.values()) and j,
                        timeout=120, what="three migrations at verify")  # fmt: skip
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    gate.touch()
    outcomes = []
    for mid in sorted(held):
        r = migrate("recover", mid, "--json", config=cfg)
        assert r.returncode == 0, r.stdout + r.stderr
        outcomes.append(json.loads(r.stdout)["status"])
    case.outcome = f"recover: {', '.join(outcomes)}"
    assert outcomes == ["succeeded"] * 3
    for h in holders:  # one copy each, on host-b, counting on
        assert running_pids(lab, "host-b", h.count_file), h.name
        wait_for(lambda h=h: not counter_pids(lab, "host-a", h.count_file), what="host-a empty")
        now = h.count()
        wait_for(lambda h=h, now=now: h.count() > now + 3, what=f"{h.name} to count on")
    for host in ("host-a", "host-b"):
        left = [p.name for p in (lab.host(host).workdir / "images").glob("*")
                if any(mid in p.name for mid in held)]  # fmt: skip
        assert not left, (host, left)
    for h in holders:  # leave host-b clean for the next case
        pids = counter_pids(lab, "host-b", h.count_file)
        if pids:
            subprocess.run(labmod.exec_argv(lab, "host-b", ["kill", "-KILL", *map(str, pids)]),
                           check=False)  # fmt: skip
