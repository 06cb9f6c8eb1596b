"""Helpers for tests on the real lab: run in a host, the CLI, a counter workload with state."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from orchestrator import lab as labmod


def on(lab: labmod.Lab, host: str, script: str, *args: str, check: bool = True) -> str:
    """Run a shell script inside a lab host's namespaces; its stdout."""
    argv = labmod.exec_argv(lab, host, ["sh", "-c", script, "sh", *args])
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if check and r.returncode != 0:
        raise AssertionError(f"on {host}: {script!r} exit {r.returncode}: {r.stderr.strip()}")
    return r.stdout


def migrate(*args: str, config: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The real command line, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def config_with(lab: labmod.Lab, path: Path, **hosts: dict[str, Any]) -> Path:
    """A copy of the lab's config with some host keys changed, e.g. host_b={"criu": "/x"}."""
    config = yaml.safe_load(lab.config_path.read_text())
    for name, changes in hosts.items():
        config["hosts"][name.replace("_", "-")].update(changes)
    path.write_text(yaml.safe_dump(config))
    return path


# A two-process tree; each keeps a count in memory and writes it out every tick.
COUNTER = r"""
echo $$ > "$1.pid"
( m=0; while :; do m=$((m+1)); echo $m > "$1.child"; sleep 0.05; done ) &
n=0
while :; do n=$((n+1)); echo $n > "$1"; sleep 0.05; done
"""


@dataclass
class Workload:
    name: str
    count_file: Path
    spec: str  # what `migrate run` is given
    root_pid: int  # on the source host

    def count(self) -> int:
        """The last count written (0 if none yet); a read can catch the file mid-rewrite."""
        for _ in range(50):
            text = self.count_file.read_text().strip() if self.count_file.exists() else ""
            if text.isdigit():
                return int(text)
            time.sleep(0.01)
        return 0


def start(lab: labmod.Lab, host: str, name: str, container: bool) -> Workload:
    """Start the counter on host: a plain tree, or init of its own pid namespace."""
    work = lab.dir / "workloads"
    work.mkdir(exist_ok=True)
    script = work / "counter.sh"
    script.write_text(COUNTER)
    count = work / name
    for f in (count, Path(f"{count}.pid"), Path(f"{count}.child")):
        f.unlink(missing_ok=True)
    if container:
        inner = (
            'umount -l /run/netns 2>/dev/null; exec setsid sh "$1" "$2" </dev/null >/dev/null 2>&1'
        )
        launch = (
            'unshare --pid --fork --mount-proc --ipc --uts sh -c "$1" init "$2" "$3" '
            "</dev/null >/dev/null 2>&1 & echo $!"
        )
        unshare_pid = on(lab, host, launch, inner, str(script), str(count)).strip()
        pid = int(
            wait_for(
                lambda: on(lab, host, 'pgrep -P "$1"', unshare_pid, check=False).strip(),
                what="container init",
            )
        )
        spec = f"pid:{pid}"
    else:
        on(lab, host, 'setsid sh "$1" "$2" </dev/null >/dev/null 2>&1 &', str(script), str(count))
        pidfile = Path(f"{count}.pid")
        wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), what="pidfile")
        pid = int(pidfile.read_text())
        spec = f"pidfile:{pidfile}"
    wl = Workload(name, count, spec, pid)
    wait_for(lambda: wl.count() >= 20, what="the counter to reach 20")
    return wl


def running_pids(lab: labmod.Lab, host: str, count_file: Path) -> list[int]:
    """Pids on host (as it sees them) running the counter on count_file, not stopped."""
    out = on(lab, host, "ps -ww -e -o pid=,stat=,args=")
    return [
        int(line.split()[0])
        for line in out.splitlines()
        if str(count_file) in line and line.split()[1][0] not in "TZ"
    ]


def counter_pids(lab: labmod.Lab, host: str, count_file: Path) -> list[int]:
    """Every pid on host running the counter on count_file, stopped or not."""
    out = on(lab, host, "ps -ww -e -o pid=,args=")
    return [int(ln.split()[0]) for ln in out.splitlines() if str(count_file) in ln]


def netns_of(lab: labmod.Lab, host: str, pid: int) -> str:
    return on(lab, host, 'readlink "/proc/$1/ns/net"', str(pid)).strip()
