"""Helpers for the fault-injection suite: a migration run in the background whose journal is
watched (to inject a fault when a phase begins), configs with a short policy, a workload with
a lot of memory, the record a case leaves for the summary table (`Case`), and the checks every
case makes afterwards: where copies run, that the state survived, and that nothing was left
behind. Tests import helpers from here, never from a conftest."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from orchestrator import lab as labmod
from tests.labkit import Workload, on, wait_for

#: Short enough that each case ends in seconds: rsync gives up after command_timeout of silence,
#: and no retry starts retry_deadline seconds after the first attempt.
POLICY = {"connect_timeout": 3, "command_timeout": 20, "retries": 10, "retry_deadline": 8}


def fault_config(
    lab: labmod.Lab,
    path: Path,
    *,
    state_dir: Path,
    policy: dict[str, Any] | None = None,
    hosts: dict[str, dict[str, Any]] | None = None,
    workloads: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """The lab's config with its own state_dir (so its journal is the only one there), the
    short POLICY (plus changes), some host keys changed and some workloads."""
    config = yaml.safe_load(lab.config_path.read_text())
    config["state_dir"] = str(state_dir)
    config["policy"] = {**POLICY, **(policy or {})}
    for name, changes in (hosts or {}).items():
        config["hosts"][name].update(changes)
    config["workloads"] = workloads or {}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli", *args]


@dataclass
class Outcome:
    """How one `migrate` run ended."""

    rc: int
    stdout: str
    stderr: str
    seconds: float
    report: dict[str, Any] | None  # the --json report, if it printed one

    @property
    def status(self) -> str | None:
        return self.report.get("status") if self.report else None

    @property
    def error(self) -> str:
        return (self.report or {}).get("error") or ""

    @property
    def notes(self) -> list[str]:
        return list((self.report or {}).get("notes") or [])

    @property
    def id(self) -> str:
        return str((self.report or {}).get("id") or "")

    def summary(self) -> str:
        return f"{self.status or 'no report'} (exit {self.rc})"

    def __str__(self) -> str:  # for assertion messages
        return f"exit {self.rc}\nstdout: {self.stdout}\nstderr: {self.stderr}"


def _outcome(rc: int, out: str, err: str, seconds: float) -> Outcome:
    try:
        report = json.loads(out)
    except ValueError:
        report = None
    return Outcome(rc, out, err, round(seconds, 1), report if isinstance(report, dict) else None)


def run_migrate(*args: str, config: Path, timeout: float = 120) -> Outcome:
    """`migrate ARGS --config CONFIG`, to the end."""
    t0 = time.monotonic()
    r = subprocess.run(
        cli(*args, "--config", str(config)),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    return _outcome(r.returncode, r.stdout, r.stderr, time.monotonic() - t0)


class Background:
    """`migrate run ... --json` as a subprocess; its journal (the only one in state_dir) is
    read as it grows, so a test can act when a phase begins."""

    def __init__(self, *args: str, config: Path, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            cli(*args, "--config", str(config)),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def events(self) -> list[dict[str, Any]]:
        """The journal so far (a torn last line is skipped)."""
        files = sorted((self.state_dir / "journal").glob("*.jsonl"), key=os.path.getmtime)
        if not files:
            return []
        out = []
        for line in files[-1].read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def wait(self, name: str, state: str = "begin", timeout: float = 60) -> float:
        """Wait until the journal shows phase `name` in `state`; seconds since the start."""
        deadline = time.monotonic() + timeout
        while True:
            for e in self.events():
                if e.get("event") == "phase" and e.get("name") == name and e.get("state") == state:
                    return time.monotonic() - self.started
            if self.proc.poll() is not None:
                out = self.finish()
                raise AssertionError(f"migrate ended before phase {name} {state}: {out}")
            if time.monotonic() > deadline:
                raise AssertionError(f"phase {name} {state} not journaled within {timeout}s")
            time.sleep(0.01)

    def finish(self, timeout: float = 120) -> Outcome:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            out, err = self.proc.communicate()
            last = self.events()[-1:] or [{}]
            what = " ".join(str(last[0].get(k)) for k in ("event", "name", "state") if k in last[0])
            raise AssertionError(
                f"migrate hung: not done {timeout:g}s after the fault (killed; its last journal "
                f"event: {what or 'none'}): {out} {err}"
            ) from None
        return _outcome(self.proc.returncode, out, err, time.monotonic() - self.started)

    def stop(self) -> None:
        """Kill this run's controller (by its pid) if it still runs."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


# -- what a case says for the summary table (filled by tests, written by conftest's `case`) ----


