"""The controller dies (SIGKILL) in each phase; `migrate recover` leaves exactly one copy.
And two controllers migrating the same workload at once: one wins, the other is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from orchestrator import lab as labmod
from tests.faults.kit import Case
from tests.labkit import Workload, counter_pids, migrate, on, running_pids, start, wait_for

pytestmark = pytest.mark.lab

# What recover must decide when the controller dies as each phase begins: before the restore
# can have run, roll back; once it ran (verify, confirm), confirm; in between, either is right.
EXPECTED = {
    "preflight": "rolled_back",
    "prepare": "rolled_back",
    "dump": "rolled_back",
    "transfer": None,
    "restore": None,
    "verify": "succeeded",
    "confirm": "succeeded",
}


def journal_dir(config: Path) -> Path:
    """The controller's journal directory for config (made if missing)."""
    jdir = Path(yaml.safe_load(config.read_text())["state_dir"]) / "journal"
    jdir.mkdir(parents=True, exist_ok=True)
    return jdir


# Post-copy: once the destination has resumed (pull-pages on), recover must confirm.
EXPECTED_POSTCOPY = {
    "page-tunnel": "rolled_back",
    "lazy-dump": "rolled_back",
    "transfer": None,
    "lazy-restore": None,
    "pull-pages": "succeeded",
    "verify": "succeeded",
}


