"""File locks move: a workload holding a POSIX, flock or OFD lock on a file both lab hosts see
(the lab's hosts share the machine's filesystem and kernel: one lock table) moves a->b->a, its
lock held on the destination and free nowhere in between; a failed restore rolls it back from
its images, lock and memory kept. Real lab, real CRIU, the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator import lab as labmod
from tests.labkit import NETAPPS, PYTHON, failing_restore_config, migrate, on, wait_for

pytestmark = pytest.mark.lab

# Exits 0 if it could take the lock itself (nobody held it), 1 if it is held.
_TRY = r"""
import fcntl, os, struct, sys
fd = os.open(sys.argv[2], os.O_RDWR)
try:
    if sys.argv[1] == "flock":
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    elif sys.argv[1] == "posix":
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    else:
        fcntl.fcntl(fd, 37, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 0, 0))
except OSError:
    sys.exit(1)
"""


class Locker:
    """tests/netapps/locker.py on a lab host, holding MODE's lock on a shared file."""

    def __init__(self, lab: labmod.Lab, mode: str, name: str) -> None:
        self.lab, self.mode = lab, mode
        work = lab.dir / "workloads"
        work.mkdir(exist_ok=True)
        self.path = work / name
        self.count_file = Path(f"{self.path}.count")
        for f in (self.path, self.count_file):
            f.unlink(missing_ok=True)

    def start(self, host: str) -> int:
        on(self.lab, host, 'setsid "$@" </dev/null >/dev/null 2>&1 &', PYTHON,
           str(NETAPPS / "locker.py"), self.mode, str(self.path))  # fmt: skip
        wait_for(lambda: self.count() > 5, what="the locker to count")
        return self.pids(host)[0]

    def pids(self, host: str) -> list[int]:
        out = on(self.lab, host, "ps -ww -e -o pid=,stat=,args=")
        mine = [ln.split() for ln in out.splitlines() if f"locker.py {self.mode} {self.path}" in ln]
        return [int(w[0]) for w in mine if w[1][0] != "Z"]

    def count(self) -> int:
        text = self.count_file.read_text().strip() if self.count_file.exists() else ""
        return int(text) if text.isdigit() else 0

    def held(self) -> bool:
        """Whether someone holds the lock (tried from the lab's client, a third namespace)."""
        r = on(self.lab, labmod.CLIENT, f'{PYTHON} -c "$1" "$2" "$3"; echo $?', _TRY,
               self.mode, str(self.path))  # fmt: skip
        return r.strip() == "1"

    def counting(self) -> None:
        now = self.count()
        wait_for(lambda: self.count() > now + 5, what="the locker to keep counting")


@pytest.fixture
def lockers(lab: labmod.Lab):  # type: ignore[no-untyped-def]
    made: list[Locker] = []
    yield made
    for lk in made:
        for host in lab.names:
            pids = lk.pids(host) if lab.host(host).sshd_pid else []
            if pids:
                on(lab, host, 'kill -KILL "$@"', *map(str, pids), check=False)


def move(lk: Locker, pid: int, src: str, dst: str, config: Path) -> dict:  # type: ignore[type-arg]
    r = migrate("run", f"pid:{pid}", src, dst, "--json", config=config, timeout=120)
    report: dict = json.loads(r.stdout)  # type: ignore[type-arg]
    assert r.returncode == 0, r.stdout + r.stderr
    return report


@pytest.mark.parametrize("mode", ["posix", "flock", "ofd"])
def test_lock_holder_moves_there_and_back(
    lab: labmod.Lab, lockers: list[Locker], mode: str, record_property: pytest.RecordProperty
) -> None:
    lk = Locker(lab, mode, f"lock-{mode}")
    lockers.append(lk)
    pid = lk.start("host-a")
    assert lk.held()
    check = migrate("check", f"pid:{pid}", "host-a", "host-b", config=lab.config_path)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"lock: {lk.path}" in check.stdout
    freezes = []
    for src, dst in (("host-a", "host-b"), ("host-b", "host-a")):
        before = lk.count()
        report = move(lk, pid, src, dst, lab.config_path)
        freezes.append(report["downtime_ms"])
        pid = report["restored_pid"]
        assert lk.pids(dst) == [pid] and lk.pids(src) == []  # one copy, never two
        assert lk.held()  # the restored copy holds the lock again
        lk.counting()
        assert lk.count() >= before  # its memory came along
    # Frozen for moments, never for the command timeout (the restore did not wait on the lock).
    assert max(freezes) < 20_000, freezes
    record_property("measured", f"{mode} lock a->b->a freezes {freezes} ms")


def test_lock_holder_rolls_back_from_its_images(
    lab: labmod.Lab, lockers: list[Locker], tmp_path: Path
) -> None:
    lk = Locker(lab, "posix", "lock-rollback")
    lockers.append(lk)
    pid = lk.start("host-a")
    before = lk.count()
    r = migrate("run", f"pid:{pid}", "host-a", "host-b", "--json",
                config=failing_restore_config(lab, tmp_path), timeout=120)  # fmt: skip
    report = json.loads(r.stdout)
    assert r.returncode == 3, r.stdout + r.stderr
    assert report["status"] == "rolled_back"
    # The source copy ended at the dump; its images brought it back on host-a, lock and all.
    assert lk.pids("host-a") == [pid] and lk.pids("host-b") == []
    assert lk.held()
    lk.counting()
    assert lk.count() >= before
    for host in lab.hosts:
        assert not list((host.workdir / "images").glob("*")), host.name