@dataclass
class Case:
    """What a test says about its case, for the summary table."""

    fault: str = ""
    outcome: str = ""
    copies: str = ""
    strategy: str = ""  # as the run's report names it (set by ended()), or by the test
    runtime: str = "process"  # the workload's runtime: a test of a container sets it
    error: str = ""  # the report's error and notes, kept in the results file
    notes: tuple[str, ...] = ()

    def ended(self, out: Outcome) -> None:
        self.outcome = out.summary()
        self.strategy = str((out.report or {}).get("strategy") or self.strategy)
        self.error = out.error
        self.notes = tuple(out.notes)

    def counted(self, c: Census) -> None:
        running = ", ".join(f"{len(p)} on {h}" for h, p in c.where().items()) or "0"
        stopped = ", ".join(f"{len(p)} STOPPED on {h}" for h, p in c.stopped.items() if p)
        self.copies = running + (f"; {stopped}" if stopped else "")


# -- where the workload runs -------------------------------------------------------------------


@dataclass
class Census:
    """Copies of one workload on every host: root pids of the trees, running or stopped."""

    running: dict[str, list[int]] = field(default_factory=dict)
    stopped: dict[str, list[int]] = field(default_factory=dict)

    @property
    def copies(self) -> int:
        return sum(map(len, self.running.values())) + sum(map(len, self.stopped.values()))

    def where(self) -> dict[str, list[int]]:
        """host -> root pids of running copies, hosts with none left out."""
        return {h: pids for h, pids in self.running.items() if pids}

    def __str__(self) -> str:
        run = {h: p for h, p in self.running.items() if p}
        stop = {h: p for h, p in self.stopped.items() if p}
        return f"running {run or 'nowhere'}" + (f", STOPPED {stop}" if stop else "")


def census(lab: labmod.Lab, count_file: Path, hosts: list[str] | None = None) -> Census:
    """Every copy of the workload writing count_file, on every (up) host."""
    c = Census()
    for host in hosts or lab.names:
        rows = []
        for line in on(lab, host, "ps -ww -e -o pid=,ppid=,stat=,args=").splitlines():
            parts = line.split(None, 3)
            if len(parts) == 4 and str(count_file) in parts[3].split():
                rows.append((int(parts[0]), int(parts[1]), parts[2]))
        pids = {pid for pid, _, _ in rows}
        roots = [(pid, stat) for pid, ppid, stat in rows if ppid not in pids]
        c.running[host] = sorted(p for p, s in roots if s[0] not in "TtZ")
        c.stopped[host] = sorted(p for p, s in roots if s[0] in "Tt")
    return c


def assert_one_copy(lab: labmod.Lab, wl: Workload, host: str, before: int) -> Census:
    """Exactly one copy runs, on host, none is stopped anywhere, and it counts on from where
    it was (its in-memory state survived: a copy started afresh would count from 1)."""
    c = census(lab, wl.count_file)
    assert len(c.where()) == 1 and len(c.where().get(host, [])) == 1, (
        f"want one copy on {host}: {c}"
    )
    assert not any(c.stopped.values()), f"a stopped copy is left: {c}"
    now = wl.count()
    assert now >= before, f"state lost: the counter is at {now}, it was at {before} before"
    wait_for(lambda: wl.count() > now + 3, what=f"the counter to keep counting on {host}")
    return c


# -- one case's setup ----------------------------------------------------------------------------


@dataclass
class FaultCase:
    """What every fault case sets up (see conftest's `fault_case`): a workload on host-a that
    counts, a config of its own (the short POLICY, its own state_dir: its journal is the only
    one there) and the count before the fault. Runs go from host-a."""

    lab: labmod.Lab
    case: Case
    wl: Workload
    state: Path
    config: Path
    before: int
    start: Callable[..., Background]  # conftest's `background`: killed at the end if still on
    strategy: str = "auto"  # a case about stop-copy's transfer says stopcopy

    def background(self, dst: str = "host-b") -> Background:
        """`migrate run WORKLOAD host-a DST --json` in the background."""
        return self.start("run", self.wl.spec, "host-a", dst, "--json", "--strategy",
                          self.strategy, config=self.config, state_dir=self.state)  # fmt: skip

    def migrate(self, dst: str = "host-b") -> Outcome:
        """`migrate run WORKLOAD host-a DST --json`, to the end."""
        return run_migrate("run", self.wl.spec, "host-a", dst, "--json", "--strategy",
                           self.strategy, config=self.config)  # fmt: skip

    def count(self) -> Census:
        """Where the copies are now, recorded for the summary table."""
        c = census(self.lab, self.wl.count_file)
        self.case.counted(c)
        return c

    def ended(self, out: Outcome) -> Census:
        """Record how the run ended and where the copies are."""
        self.case.ended(out)
        return self.count()


