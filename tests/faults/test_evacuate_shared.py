"""Faults in an evacuation whose migrations share one connection per host and one ssh link:
its controller dies (SIGKILL) while they are held at verify, and `migrate recover` finishes each
on its own; the shared connection to the source drops while they are held, and they all go on
over one new connection."""

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
from tests.faults.kit import Case, drop_connections
from tests.integration.test_evacuate import accepted, evac_config, start_holders
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


def held_at_verify(
    lab: labmod.Lab, cleanup: list[Path], tmp_path: Path, prefix: str
) -> tuple[list, Path, subprocess.Popen[str], dict[str, list[dict]]]:
    """Three holders on host-a evacuated to host-b, --parallel 3, each held at verify (its
    health check waits for the gate): the holders, the config, the controller, the journals."""
    holders = start_holders(lab, cleanup, prefix, 3)
    gate = tmp_path / "gate"
    cfg = evac_config(lab, tmp_path / "m.yaml", holders)
    config = yaml.safe_load(cfg.read_text())
    config["state_dir"] = str(tmp_path / "state")
    for wl in config["workloads"].values():
        wl["health"] = f'while [ ! -e "{gate}" ]; do sleep 0.05; done'
    cfg.write_text(yaml.safe_dump(config))
    argv = [sys.executable, "-m", "orchestrator.cli", "evacuate", "host-a", "--to", "host-b",
            "--parallel", "3", "--json", "--config", str(cfg)]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        held = wait_for(lambda: (j := journals(tmp_path / "state")) and len(j) == 3
                        and all(at(ev, "verify") for ev in j.values()) and j,
                        timeout=120, what="three migrations at verify")  # fmt: skip
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return holders, cfg, proc, held


def test_controller_killed_mid_evacuation_then_recover_each(
    lab: labmod.Lab, cleanup: list[Path], case: Case, tmp_path: Path
) -> None:
    case.fault = "evacuate --parallel 3: controller SIGKILLed, all held at verify; recover each"
    holders, cfg, proc, held = held_at_verify(lab, cleanup, tmp_path, "evkill")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    (tmp_path / "gate").touch()
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
    clean_host_b(lab, holders)


def test_shared_connection_dropped_mid_evacuation_all_go_on(
    lab: labmod.Lab, cleanup: list[Path], case: Case, tmp_path: Path
) -> None:
    case.fault = "evacuate --parallel 3: the controller's ssh to host-a dropped at verify"
    seen = len(accepted(lab, "host-a"))
    holders, cfg, proc, held = held_at_verify(lab, cleanup, tmp_path, "evdrop")
    drop_connections(lab, "host-a")  # the one connection all three use (and their locks)
    (tmp_path / "gate").touch()
    out, err = proc.communicate(timeout=180)
    case.outcome = f"exit {proc.returncode}"
    assert proc.returncode == 0, out + err
    reports = json.loads(out)["workloads"]
    assert [w["status"] for w in reports] == ["succeeded"] * 3, out
    for w in reports:  # each took its lock again, on the one new connection
        assert any("taken again before confirm" in n for n in w["notes"]), w["notes"]
    assert len(accepted(lab, "host-a")[seen:]) == 2, "one connection, then one reconnection"
    for h in holders:
        assert running_pids(lab, "host-b", h.count_file), h.name
        wait_for(lambda h=h: not counter_pids(lab, "host-a", h.count_file), what="host-a empty")
    clean_host_b(lab, holders)


def test_a_second_evacuation_of_the_host_is_refused(
    lab: labmod.Lab, cleanup: list[Path], case: Case, tmp_path: Path
) -> None:
    """A second operator (or a timer) evacuates host-a while an evacuation of it is held at
    verify: refused at once in one line naming the first, nothing of its own begun; the first
    finishes untouched; once it ended (or its controller died), host-a can be evacuated again."""
    case.fault = "evacuate host-a twice at once: the second is refused"
    holders, cfg, proc, held = held_at_verify(lab, cleanup, tmp_path, "evtwice")
    try:
        r = migrate("evacuate", "host-a", "--to", "host-b", config=cfg, timeout=120)
        rj = migrate("evacuate", "host-a", "--to", "host-b", "--json", config=cfg, timeout=120)
        # One of its workloads on its own: told to wait (not to recover a live migration);
        # history says the three are running.
        one = migrate("run", holders[0].name, "host-a", "host-b", config=cfg, timeout=120)
        hist = json.loads(migrate("history", "--json", config=cfg).stdout)
    finally:
        (tmp_path / "gate").touch()
    assert one.returncode == 1 and len(one.stderr.strip().splitlines()) == 1, one.stderr
    assert f"workload {holders[0].name} is being migrated now" in one.stderr, one.stderr
    assert sorted(h["id"] for h in hist if h["running"]) == sorted(held), hist
    out, err = proc.communicate(timeout=180)
    case.outcome = f"second: exit {r.returncode}; first: exit {proc.returncode}"
    errors = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1 and len(errors) == 1, r.stdout + r.stderr
    assert errors[0].startswith("migrate: error: host-a is being evacuated already (evacuation"), (
        errors[0]
    )
    assert f"pid {proc.pid}" in errors[0], errors[0]
    assert rj.returncode == 1 and json.loads(rj.stdout)["status"] == "failed", rj.stdout
    assert sorted(journals(tmp_path / "state")) == sorted(held), "the second began something"
    assert proc.returncode == 0, out + err
    assert [w["status"] for w in json.loads(out)["workloads"]] == ["succeeded"] * 3, out
    # The lock went with the first evacuation: host-a can be evacuated again (nothing left).
    assert_free_to_evacuate(cfg)
    for h in holders:
        assert running_pids(lab, "host-b", h.count_file), h.name
    clean_host_b(lab, holders)


def assert_free_to_evacuate(cfg: Path) -> None:
    """host-a's evacuation lock is free: an evacuation of it runs (and, with none of cfg's
    workloads left there, finds nothing to move)."""
    again = migrate("evacuate", "host-a", "--to", "host-b", config=cfg, timeout=120)
    assert again.returncode == 0 and "no workload is placed there" in again.stdout, (
        again.stdout + again.stderr
    )


def clean_host_b(lab: labmod.Lab, holders: list) -> None:
    """Kill the holders' copies on host-b (for the next case)."""
    for h in holders:
        pids = counter_pids(lab, "host-b", h.count_file)
        if pids:
            subprocess.run(labmod.exec_argv(lab, "host-b", ["kill", "-KILL", *map(str, pids)]),
                           check=False)  # fmt: skip
