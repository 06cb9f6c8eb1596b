"""End to end: real lab hosts (netns + sshd), real CRIU, real rsync, the real CLI."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from orchestrator import lab as labmod
from tests.integration.conftest import migrate, needs_root, on, wait_for

pytestmark = [needs_root, pytest.mark.lab]

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
        text = self.count_file.read_text().strip() if self.count_file.exists() else ""
        return int(text) if text.isdigit() else 0


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


@pytest.fixture
def cleanup(lab: labmod.Lab) -> Iterator[list[Path]]:
    """Kill any counter a test leaves behind, on every host, by its pid."""
    files: list[Path] = []
    yield files
    for f in files:
        for host in lab.names:
            pids = counter_pids(lab, host, f)
            if pids:
                on(lab, host, 'kill -KILL "$@"', *map(str, pids), check=False)


@pytest.mark.parametrize("container", [False, True], ids=["process-tree", "pid-namespace"])
def test_migrates_and_keeps_state(lab: labmod.Lab, cleanup: list[Path], container: bool) -> None:
    wl = start(lab, "host-a", f"counter-{int(container)}", container)
    cleanup.append(wl.count_file)
    before = wl.count()

    r = migrate("run", wl.spec, "host-a", "host-b", "--json", config=lab.config_path)
    report = json.loads(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr
    assert report["status"] == "succeeded"
    assert [p["name"] for p in report["phases"]] == [
        "preflight", "prepare", "dump", "transfer", "restore", "verify", "confirm",
    ]  # fmt: skip
    assert report["bytes_transferred"] > 0 and report["downtime_ms"] > 0

    # It runs on host-b, in host-b's network namespace, and is gone from host-a.
    pid_b = report["restored_pid"]
    assert pid_b in running_pids(lab, "host-b", wl.count_file)
    assert netns_of(lab, "host-b", pid_b) != netns_of(lab, "host-a", 1)
    assert netns_of(lab, "host-b", pid_b) == netns_of(lab, "host-b", 1)
    assert running_pids(lab, "host-a", wl.count_file) == []
    # It kept its in-memory state: counting on from where it was, not from zero.
    after = wl.count()
    wait_for(lambda: wl.count() > after + 5, what="the counter to keep counting on host-b")
    assert after >= before
    # Images (process memory) are gone from both hosts.
    for host in lab.hosts:
        assert not list((host.workdir / "images").glob("*")), host.name


def test_restore_failure_rolls_back(lab: labmod.Lab, cleanup: list[Path], tmp_path: Path) -> None:
    wl = start(lab, "host-a", "counter-rollback", container=False)
    cleanup.append(wl.count_file)
    broken = tmp_path / "criu-broken-restore"
    broken.write_text(
        '#!/bin/sh\nif [ "$1" = restore ]; then\n'
        '  echo "Error (injected): restore refused by the test" >&2; exit 1\nfi\n'
        'exec criu "$@"\n'
    )
    broken.chmod(0o755)
    config = yaml.safe_load(lab.config_path.read_text())
    config["hosts"]["host-b"]["criu"] = str(broken)
    cfg_path = tmp_path / "migrate.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    before = wl.count()

    r = migrate("run", wl.spec, "host-a", "host-b", "--json", config=cfg_path)
    report = json.loads(r.stdout)
    assert r.returncode == 3, r.stdout + r.stderr
    assert report["status"] == "rolled_back"
    assert "criu restore failed on host-b" in report["error"]
    assert any("injected" in line for line in report["criu_errors"])
    assert running_pids(lab, "host-a", wl.count_file) != []
    assert wl.root_pid in running_pids(lab, "host-a", wl.count_file)
    assert running_pids(lab, "host-b", wl.count_file) == []
    now = wl.count()
    wait_for(lambda: wl.count() > now + 5, what="the counter to keep counting on host-a")
    assert now >= before
    for host in lab.hosts:
        assert not list((host.workdir / "images").glob("*")), host.name


def test_dry_run_changes_nothing(lab: labmod.Lab, cleanup: list[Path]) -> None:
    wl = start(lab, "host-a", "counter-dry", container=False)
    cleanup.append(wl.count_file)
    r = migrate("run", wl.spec, "host-a", "host-b", "--dry-run", config=lab.config_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "host-a$ criu dump -t " + str(wl.root_pid) in r.stdout
    assert any(
        ln.strip().startswith("host-b$ ") and "criu restore" in ln for ln in r.stdout.split("\n")
    )
    assert "nothing was changed" in r.stdout
    assert wl.root_pid in running_pids(lab, "host-a", wl.count_file)
    for host in lab.hosts:
        assert not (host.workdir / "images").exists() or not list(
            (host.workdir / "images").glob("*")
        )


def test_check_and_strict_host_keys(lab: labmod.Lab, tmp_path: Path) -> None:
    r = migrate("check", "host-a", "host-b", config=lab.config_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "4.2" in r.stdout
    # A known_hosts whose key for host-a is another key: refused, clearly.
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    pub = (tmp_path / "other.pub").read_text().split()
    bad = tmp_path / "known_hosts"
    bad.write_text(f"{lab.host('host-a').address} {pub[0]} {pub[1]}\n")
    config = yaml.safe_load(lab.config_path.read_text())
    config["hosts"]["host-a"]["known_hosts"] = str(bad)
    cfg_path = tmp_path / "migrate.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    r = migrate("check", "host-a", config=cfg_path)
    assert r.returncode == 1
    assert "host key CHANGED" in r.stdout
