"""Fault: a workdir another local user could get into. Images hold the workload's memory, so a
workdir that another user owns (made first, under a world-writable dir), or that would be made
inside a world-writable dir, is refused in pre-flight in one line naming the host and the part,
before anything is frozen or made there."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from orchestrator import lab as labmod
from tests.faults.kit import FaultCase, assert_one_copy, phases

pytestmark = pytest.mark.lab

NOBODY = 65534


@pytest.fixture
def shared_dir(lab: labmod.Lab) -> Iterator[Path]:
    """A world-writable sticky dir (like /tmp) inside the lab, removed at the end."""
    d = lab.dir / "fault-shared"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    d.chmod(0o1777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize(
    ("host", "premade", "says"),
    [
        ("host-b", True, "mig is owned by uid 65534, not root"),  # another user made it first
        ("host-a", False, "fault-shared is writable by all (mode 1777)"),  # one could, first
    ],
)  # fmt: skip
def test_a_workdir_another_user_can_reach_is_refused(
    lab: labmod.Lab,
    shared_dir: Path,
    fault_case: Callable[..., FaultCase],
    host: str,
    premade: bool,
    says: str,
) -> None:
    workdir = shared_dir / "mig"
    if premade:
        workdir.mkdir(mode=0o700)
        os.chown(workdir, NOBODY, NOBODY)
    fc = fault_case(
        f"{host}'s workdir {'made by nobody' if premade else 'to be made'} in a sticky 1777 dir",
        f"fault-wd-{host}", hosts={host: {"workdir": str(workdir)}}, strategy="stopcopy",
    )  # fmt: skip
    out = fc.migrate("host-b")
    fc.ended(out)
    assert out.rc == 1 and out.status == "failed", out
    assert phases(out) == [("preflight", "failed")]
    assert out.error.startswith(f"{host}: workdir {workdir}: "), out.error
    assert says in out.error and "another user could read or swap the images" in out.error
    assert "\n" not in out.error
    assert_one_copy(lab, fc.wl, "host-a", fc.before)
    # Nothing was made there: no images, no lock dir.
    assert sorted(p.name for p in shared_dir.rglob("*")) == (["mig"] if premade else [])
