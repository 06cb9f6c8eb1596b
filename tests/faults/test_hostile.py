"""Hostile input: shell syntax, path tricks, newlines and huge strings in every place a name, a
path or an option reaches the tool, on the command line and in the config. Each must be refused
(exit 2, one line) or carried as data (it then fails, or works, as that odd but literal value
would): never run. Canary files that a run payload would create must never appear, neither on
the controller nor on any lab host, and a directory an `rm -rf` payload names must survive."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator import lab as labmod
from tests.faults.kit import Case, census, cli, fault_config, journal_files
from tests.labkit import Workload, counter_pids, on, start

pytestmark = pytest.mark.lab

# {c}: a canary file the payload would create if it ran; {keep}: a dir it would remove.
PAYLOADS = {
    "semicolon": "a; touch {c}",
    "rm-rf": "a; rm -rf {keep}",
    "subst": "$(touch {c})",
    "backticks": "`touch {c}`",
    "and-pipe": "x && touch {c} | touch {c}",
    "quotes": "'\"; touch {c}; echo \"'",
    "dotdot": "../../etc",
    "newline": "x\ntouch {c}",
    "5000-chars": "A" * 5000,
}
ALL = tuple(PAYLOADS)
# Where each run costs a pre-flight on the hosts (or a freeze): the shell syntax, and a newline.
FEW = ("semicolon", "subst", "backticks", "newline")


@dataclass
class Canaries:
    dir: Path

    def payload(self, position: str, kind: str) -> str:
        c = self.dir / f"PWNED-{position}-{kind}"
        return PAYLOADS[kind].format(c=c, keep=self.dir / "keep")

    def fired(self, lab: labmod.Lab) -> list[str]:
        """Canaries found (on the controller and on every host), and `keep` if it is gone."""
        here = sorted(p.name for p in self.dir.glob("PWNED-*"))
        if not (self.dir / "keep" / "file").exists():
            here.append("keep was removed")
        out = [f"controller: {n}" for n in here]
        for host in lab.names:
            script = (
                'ls -A -- "$1" | grep "^PWNED-" || true; test -e "$1/keep/file" || echo keep-gone'
            )
            out += [f"{host}: {n}" for n in on(lab, host, script, str(self.dir)).split()]
        return out


@pytest.fixture
def canaries() -> Iterator[Canaries]:
    d = Path(tempfile.mkdtemp(prefix="migrate-canary-", dir="/tmp"))
    (d / "keep").mkdir()
    (d / "keep" / "file").write_text("must survive\n")
    yield Canaries(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def counter(lab: labmod.Lab) -> Iterator[Workload]:
    """One counter on host-a for the module (killed at the end, wherever it runs)."""
    wl = start(lab, "host-a", "fault-hostile", container=False)
    yield wl
    for host in lab.names:
        pids = counter_pids(lab, host, wl.count_file)
        if pids:
            on(lab, host, 'kill -KILL "$@"', *map(str, pids), check=False)


@dataclass
class Run:
    what: str
    rc: int
    stdout: str
    stderr: str
    journals: int

    def problem(self, allowed: tuple[int, ...]) -> str | None:
        """Why this run is not an acceptable answer to hostile input (None if it is)."""
        if "Traceback" in self.stderr:
            return f"{self.what}: crashed: {self.stderr.strip().splitlines()[-1]}"
        if self.rc not in allowed:
            out = f"{self.stdout[-300:]} {self.stderr[-300:]}"
            return f"{self.what}: exit {self.rc} (allowed {allowed}): {out}"
        if self.rc == 2:
            lines = [ln for ln in self.stderr.splitlines() if ln.strip()]
            if len(lines) != 1 or not lines[0].startswith("migrate: error: "):
                return f"{self.what}: refused, but not in one line: {self.stderr[:300]!r}"
            if self.journals:
                return f"{self.what}: refused, but a journal was written"
        elif self.rc in (0, 1, 3):
            try:
                status = json.loads(self.stdout)["status"]
            except (ValueError, KeyError):
                return f"{self.what}: exit {self.rc} without a JSON report: {self.stderr[-300:]}"
            want = {0: "succeeded", 1: "failed", 3: "rolled_back"}[self.rc]
            if status != want:
                return f"{self.what}: exit {self.rc} but status {status}"
        return None


def _run(what: str, argv: list[str], config: Path, state: Path) -> Run:
    r = subprocess.run(
        cli(*argv, "--config", str(config)),
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip
    return Run(what, r.returncode, r.stdout, r.stderr, len(journal_files(state)))


def _config(
    lab: labmod.Lab, dir: Path, wl: Workload, change: Callable[[dict[str, Any]], None] | None
) -> tuple[Path, Path]:
    """A config (and its own state dir) with workload `counter` = wl, then changed."""
    dir.mkdir(parents=True)
    state = dir / "state"
    path = fault_config(
        lab, dir / "migrate.yaml", state_dir=state,
        workloads={"counter": {"pidfile": f"{wl.count_file}.pid"}},
    )  # fmt: skip
    if change:
        cfg = yaml.safe_load(path.read_text())
        change(cfg)
        path.write_text(yaml.safe_dump(cfg))
    return path, state


ConfigChange = Callable[[str], Callable[[dict[str, Any]], None]]


def _workload(**fields: Any) -> ConfigChange:
    """Workload `counter` finds its pid another way: the payload is that value (the None)."""

    def for_payload(p: str) -> Callable[[dict[str, Any]], None]:
        def change(cfg: dict[str, Any]) -> None:
            cfg["workloads"]["counter"] = {k: (p if v is None else v) for k, v in fields.items()}

        return change

    return for_payload


def _host(host: str, key: str) -> ConfigChange:
    """The payload as a host's key."""

    def for_payload(p: str) -> Callable[[dict[str, Any]], None]:
        def change(cfg: dict[str, Any]) -> None:
            cfg["hosts"][host][key] = p

        return change

    return for_payload