# -- what must not be left behind --------------------------------------------------------------


def image_dirs(lab: labmod.Lab, host: str, workdir: Path | str | None = None) -> list[str]:
    """Entries in workdir/images on host, as the host sees it (its own mounts included)."""
    wd = str(workdir or lab.host(host).workdir)
    out = on(lab, host, 'ls -A -- "$1/images" 2>/dev/null || true', wd)
    return out.split()


def processes_mentioning(lab: labmod.Lab, host: str, needle: str) -> list[str]:
    """Command lines on host that contain needle (e.g. a migration id: ssh masters, rsync)."""
    out = on(lab, host, "ps -ww -e -o pid=,args=")
    return [ln.strip() for ln in out.splitlines() if needle in ln]


def leftovers(
    lab: labmod.Lab, migration_id: str, workdirs: dict[str, str] | None = None, wait: float = 3
) -> list[str]:
    """What the migration left on any host: entries of its id (every image dir, control socket
    and log it makes is named by it; everything, if the id is unknown) under each host's
    workdir/images (or the workdir given for it), processes naming its id (ssh masters, rsync,
    lock holders), and CRIU processes. [] if clean. Processes may take a moment to go after
    the controller closed its connections: waits up to `wait` seconds for them."""
    deadline = time.monotonic() + wait
    while True:
        found = []
        for host in lab.names:
            wd = (workdirs or {}).get(host) or str(lab.host(host).workdir)
            found += [
                f"{host}: {wd}/images/{d}"
                for d in image_dirs(lab, host, wd)
                if not migration_id or migration_id in d
            ]
            if migration_id:
                found += [
                    f"{host}: process {p}" for p in processes_mentioning(lab, host, migration_id)
                ]
            crius = on(lab, host, "pgrep -a -x criu || true").strip()
            found += [f"{host}: criu process {ln}" for ln in crius.splitlines()]
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def phases(out: Outcome) -> list[tuple[str, str]]:
    return [(p["name"], p["status"]) for p in (out.report or {}).get("phases", [])]


def journal_files(state_dir: Path) -> list[Path]:
    d = state_dir / "journal"
    return sorted(d.glob("*")) if d.is_dir() else []


def journal(state_dir: Path) -> list[dict[str, Any]]:
    """The events of the one migration journaled in state_dir."""
    (path,) = journal_files(state_dir)
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


# -- a workload with a lot of memory -------------------------------------------------------------

BIG = r"""
import os, sys, time
path, mib = sys.argv[1], int(sys.argv[2])
block = os.urandom(1 << 20)
memory = [bytearray(block) for _ in range(mib)]  # touched and incompressible: all of it dumped
with open(path + ".pid", "w") as f:
    f.write(str(os.getpid()))
n = 0
while True:
    n += 1
    with open(path, "w") as f:
        f.write(f"{n}\n")
    time.sleep(0.05)
"""


def start_big(lab: labmod.Lab, host: str, name: str, mib: int = 32) -> Workload:
    """A python3 process holding `mib` MiB of touched memory that counts like the counter."""
    work = lab.dir / "workloads"
    work.mkdir(exist_ok=True)
    script = work / "big.py"
    script.write_text(BIG)
    count = work / name
    pidfile = Path(f"{count}.pid")
    for f in (count, pidfile):
        f.unlink(missing_ok=True)
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    on(
        lab,
        host,
        'setsid "$1" "$2" "$3" "$4" </dev/null >/dev/null 2>&1 &',
        python,
        str(script),
        str(count),
        str(mib),
    )
    wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 30, what="pidfile")
    wl = Workload(name, count, f"pidfile:{pidfile}", int(pidfile.read_text()))
    wait_for(lambda: wl.count() >= 20, what="the big counter to reach 20")
    return wl


# -- holding a migration at a phase, and dropping the controller's connections ------------------


