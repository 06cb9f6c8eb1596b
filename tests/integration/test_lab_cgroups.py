"""`migrate lab down` removes the cgroups the container runtimes made inside the lab's hosts:
each host's pid 1 has cgroups of its own (one per hierarchy), LXC nests its monitor and
payload cgroups there, and down removes them all, a frozen container's included."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator import lab as labmod
from tests.containerkit import _LXC_CREATE
from tests.labkit import on, other_lab_up, wait_for

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root"),
]


@pytest.fixture
def own_lab() -> Iterator[labmod.Lab]:
    if other_lab_up():
        pytest.skip("another lab is up on this machine (migbr0 exists): run this module alone")
    base = Path(tempfile.mkdtemp(prefix="migrate-lab-cg-", dir="/run"))
    try:
        yield labmod.up(base / "lab", hosts=1)
    finally:
        labmod.down(base / "lab")
        shutil.rmtree(base, ignore_errors=True)


def cgroup_dirs(pid: int) -> list[Path]:
    """The cgroup directories of pid, in every v1 hierarchy mounted under /sys/fs/cgroup."""
    out = []
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        name = controllers.removeprefix("name=")
        if name and Path("/sys/fs/cgroup", name).is_dir():
            out.append(Path("/sys/fs/cgroup", name) / path.lstrip("/"))
    return out


def test_down_removes_the_cgroups_runtimes_made(
    own_lab: labmod.Lab, rootfs: Path, tmp_path: Path
) -> None:
    lab = own_lab
    conf = tmp_path / "lxc.conf"
    conf.write_text("lxc.net.0.type = empty\n")
    name = "cg-down"
    on(lab, "host-a", _LXC_CREATE, name, str(conf), str(rootfs / "rootfs" / "counter.sh"))
    init = int(wait_for(lambda: on(lab, "host-a", 'lxc-info -n "$1" -p -H', name).strip(),
                        what="the container's init"))  # fmt: skip
    on(lab, "host-a", 'lxc-freeze -n "$1"', name)
    # As seen from outside the lab host (pids differ inside its pid namespace).
    sshd = lab.host("host-a").sshd_pid
    host_cgroups = cgroup_dirs(sshd)
    inside = on(lab, "host-a", 'cat "/proc/$1/cgroup"', str(init))
    payload = [ln.split(":", 2)[2] for ln in inside.splitlines() if "lxc.payload." in ln]
    assert payload, inside
    # LXC's cgroups (monitor, payload) are inside the host's own, in every hierarchy.
    made = [d for d in host_cgroups if d.name.startswith("migrate-lab-")]
    assert made and len(made) == len(host_cgroups), host_cgroups
    lxc_dirs = [p for d in made for p in d.glob("lxc.*") if p.is_dir()]
    assert {p.name for p in lxc_dirs} >= {f"lxc.payload.{name}", f"lxc.monitor.{name}"}
    # On a hybrid host, LXC's cgroups in the v2 hierarchy are at its root, not in the host's.
    v2 = [Path(ln.split()[4]) for ln in Path("/proc/self/mountinfo").read_text().splitlines()
          if ln.split()[ln.split().index("-") + 1] == "cgroup2"]  # fmt: skip
    v2_dirs = [p for root in v2 for p in root.glob(f"lxc.*.{name}*") if p.is_dir()]
    labmod.down(lab.dir)
    assert not [d for d in made if d.exists()], made
    assert not [d for d in lxc_dirs if d.exists()], lxc_dirs
    assert not [d for d in v2_dirs if d.exists()], v2_dirs