def _renamed(section: str, old: str) -> ConfigChange:
    """The payload as the name of a host or workload."""

    def for_payload(p: str) -> Callable[[dict[str, Any]], None]:
        def change(cfg: dict[str, Any]) -> None:
            cfg[section][p] = cfg[section].pop(old)

        return change

    return for_payload


@dataclass(frozen=True)
class Position:
    """Where a payload goes: argv (`{p}` stands for it) and/or a change to the config."""

    argv: tuple[str, ...]
    change: Callable[[str], Callable[[dict[str, Any]], None] | None]
    allowed: tuple[int, ...]  # exit codes that are a fine answer
    kinds: tuple[str, ...]  # payloads tried

    def args(self, payload: str) -> list[str]:
        return [a.replace("{p}", payload) for a in self.argv]


def _none(_payload: str) -> None:
    return None


RUN = ("run", "counter", "host-a", "host-b", "--json")
POSITIONS = {
    "cli-workload": Position(("run", "{p}", "host-a", "host-b", "--json"), _none, (2,), ALL),
    "cli-pid": Position(("run", "pid:{p}", "host-a", "host-b", "--json"), _none, (2,), ALL),
    "cli-pidfile": Position(
        ("run", "pidfile:{p}", "host-a", "host-b", "--json"), _none, (1, 2), FEW
    ),
    "cli-source": Position(("run", "counter", "{p}", "host-b", "--json"), _none, (2,), ALL),
    "cli-destination": Position(("run", "counter", "host-a", "{p}", "--json"), _none, (2,), ALL),
    "cli-check": Position(("check", "host-a", "{p}"), _none, (2,), ALL),
    "cfg-workload-name": Position(
        ("run", "{p}", "host-a", "host-b", "--json"), _renamed("workloads", "counter"), (2,), ALL
    ),
    "cfg-host-name": Position(
        ("run", "counter", "host-a", "{p}", "--json"), _renamed("hosts", "host-b"), (2,), ALL
    ),
    "cfg-pidfile": Position(RUN, _workload(pidfile=None), (1, 2), FEW),
    "cfg-match": Position(RUN, _workload(match=None), (1, 2), FEW),
    "cfg-systemd-unit": Position(RUN, _workload(systemd_unit=None), (1, 2), FEW),
    "cfg-criu-binary": Position(RUN, _host("host-b", "criu"), (1, 2), FEW),
    "cfg-rsync-key": Position(RUN, _host("host-a", "rsync_key"), (1, 2), FEW),
    "cfg-rsync-known-hosts": Position(RUN, _host("host-a", "rsync_known_hosts"), (1, 2), FEW),
    "cfg-user": Position(RUN, _host("host-b", "user"), (1, 2), FEW),
}


