"""A cgroup of its own for each lab host, in every hierarchy of this machine: the host's pid 1
joins it, so the cgroups its container runtimes make relative to their own (LXC's
lxc.monitor.NAME, lxc.payload.NAME, lxc.pivot) nest inside it, and `down` removes them all."""

from __future__ import annotations

import os
import time
from pathlib import Path

from .state import LabError

ROOT = "/sys/fs/cgroup"


def hierarchies() -> dict[str, str]:
    """Mount point -> this process's cgroup in it, for every cgroup fs mounted under ROOT."""
    ours: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        ours[controllers.removeprefix("name=") or "unified"] = path
    found: dict[str, str] = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        fstype = fields[fields.index("-") + 1]
        point = fields[4]
        # Not the v2 hierarchy of a hybrid host: LXC 5 passes CRIU a broken --cgroup-root for
        # a container below its root there (it has no controllers).
        if fstype != "cgroup" or not point.startswith(ROOT):
            continue
        options = fields[fields.index("-") + 3].split(",")
        key = ",".join(o.removeprefix("name=") for o in options if _controller(o, ours))
        if key in ours:
            found[point] = ours[key]
    return found


def _controller(option: str, ours: dict[str, str]) -> bool:
    name = option.removeprefix("name=")
    return any(name in key.split(",") for key in ours)


def paths(name: str) -> list[str]:
    """The cgroup directories host `name` gets (one per hierarchy), not made yet."""
    return [f"{point}{mine.rstrip('/')}/{name}" for point, mine in sorted(hierarchies().items())]


def make_and_enter(path: str, pid: int) -> None:
    """Make the cgroup at path (cpuset's cpus and mems copied from its parent) and move pid
    into it."""
    os.makedirs(path, exist_ok=True)
    for knob in ("cpuset.cpus", "cpuset.mems"):
        mine = Path(path, knob)
        if mine.exists() and not mine.read_text().strip():
            mine.write_text(Path(path).parent.joinpath(knob).read_text())
    try:
        Path(path, "cgroup.procs").write_text(f"{pid}\n")
    except OSError as e:
        raise LabError(f"cannot move pid {pid} into cgroup {path}: {e}") from e


def remove(path: str, timeout: float = 10) -> None:
    """Remove the cgroup at path and every cgroup below it (deepest first). Their processes
    die with the host's pid namespace; a frozen one only once thawed: each is thawed first,
    then removed when empty (LabError after timeout)."""
    if not os.path.isdir(path):
        return
    thaw(path)
    below = _below(path)
    deadline = time.monotonic() + timeout
    for cg in [*below, path]:
        while True:
            try:
                os.rmdir(cg)
                break
            except FileNotFoundError:
                break
            except OSError as e:
                if time.monotonic() > deadline:
                    raise LabError(f"cannot remove cgroup {cg}: {e}") from e
                time.sleep(0.05)


def lxc_v2() -> list[str]:
    """LXC's own cgroups (lxc.payload.NAME, lxc.monitor.NAME) in the v2 hierarchy of a hybrid
    host, which the hosts' cgroups leave out (see hierarchies): `up` notes those already
    there, `down` removes the empty ones made since."""
    v2 = next((fields[4] for fields in _mounts() if fields[fields.index("-") + 1] == "cgroup2"
               and fields[4].startswith(ROOT)), None)  # fmt: skip
    if not v2:
        return []
    paths = [os.path.join(v2, e) for e in sorted(os.listdir(v2))
             if e.startswith(("lxc.payload.", "lxc.monitor."))]  # fmt: skip
    return [p for p in paths if os.path.isdir(p)]


def _mounts() -> list[list[str]]:
    return [line.split() for line in Path("/proc/self/mountinfo").read_text().splitlines()]


def _below(path: str) -> list[str]:
    return [os.path.join(top, d) for top, dirs, _ in os.walk(path, topdown=False) for d in dirs]


def thaw(path: str) -> None:
    """Thaw the cgroup at path and every one below it (freezer v1 and v2; best effort)."""
    for cg in [path, *_below(path)] if os.path.isdir(path) else []:
        for knob, value in (("freezer.state", "THAWED"), ("cgroup.freeze", "0")):
            try:
                Path(cg, knob).write_text(value)
            except OSError:
                pass
