"""A host that cannot be reached, for every command that names it: one line naming the host on
stderr (no traceback), a non-zero exit, a `--json` object that says so, and nothing touched on
the host that can be reached. The host is "down" the way an operator meets it: its ssh port
refuses connections (the config points at a port where nothing listens)."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from orchestrator import lab as labmod
from tests.faults.kit import (
    Case,
    block_ssh,
    cli,
    fault_config,
    image_dirs,
    journal_files,
    unblock_ssh,
)
from tests.labkit import on, wait_for

pytestmark = pytest.mark.lab

DOWN_PORT = 2  # nothing listens there on a lab host: connection refused at once

# (argv, exit code). host-a is down; on host-b, {pid} is a process that runs (a sleep).
COMMANDS: dict[str, tuple[tuple[str, ...], int]] = {
    "run, auto strategy, source down": (("run", "pid:4242", "host-a", "host-b"), 1),
    "run, auto strategy, destination down": (("run", "pid:{pid}", "host-b", "host-a"), 1),
    "run --json, auto, source down": (("run", "pid:4242", "host-a", "host-b", "--json"), 1),
    "run, stopcopy, source down": (
        ("run", "pid:4242", "host-a", "host-b", "--strategy", "stopcopy"),
        1,
    ),  # fmt: skip
    "check workload, source down": (("check", "pid:4242", "host-a", "host-b"), 1),
    "check workload, destination down": (("check", "pid:{pid}", "host-b", "host-a"), 1),
    "check --json, source down": (("check", "pid:4242", "host-a", "host-b", "--json"), 1),
    "check host down": (("check", "host-a"), 1),
    "evacuate the host that is down": (("evacuate", "host-a"), 1),
    "gc the host that is down": (("gc", "host-a"), 1),
}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_an_unreachable_host_is_one_line(
    lab: labmod.Lab, case: Case, tmp_path: Path, name: str
) -> None:
    argv, code = COMMANDS[name]
    case.fault = f"host-a unreachable: {name}"
    state = tmp_path / "state"
    cfg = fault_config(lab, tmp_path / "migrate.yaml", state_dir=state,
                       hosts={"host-a": {"port": DOWN_PORT}},
                       policy={"retries": 1, "retry_deadline": 2},
                       workloads={"w": {"pid": 4242, "host": "host-a"}})  # fmt: skip
    images = image_dirs(lab, "host-b")
    pid = on(lab, "host-b", "sleep 600 </dev/null >/dev/null 2>&1 & echo $!").strip()
    try:
        r = subprocess.run(cli(*[a.format(pid=pid) for a in argv], "--config", str(cfg)),
                           capture_output=True, text=True, timeout=120,
                           stdin=subprocess.DEVNULL, check=False)  # fmt: skip
        ran_on = on(lab, "host-b", f"ps -o stat= -p {pid} || true").strip()
    finally:
        on(lab, "host-b", f"kill {pid} || true")
    assert ran_on and not ran_on.startswith("T"), f"host-b's process was touched: {ran_on!r}"
    case.outcome = f"exit {r.returncode}"
    case.copies = "-"

    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == code, f"exit {r.returncode}: {r.stdout} {r.stderr}"
    said = r.stdout + r.stderr
    assert "host-a" in said and ("cannot connect" in said or "unreachable" in said), said
    if "--json" in argv:
        out = json.loads(r.stdout)
        assert out.get("status") == "failed" or out.get("moves") is False, out
    else:
        errors = [ln for ln in r.stderr.splitlines() if "error: " in ln]
        lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "retrying" not in ln]
        assert errors or "failed" in r.stdout or "FAIL" in r.stdout, said
        assert len(lines) <= 1, f"more than one line on stderr: {r.stderr}"
    assert image_dirs(lab, "host-b") == images, "something was made on host-b"
    for j in journal_files(state):  # a run that began is journaled as failed, never left open
        events = [json.loads(ln) for ln in j.read_text().splitlines() if ln.strip()]
        assert events[-1].get("event") == "end", events[-1]


# Commands that connect to host-a before anything begins (no migration is running yet).
HANGING = {
    "check host": ("check", "host-a"),
    "run, auto strategy": ("run", "pid:4242", "host-a", "host-b"),
    "evacuate": ("evacuate", "host-a", "--to", "host-b"),
    "gc": ("gc", "host-a"),
}


def _syn_sent_to(address: str) -> bool:
    """A TCP connection to address:22 waits for its SYN's answer, in this network namespace."""
    want = "".join(f"{int(x):02X}" for x in reversed(address.split("."))) + ":0016"
    rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return any(r.split()[2] == want and r.split()[3] == "02" for r in rows)


@pytest.mark.parametrize("name", list(HANGING))
def test_ctrl_c_while_a_host_hangs_is_one_line_and_prompt(
    lab: labmod.Lab, case: Case, tmp_path: Path, name: str
) -> None:
    """host-a stops answering (its ssh packets dropped: the connect hangs); the operator
    presses Ctrl-C while the command waits for it: one line, exit 130, at once (not after the
    connect's timeout: threads still waiting on the host do not hold the exit), nothing begun."""
    case.fault = f"host-a hangs, Ctrl-C: {name}"
    state = tmp_path / "state"
    cfg = fault_config(lab, tmp_path / "migrate.yaml", state_dir=state,
                       policy={"connect_timeout": 120, "retries": 1},
                       workloads={"w": {"pid": 4242, "host": "host-a"}})  # fmt: skip
    block_ssh(lab, "host-a")
    try:
        proc = subprocess.Popen(cli(*HANGING[name], "--config", str(cfg)), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL)  # fmt: skip
        try:
            wait_for(lambda: _syn_sent_to(lab.host("host-a").address), timeout=60,
                     what="the command to be connecting to host-a")  # fmt: skip
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=20)  # the connect's own timeout is 120 s
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    finally:
        unblock_ssh(lab, "host-a")
    case.outcome = f"exit {proc.returncode}"
    case.copies = "-"
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == 130, out + err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"migrate: error: {HANGING[name][0]} interrupted before it"), err
    assert journal_files(state) == []