def _route(lab: labmod.Lab, wl: Workload) -> tuple[str, str]:
    """(where the counter runs, the other of host-a and host-b)."""
    where = list(census(lab, wl.count_file).where())
    assert len(where) == 1, f"the counter runs on {where}"
    return where[0], "host-b" if where[0] == "host-a" else "host-a"


@pytest.mark.parametrize("position", list(POSITIONS))
def test_hostile_input_is_never_run(
    lab: labmod.Lab,
    case: Case,
    tmp_path: Path,
    canaries: Canaries,
    counter: Workload,
    position: str,
) -> None:
    """Every payload, at once (these runs never get past pre-flight: nothing is frozen)."""
    pos = POSITIONS[position]
    case.fault = f"hostile {position} (x{len(pos.kinds)})"
    jobs = []
    for kind in pos.kinds:
        p = canaries.payload(position, kind)
        cfg, state = _config(lab, tmp_path / kind, counter, pos.change(p))
        jobs.append((f"{position}={kind}", pos.args(p), cfg, state))
    with ThreadPoolExecutor(max_workers=8) as pool:
        runs = list(pool.map(lambda j: _run(*j), jobs))
    case.outcome = "exits " + ",".join(sorted({str(r.rc) for r in runs}))
    c = census(lab, counter.count_file)
    case.counted(c)

    problems = [p for r in runs if (p := r.problem(pos.allowed))]
    assert canaries.fired(lab) == [], "a payload ran"
    assert len(c.where()) == 1 and not any(c.stopped.values()), f"the counter: {c}"
    assert problems == []


def test_hostile_criu_options_are_arguments(
    lab: labmod.Lab, case: Case, tmp_path: Path, canaries: Canaries, counter: Workload
) -> None:
    """criu_options reach CRIU as single arguments: CRIU refuses them, the dump fails, the
    workload is resumed where it was (exit 3), or the config refuses them (exit 2)."""
    kinds = ("subst", "newline", "5000-chars")
    case.fault = f"hostile criu_options (x{len(kinds)})"
    runs = []
    for kind in kinds:
        p = canaries.payload("criu-options", kind)
        where, other = _route(lab, counter)

        def change(c: dict[str, Any], p: str = p) -> None:
            c["workloads"]["counter"]["criu_options"] = [f"--{p}"]

        cfg, state = _config(lab, tmp_path / kind, counter, change)
        runs.append(
            _run(f"criu_options={kind}", ["run", "counter", where, other, "--json"], cfg, state)
        )
    case.outcome = "exits " + ",".join(sorted({str(r.rc) for r in runs}))
    c = census(lab, counter.count_file)
    case.counted(c)

    problems = [p for r in runs if (p := r.problem((2, 3)))]
    assert canaries.fired(lab) == [], "a payload ran"
    assert len(c.where()) == 1 and not any(c.stopped.values()), f"the counter: {c}"
    assert problems == []


def test_hostile_workdir_is_a_path(
    lab: labmod.Lab, case: Case, tmp_path: Path, canaries: Canaries, counter: Workload
) -> None:
    """A workdir full of shell syntax is just an odd directory name (kept below the canary
    dir): the migration works with it, or refuses it; the workload moves or stays whole."""
    kinds = ("backticks", "newline", "dotdot")
    case.fault = f"hostile workdir (x{len(kinds)})"
    runs = []
    for kind in kinds:
        p = canaries.payload("workdir", kind)
        wd = f"{canaries.dir}/w-{p}"  # `w-` first: `..` can only climb back to the canary dir
        where, other = _route(lab, counter)

        def change(c: dict[str, Any], wd: str = wd) -> None:
            for host in ("host-a", "host-b"):
                c["hosts"][host]["workdir"] = wd

        cfg, state = _config(lab, tmp_path / kind, counter, change)
        runs.append(_run(f"workdir={kind}", ["run", "counter", where, other, "--json"], cfg, state))
    case.outcome = "exits " + ",".join(sorted({str(r.rc) for r in runs}))
    c = census(lab, counter.count_file)
    case.counted(c)

    problems = [p for r in runs if (p := r.problem((0, 1, 2, 3)))]
    assert canaries.fired(lab) == [], "a payload ran"
    assert len(c.where()) == 1 and not any(c.stopped.values()), f"the counter: {c}"
    assert problems == []