def gated_config(
    lab: labmod.Lab,
    path: Path,
    wl: Workload,
    state_dir: Path,
    *,
    gate: Path | None = None,
    policy: dict[str, Any] | None = None,
    hosts: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """A config whose workload `gated` is wl (by its pidfile); with gate, its health check
    waits at verify until that file exists (so a run is held at verify, never by a sleep)."""
    workload: dict[str, Any] = {"pidfile": f"{wl.count_file}.pid"}
    if gate is not None:
        workload["health"] = f'while [ ! -e "{gate}" ]; do sleep 0.05; done'
    return fault_config(lab, path, state_dir=state_dir,
                        policy={"command_timeout": 120, **(policy or {})},
                        hosts=hosts, workloads={"gated": workload})  # fmt: skip


#: A criu that holds one command (HOLD) until a gate file exists, after the real criu has done
#: it (so a dump has left the workload stopped and its images whole), or before it runs (BEFORE):
#: it touches GATE.held, then waits. Every other command is the real criu (labkit.BROKEN_CRIU).
HOLD_CRIU = """#!/bin/sh
self=$(readlink -f "$0")
real=
IFS=:
for d in $PATH; do
  if [ -x "$d/criu" ] && [ "$(readlink -f "$d/criu")" != "$self" ]; then real="$d/criu"; break; fi
done
unset IFS
[ -n "$real" ] || { echo "criu not found on PATH" >&2; exit 127; }
if [ "$1" = "@HOLD@" ] && [ "@BEFORE@" = yes ]; then
  touch "@GATE@.held"
  while [ ! -e "@GATE@" ]; do sleep 0.05; done
  exec "$real" "$@"
fi
if [ "$1" = "@HOLD@" ]; then
  "$real" "$@"; rc=$?
  touch "@GATE@.held"
  while [ ! -e "@GATE@" ]; do sleep 0.05; done
  exit $rc
fi
exec "$real" "$@"
"""


def holding_criu(path: Path, command: str, gate: Path, before: bool = False) -> Path:
    """Write HOLD_CRIU at path, holding `command` (e.g. dump) at gate, after the real criu
    ran it (with before: before it runs); the path."""
    script = HOLD_CRIU.replace("@HOLD@", command).replace("@GATE@", str(gate))
    path.write_text(script.replace("@BEFORE@", "yes" if before else "no"))
    path.chmod(0o755)
    return path


def sshd_sessions(lab: labmod.Lab, host: str) -> list[int]:
    """The sshd processes serving established connections to host's port 22."""
    out = on(lab, host, "ss -Htnp state established '( sport = :22 )'")
    return sorted({int(p) for p in re.findall(r"pid=(\d+)", out)})


def drop_connections(lab: labmod.Lab, host: str) -> list[int]:
    """Drop every ssh connection to host (the controller's: hosts reach each other's sshd,
    not their own) by killing the sshd processes serving them; their pids."""
    sessions = sshd_sessions(lab, host)
    assert sessions, f"no ssh connection to {host} to drop"
    on(lab, host, 'kill -KILL "$@"', *map(str, sessions))
    return sessions


def migration_id(run: Background, timeout: float = 30) -> str:
    """The id of the migration run journals (from its start record)."""
    starts = wait_for(
        lambda: [e for e in run.events() if e.get("event") == "start"], timeout, "start record"
    )
    return str(starts[0]["id"])


#: nftables table, in a host's netns, that drops all ssh to the host (its sshd's traffic).
_SSH_BLOCK = "migrate_fault_ssh"


def block_ssh(lab: labmod.Lab, host: str) -> None:
    """Drop every packet to and from host's sshd (port 22), established connections included:
    the controller's commands on host hang (a host that stopped answering), nothing fails."""
    script = (f"table inet {_SSH_BLOCK}\ndelete table inet {_SSH_BLOCK}\n"
              f"table inet {_SSH_BLOCK} {{\n"
              "  chain input {\n    type filter hook input priority -150; policy accept;\n"
              "    tcp dport 22 drop\n  }\n"
              "  chain output {\n    type filter hook output priority -150; policy accept;\n"
              "    tcp sport 22 drop\n  }\n}\n")  # fmt: skip
    _nft(lab, host, script)


def unblock_ssh(lab: labmod.Lab, host: str) -> None:
    """Undo block_ssh (a host not blocked is left alone)."""
    _nft(lab, host, f"table inet {_SSH_BLOCK}\ndelete table inet {_SSH_BLOCK}\n")


def _nft(lab: labmod.Lab, host: str, script: str) -> None:
    subprocess.run(["ip", "netns", "exec", lab.host(host).netns, "nft", "-f", "-"],
                   input=script, text=True, check=True, capture_output=True)  # fmt: skip


def wait_event(run: Background, test: Callable[[dict[str, Any]], bool], what: str,
               timeout: float = 60) -> dict[str, Any]:  # fmt: skip
    """Wait until run's journal has an event that passes test; that event."""
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in run.events() if test(e)]
        if found:
            return found[0]
        if run.proc.poll() is not None:
            raise AssertionError(f"migrate ended before {what}: {run.finish()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not journaled within {timeout}s")
        time.sleep(0.01)
