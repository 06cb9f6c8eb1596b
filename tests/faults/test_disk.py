"""Fault: the destination's disk is too small for the images: known up front (refused in
pre-flight, nothing touched), or filled by someone else while the images are on their way
(rolled back). The destination's workdir is a small tmpfs mounted inside host-b only."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from orchestrator import lab as labmod
from tests.faults.kit import FaultCase, assert_one_copy, journal, leftovers, phases
from tests.labkit import on

pytestmark = pytest.mark.lab

MIB = 32  # the workload's memory: its images are a little more than this


# Fill a disk (another writer's file in the workdir) up to its last 2 MiB.
FILL = """kb=$(df -Pk -- "$1" | awk 'NR == 2 {print $4}')
fallocate -l $(((kb - 2048) * 1024)) -- "$1/ballast"
"""


@pytest.fixture
def small_disk(lab: labmod.Lab) -> Iterator[Callable[[str, str], Path]]:
    """small_disk(host, size): a fresh dir with a tmpfs of that size mounted on it, inside that
    host's mount namespace only; unmounted and removed at the end."""
    made: list[tuple[str, Path]] = []

    def mount(host: str, size: str) -> Path:
        d = lab.dir / "fault-disks" / f"{host}-{len(made)}"
        d.mkdir(parents=True, exist_ok=True)
        made.append((host, d))
        on(lab, host, 'mount -t tmpfs -o size="$2",mode=0700 fault-disk "$1"', str(d), size)
        return d

    yield mount
    for host, d in made:
        if labmod.host_up(lab, host):
            on(lab, host, 'umount -l -- "$1"', str(d), check=False)
        shutil.rmtree(d, ignore_errors=True)


def test_too_small_is_refused_in_preflight(
    lab: labmod.Lab,
    small_disk: Callable[[str, str], Path],  # before fault_case: unmounted after its run ends
    fault_case: Callable[..., FaultCase],
) -> None:
    disk = small_disk("host-b", "2m")
    fc = fault_case(
        f"dst disk 2 MiB, images ~{MIB} MiB", "fault-disk-small", mib=MIB,
        hosts={"host-b": {"workdir": str(disk)}},
    )  # fmt: skip
    wl, before, state = fc.wl, fc.before, fc.state

    out = fc.migrate("host-b")
    fc.ended(out)

    assert out.rc == 1, out
    assert out.status == "failed"
    assert phases(out) == [("preflight", "failed")]
    assert "space" in out.error and "host-b" in out.error, out.error
    assert any("nothing was changed" in n for n in out.notes), out.notes
    c = assert_one_copy(lab, wl, "host-a", before)
    assert c.where() == {"host-a": [wl.root_pid]}
    # Never frozen, nothing made anywhere: not even an empty dir on the small disk.
    begun = [e["name"] for e in journal(state) if e["event"] == "phase" and e["state"] == "begin"]
    assert begun == ["preflight"]
    assert leftovers(lab, out.id, {"host-b": str(disk)}) == []
    assert on(lab, "host-b", 'ls -A -- "$1"', str(disk)) == ""


def test_disk_fills_during_transfer(
    lab: labmod.Lab,
    small_disk: Callable[[str, str], Path],  # before fault_case: unmounted after its run ends
    fault_case: Callable[..., FaultCase],
) -> None:
    """Room enough at pre-flight, but another writer fills the disk while the workload is
    frozen: rsync cannot write the images, the migration rolls back; the error says why."""
    disk = small_disk("host-b", "160m")
    fc = fault_case(
        "dst disk filled by another writer during dump", "fault-disk-fill", mib=MIB,
        hosts={"host-b": {"workdir": str(disk)}}, strategy="stopcopy",
    )  # fmt: skip
    wl, before = fc.wl, fc.before

    run = fc.background("host-b")
    run.wait("dump", "begin")
    # Leave 2 MiB free: far less than the images.
    on(lab, "host-b", FILL, str(disk))
    out = run.finish()
    fc.ended(out)

    assert out.rc == 3, out
    assert out.status == "rolled_back"
    assert ("transfer", "failed") in phases(out), phases(out)
    c = assert_one_copy(lab, wl, "host-a", before)
    assert c.where() == {"host-a": [wl.root_pid]}
    assert leftovers(lab, out.id, {"host-b": str(disk)}) == []
    # The error names the cause: no space on host-b (not only "rsync failed, code 11").
    assert "space" in out.error.lower() and "host-b" in out.error, (
        f"the error does not say host-b's disk is full: {out.error}"
    )


@pytest.mark.parametrize("strategy", ["stopcopy", "stream"])
def test_a_small_source_disk_refuses_only_what_writes_pages_there(
    lab: labmod.Lab,
    small_disk: Callable[[str, str], Path],  # before fault_case: unmounted after its run ends
    fault_case: Callable[..., FaultCase],
    strategy: str,
) -> None:
    """The source's workdir has room for the small images, not the pages: stop-copy (which
    writes them there before the transfer) is refused in pre-flight, naming the source and
    what would fit, before any freeze; stream (pages straight to the destination) moves."""
    disk = small_disk("host-a", "20m")
    fc = fault_case(
        f"src disk 20 MiB, images ~{MIB} MiB, {strategy}", f"fault-srcdisk-{strategy}", mib=MIB,
        hosts={"host-a": {"workdir": str(disk)}}, strategy=strategy,
    )  # fmt: skip
    out = fc.migrate("host-b")
    fc.ended(out)
    if strategy == "stream":
        assert out.rc == 0 and out.status == "succeeded", out
        assert_one_copy(lab, fc.wl, "host-b", fc.before)
        return
    assert out.rc == 1 and out.status == "failed", out
    assert phases(out) == [("preflight", "failed")]
    assert out.error.startswith(f"not enough space on host-a in {disk}: "), out.error
    assert out.error.endswith("(--strategy stream or postcopy write no pages there)"), out.error
    assert any("nothing was changed" in n for n in out.notes), out.notes
    c = assert_one_copy(lab, fc.wl, "host-a", fc.before)
    assert c.where() == {"host-a": [fc.wl.root_pid]}
    assert leftovers(lab, out.id, {"host-a": str(disk)}) == []