def run_in_background(
    wl: Workload, dst: str, config: Path, strategy: str = "stopcopy"
) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "orchestrator.cli", "run", wl.spec, "host-a", dst, "--json",
            "--strategy", strategy]  # fmt: skip
    return subprocess.Popen(
        [*argv, "--config", str(config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, preexec_fn=_sigint_default,
    )  # fmt: skip


def _sigint_default() -> None:
    """The controller reacts to SIGINT as from a terminal even when the suite itself runs in the
    background of a non-interactive shell (which starts it with SIGINT ignored: inherited, the
    interrupt case would send a signal the controller never sees)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for_phase(jdir: Path, before: set[Path], phase: str, proc: subprocess.Popen[str]) -> Path:
    """Poll the controller's new journal until `phase` begins; its path."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for path in set(jdir.glob("*.jsonl")) - before:
            for line in path.read_text().splitlines():
                e = json.loads(line)
                if e.get("event") == "phase" and e["name"] == phase and e["state"] == "begin":
                    return path
        if proc.poll() is not None:
            raise AssertionError(f"controller ended before {phase}: {proc.stdout.read()}")  # type: ignore[union-attr]
        time.sleep(0.005)
    raise AssertionError(f"{phase} never began")


def copies(lab: labmod.Lab, wl: Workload) -> dict[str, str]:
    """Each host's copy of the workload: running, stopped, or absent."""
    out = {}
    for host in ("host-a", "host-b"):
        if wl.root_pid in running_pids(lab, host, wl.count_file):
            out[host] = "running"
        elif counter_pids(lab, host, wl.count_file):
            out[host] = "stopped"
    return out


@pytest.mark.parametrize("phase", EXPECTED)
def test_controller_killed_then_recover(
    lab: labmod.Lab, cleanup: list[Path], case: Case, phase: str
) -> None:
    killed_then_recovered(lab, cleanup, case, phase, "stopcopy", EXPECTED[phase])


@pytest.mark.parametrize("phase", EXPECTED_POSTCOPY)
def test_postcopy_controller_killed_then_recover(
    lab: labmod.Lab, cleanup: list[Path], case: Case, phase: str
) -> None:
    killed_then_recovered(lab, cleanup, case, phase, "postcopy", EXPECTED_POSTCOPY[phase])


def killed_then_recovered(
    lab: labmod.Lab,
    cleanup: list[Path],
    case: Case,
    phase: str,
    strategy: str,
    expected: str | None,
) -> None:
    case.fault = f"{strategy}: controller SIGKILLed at {phase} begin, then recover"
    wl = start(lab, "host-a", f"counter-kill-{strategy}-{phase}", container=False)
    cleanup.append(wl.count_file)
    jdir = journal_dir(lab.config_path)
    before_files = set(jdir.glob("*.jsonl"))
    before = wl.count()

    proc = run_in_background(wl, "host-b", lab.config_path, strategy)
    path = wait_for_phase(jdir, before_files, phase, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    migration = path.stem

    # A new run of the same workload is refused until the dead one is recovered.
    again = migrate("run", wl.spec, "host-a", "host-c", config=lab.config_path)
    assert again.returncode == 1 and f"migrate recover {migration}" in again.stderr

    r = migrate("recover", migration, "--json", config=lab.config_path)
    report = json.loads(r.stdout)
    assert r.returncode in (0, 3), r.stdout + r.stderr
    assert expected in (None, report["status"]), report
    expected_host = "host-b" if report["status"] == "succeeded" else "host-a"
    case.outcome = f"recover: {report['status']} (exit {r.returncode})"
    found = copies(lab, wl)
    case.copies = ", ".join(f"1 {state} on {host}" for host, state in found.items()) or "0"
    assert found == {expected_host: "running"}, report
    now = wl.count()
    wait_for(lambda: wl.count() > now + 5, what=f"the counter to keep counting on {expected_host}")
    assert now >= before
    for host in lab.hosts:
        assert not list((host.workdir / "images").glob(f"*{migration}*")), host.name
    assert not any(f"ssh-{migration}" in line for line in on(lab, "host-a", "ps -ww -e -o args="))
    # The journal is closed: history shows it ended, and recover has nothing left to do.
    hist = json.loads(migrate("history", "--json", config=lab.config_path).stdout)
    assert next(h for h in hist if h["id"] == migration)["status"] == report["status"]
    shown = migrate("show", migration, config=lab.config_path).stdout
    assert f"phase     name={phase} state=begin" in shown and "recover" in shown
    if phase == "dump":  # the dead controller's lock freed itself: the workload can move again
        again = migrate("run", wl.spec, "host-a", "host-b", config=lab.config_path)
        assert again.returncode == 0, again.stdout + again.stderr
        report["status"] = "succeeded"
    if report["status"] == "succeeded":  # leave host-b clean for the next case
        on(lab, "host-b", 'kill -KILL "$@"', *map(str, counter_pids(lab, "host-b", wl.count_file)))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_rolls_back_cleanly(
    lab: labmod.Lab, cleanup: list[Path], case: Case, sig: int
) -> None:
    case.fault = f"{signal.Signals(sig).name} to the controller at transfer begin"
    wl = start(lab, "host-a", f"counter-{sig}", container=False)
    cleanup.append(wl.count_file)
    jdir = journal_dir(lab.config_path)
    proc = run_in_background(wl, "host-b", lab.config_path)
    wait_for_phase(jdir, set(jdir.glob("*.jsonl")), "transfer", proc)
    os.kill(proc.pid, sig)
    out, err = proc.communicate(timeout=120)
    report = json.loads(out)
    case.outcome = f"{report['status']} (exit {proc.returncode})"
    found = copies(lab, wl)
    case.copies = ", ".join(f"1 {state} on {host}" for host, state in found.items()) or "0"
    assert proc.returncode == 3, out + err
    assert report["status"] == "rolled_back" and "interrupted" in report["error"]
    assert found == {"host-a": "running"}
    for host in lab.hosts:
        assert not list((host.workdir / "images").glob(f"*{report['id']}*")), host.name


def test_two_controllers_one_wins(
    lab: labmod.Lab, cleanup: list[Path], case: Case, tmp_path: Path
) -> None:
    case.fault = "two controllers migrate one workload at once"
    wl = start(lab, "host-a", "counter-race", container=False)
    cleanup.append(wl.count_file)
    # A second controller: its own journal (another machine), the same hosts.
    other = yaml.safe_load(lab.config_path.read_text())
    other["state_dir"] = str(tmp_path / "other-controller")
    other_cfg = tmp_path / "other.yaml"
    other_cfg.write_text(yaml.safe_dump(other))
    jdir = journal_dir(lab.config_path)

    first = run_in_background(wl, "host-b", lab.config_path)
    wait_for_phase(jdir, set(jdir.glob("*.jsonl")), "prepare", first)
    second = migrate("run", wl.spec, "host-a", "host-c", "--json", config=other_cfg)
    out, err = first.communicate(timeout=120)

    case.outcome = f"first exit {first.returncode}, second exit {second.returncode}"
    case.copies = ", ".join(f"1 {st} on {h}" for h, st in copies(lab, wl).items()) or "0"
    assert first.returncode == 0, out + err
    assert second.returncode == 1, second.stdout + second.stderr
    refused = json.loads(second.stdout)
    # Refused either way: by the first one's lock, or because the first one holds it stopped,
    # or (if the first was already done) because the workload has left host-a.
    assert ("held by another migration" in refused["error"]
            or "is stopped" in refused["error"]
            or "is not running on host-a" in refused["error"]), refused  # fmt: skip
    assert "refused in preflight: nothing was changed on either host" in refused["notes"]
    assert copies(lab, wl) == {"host-b": "running"}
    assert counter_pids(lab, "host-c", wl.count_file) == []


def test_recover_rolls_back_an_unhealthy_destination(
    lab: labmod.Lab, cleanup: list[Path], case: Case, tmp_path: Path
) -> None:
    case.fault = "controller SIGKILLed at verify; destination fails its health check"
    wl = start(lab, "host-a", "counter-unhealthy", container=False)
    cleanup.append(wl.count_file)
    config = yaml.safe_load(lab.config_path.read_text())
    config["workloads"] = {"unhealthy": {"pidfile": f"{wl.count_file}.pid", "health": "false"}}
    cfg = tmp_path / "unhealthy.yaml"
    cfg.write_text(yaml.safe_dump(config))
    jdir = journal_dir(cfg)
    argv = [sys.executable, "-m", "orchestrator.cli", "run", "unhealthy", "host-a", "host-b"]
    proc = subprocess.Popen([*argv, "--config", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    path = wait_for_phase(jdir, set(jdir.glob("*.jsonl")), "verify", proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    r = migrate("recover", path.stem, config=cfg)
    case.outcome = f"recover exit {r.returncode}"
    found = copies(lab, wl)
    case.copies = ", ".join(f"1 {st} on {h}" for h, st in found.items()) or "0"
    assert found == {"host-a": "running"}, r.stdout + r.stderr
    assert r.returncode in (0, 3)  # 0 only if the controller had already rolled back itself
    if r.returncode == 3:
        assert "fails its health check" in r.stdout
