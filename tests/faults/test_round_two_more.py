"""Never lose a workload, round two, more faults; each held at the phase it needs (a gate: a
health check or a criu that waits for a file; a rate-limited transfer; a host whose ssh stops
answering), never by a sleep.

- the controller's ssh connection to the source drops while it lives, during the transfer and
  at the end of the dump: it rolls back (the error names the lost connection), never two copies;
- two `recover`s of one dead controller's migration at once: the second is refused, in one
  line, and changes nothing;
- the controller's state dir read-only at dump: rolled back in one line, recover ends it;
- the state dir full (tmpfs) at verify: rolled back in one line, recover ends it;
- the journal unwritable just as confirm begins: rolled back, not "succeeded" with two copies;
- the controller SIGKILLed during its rollback (the source stopped; or, with its own network,
  killed and not yet restored from its images): recover resumes or restores it;
- the link between the hosts cut during the rollback: the source is resumed all the same.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator import lab as labmod
from tests.faults.kit import (
    Background,
    Case,
    FaultCase,
    assert_one_copy,
    census,
    drop_connections,
    fault_config,
    gated_config,
    holding_criu,
    image_dirs,
    leftovers,
    migration_id,
    processes_mentioning,
    run_migrate,
    unblock_ssh,
    wait_event,
)  # fmt: skip
from tests.labkit import BROKEN_CRIU, Workload, on, wait_for

pytestmark = pytest.mark.lab

STOPCOPY = ("--json", "--strategy", "stopcopy")


def run_gated(fc: FaultCase, cfg: Path, dst: str = "host-b") -> Background:
    """`migrate run gated host-a DST --json --strategy stopcopy` in the background."""
    return fc.start("run", "gated", "host-a", dst, *STOPCOPY, config=cfg, state_dir=fc.state)


def where_it_should_be(status: str | None) -> str:
    """Succeeded: on host-b; rolled back: on host-a."""
    assert status in ("succeeded", "rolled_back"), status
    return "host-b" if status == "succeeded" else "host-a"


@pytest.mark.parametrize("agent", [True, False], ids=["image-pipe", "rsync"])
def test_source_connection_dropped_during_transfer(
    lab: labmod.Lab, fault_case: Callable[..., FaultCase], tmp_path: Path, agent: bool
) -> None:
    """The images go at 1 MiB/s (--bwlimit), so the transfer lasts some 20 s: once host-b is
    writing them (the image pipe, from host-a's agent) or host-a's rsync runs (no agents),
    every ssh connection to host-a is dropped. Either the transfer is retried and the lock
    taken again before restore, and the move succeeds; or it stops there and rolls back (what
    it does now: the connection is lost, and a command that may have acted is not run again).
    One copy either way, nothing left (no orphaned rsync or half-written image either)."""
    how = "image pipe" if agent else "rsync"
    fc = fault_case(f"controller's ssh to the source dropped during transfer ({how} running)",
                    f"fault-drop-transfer-{int(agent)}", mib=20)  # fmt: skip
    cfg = gated_config(lab, tmp_path / "slow.yaml", fc.wl, fc.state,
                       policy={"bwlimit": 1024, "agent": agent})  # fmt: skip
    run = run_gated(fc, cfg)
    run.wait("transfer")
    mid = migration_id(run)
    images_b = lab.host("host-b").workdir / "images" / mid
    if agent:
        wait_for(lambda: any(p.stat().st_size > 1 << 20 for p in images_b.glob(".*.part")),
                 30, "host-b to be writing the images")  # fmt: skip
    else:
        wait_for(lambda: any("rsync" in p for p in processes_mentioning(lab, "host-a", mid)),
                 30, "the transfer's rsync to run on host-a")  # fmt: skip
    before = fc.wl.count()
    drop_connections(lab, "host-a")
    assert run.proc.poll() is None, "the transfer was still going on when its connection dropped"
    out = run.finish()
    fc.ended(out)
    assert out.rc in (0, 3) and "Traceback" not in out.stderr, out
    host = where_it_should_be(out.status)
    if out.status == "succeeded":
        assert any("taken again before restore" in n for n in out.notes), out.notes
    else:
        # (the final push is rsync inside the checksumming script)
        assert "host-a" in out.error and "connection lost running" in out.error, out.error
    assert_one_copy(lab, fc.wl, host, before)
    fc.count()
    assert leftovers(lab, out.id) == []


def test_source_connection_dropped_at_the_end_of_the_dump(
    lab: labmod.Lab, fault_case: Callable[..., FaultCase], tmp_path: Path, gate: Path
) -> None:
    """criu dump has run (the workload is stopped on host-a, its images whole) but is held
    before it exits: the controller's connections to host-a drop then, so it never learns how
    the dump ended. It must roll back (dump is never retried) and resume the stopped source."""
    fc = fault_case("controller's ssh to the source dropped at the end of criu dump",
                    "fault-drop-dump")  # fmt: skip
    criu = holding_criu(tmp_path / "criu-holds-dump", "dump", gate)
    cfg = gated_config(lab, tmp_path / "hold.yaml", fc.wl, fc.state,
                       hosts={"host-a": {"criu": str(criu)}})  # fmt: skip
    run = run_gated(fc, cfg)
    run.wait("dump")
    wait_for(lambda: Path(f"{gate}.held").exists(), 60, "criu dump to have run")
    frozen = census(lab, fc.wl.count_file)
    assert frozen.stopped.get("host-a"), f"the dump left the source stopped: {frozen}"
    before = fc.wl.count()
    drop_connections(lab, "host-a")
    gate.touch()  # the held criu exits now (its session is gone: nobody hears it)
    out = run.finish()
    fc.ended(out)
    assert out.rc == 3 and out.status == "rolled_back", out
    assert "Traceback" not in out.stderr, out.stderr
    assert "host-a" in out.error and "connection lost running" in out.error, out.error
    assert "dump" in out.error, out.error
    assert_one_copy(lab, fc.wl, "host-a", before)
    fc.count()
    assert leftovers(lab, out.id) == []


def test_second_recover_at_once_is_refused_and_changes_nothing(
    lab: labmod.Lab, fault_case: Callable[..., FaultCase], tmp_path: Path
) -> None:
    """The controller is SIGKILLed as dump begins; a first `recover` is busy with it (the test
    holds the journal's flock, as a live recover does): a second one is refused in one line
    ("is live") and touches nothing, neither the journal nor any host. Once the first is done
    (the flock released), recover rolls back: one copy on host-a, counting on."""
    fc = fault_case("2nd recover while a 1st holds the journal (controller killed at dump)",
                    "fault-two-recovers")  # fmt: skip
    cfg = gated_config(lab, tmp_path / "two.yaml", fc.wl, fc.state)
    run = run_gated(fc, cfg)
    run.wait("dump")
    run.stop()  # SIGKILL, by its pid
    mid = migration_id(run)
    # The dead controller's criu may still be dumping: let the hosts settle first.
    wait_for(lambda: not on(lab, "host-a", "pgrep -x criu || true").strip(), 60, "criu to end")
    path = fc.state / "journal" / f"{mid}.jsonl"
    seen, written = census(lab, fc.wl.count_file), path.read_bytes()
    images = {h: image_dirs(lab, h) for h in lab.names}

    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        second = run_migrate("recover", mid, config=cfg)
        assert second.rc == 1, second
        assert "is live" in second.stderr and "Traceback" not in second.stderr, second
        assert len(second.stderr.strip().splitlines()) == 1, second.stderr
        assert path.read_bytes() == written, "the refused recover wrote to the journal"
        again = census(lab, fc.wl.count_file)
        assert (again.running, again.stopped) == (seen.running, seen.stopped), f"{seen} -> {again}"
        assert {h: image_dirs(lab, h) for h in lab.names} == images
    finally:
        os.close(fd)  # the first recover is done

    rec = run_migrate("recover", mid, "--json", config=cfg)
    fc.case.outcome = f"2nd recover: exit {second.rc}; then recover: {rec.summary()}"
    assert rec.rc == 3 and rec.status == "rolled_back", rec
    assert_one_copy(lab, fc.wl, "host-a", fc.before)
    fc.count()
    assert leftovers(lab, mid) == []


def read_only(mounts: Callable[..., None], path: Path) -> None:
    """Make path read-only for the controller (a read-only bind mount over it)."""
    mounts("--bind", str(path), str(path))
    subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True)


def test_state_dir_read_only_at_dump_rolls_back_in_one_line(
    lab: labmod.Lab, fault_case: Callable[..., FaultCase], tmp_path: Path, gate: Path,
    mounts: Callable[..., None],
) -> None:  # fmt: skip
    """criu dump has run and is held before it exits; the journal's dir turns read-only then,
    so `dump done` cannot be written: rolled back (the stopped source resumed), one line, no
    traceback. The journal cannot be ended either: once writable again, `recover` ends it."""
    fc = fault_case("controller's state dir read-only at dump", "fault-ro-dump")
    criu = holding_criu(tmp_path / "criu-holds-dump", "dump", gate)
    cfg = gated_config(lab, tmp_path / "ro.yaml", fc.wl, fc.state,
                       hosts={"host-a": {"criu": str(criu)}})  # fmt: skip
    run = run_gated(fc, cfg)
    run.wait("dump")
    wait_for(lambda: Path(f"{gate}.held").exists(), 60, "criu dump to have run")
    before = fc.wl.count()
    journal_dir = fc.state / "journal"
    read_only(mounts, journal_dir)
    gate.touch()
    out = run.finish()
    fc.ended(out)
    assert out.rc == 3 and out.status == "rolled_back", out
    assert "cannot write the journal" in out.error and "Read-only file system" in out.error
    assert "\n" not in out.error and "Traceback" not in out.stderr, out
    assert_one_copy(lab, fc.wl, "host-a", before)

    subprocess.run(["umount", str(journal_dir)], check=True)  # writable again
    rec = run_migrate("recover", out.id, "--json", config=cfg)
    fc.case.outcome += f"; recover: {rec.summary()}"
    assert rec.rc in (0, 3) and "Traceback" not in rec.stderr, rec
    hist = json.loads(run_migrate("history", "--json", config=cfg).stdout)
    assert next(h for h in hist if h["id"] == out.id)["status"], "still open after recover"
    assert_one_copy(lab, fc.wl, "host-a", before)
    fc.count()
    assert leftovers(lab, out.id) == []


def test_journal_unwritable_as_confirm_begins_never_leaves_two_copies(
    lab: labmod.Lab, fault_case: Callable[..., FaultCase], tmp_path: Path, gate: Path
) -> None:
    """Held at verify (gate), the controller's journal is capped (RLIMIT_FSIZE, set on it
    with prlimit) just past room for `verify done`: the next record, `confirm begin`, cannot be
    written, before confirm acts. Nothing is confirmed, so it rolls back like any journal
    failure; never `succeeded` with the source left stopped beside the destination's copy
    (what it did before: confirm was a cleanup phase, its failure only noted)."""
    fc = fault_case("journal unwritable (file size limit) as confirm begins",
                    "fault-fsize-confirm")  # fmt: skip
    cfg = gated_config(lab, tmp_path / "fsize.yaml", fc.wl, fc.state, gate=gate)
    run = run_gated(fc, cfg)
    run.wait("verify")
    before = fc.wl.count()
    path = fc.state / "journal" / f"{migration_id(run)}.jsonl"
    lines = path.read_text().splitlines()
    # `verify done` is `verify begin` less its stage (13 bytes): it fits; `confirm begin` not.
    cap = path.stat().st_size + len(lines[-1]) + 50
    subprocess.run(["prlimit", f"--pid={run.proc.pid}", f"--fsize={cap}"], check=True)
    gate.touch()
    out = run.finish()
    fc.ended(out)
    assert "Traceback" not in out.stderr, out.stderr
    assert any("File too large" in n for n in [out.error, *out.notes]), out
    c = fc.count()
    assert not any(c.stopped.values()), f"{out.status}, but a stopped copy is left: {c}"
    assert out.rc == 3 and out.status == "rolled_back", out
    host = "host-a"
    assert_one_copy(lab, fc.wl, host, before)
    hist = json.loads(run_migrate("history", "--json", config=cfg).stdout)
    if next(h for h in hist if h["id"] == out.id)["status"] is None:
        rec = run_migrate("recover", out.id, "--json", config=cfg)
        fc.case.outcome += f"; recover: {rec.summary()}"
        assert rec.rc in (0, 3), rec
        assert_one_copy(lab, fc.wl, host, before)
    assert leftovers(lab, out.id) == []


def fill(directory: Path) -> None:
    """Fill the file system of directory up (a ballast file, written until ENOSPC)."""
    fd = os.open(directory / "ballast", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC, e
    finally:
        os.close(fd)


def test_state_dir_full_at_verify_never_loses_the_workload(
    lab: labmod.Lab, fault_case: Callable[..., FaultCase], tmp_path: Path, gate: Path,
    mounts: Callable[..., None],
) -> None:  # fmt: skip
    """The state dir is a 64 KiB tmpfs, filled up (another writer) while the run is held at
    verify. A record that fits in the slack of the journal's last page would still be
    written, so the test first fills that slack with a blank line (the journal skips blank
    lines): `verify done` then needs a new page and fails; the run rolls back in one line, no
    traceback; with room again, recover ends the journal. One copy on host-a, nothing left."""
    fc = fault_case("controller's state dir (tmpfs 64k) full at verify", "fault-full-verify")
    fc.state.mkdir()
    mounts("-t", "tmpfs", "-o", "size=64k,mode=0700", "fault-state", str(fc.state))
    health = f'while [ ! -e "{gate}" ]; do sleep 0.05; done'
    cfg = fault_config(lab, tmp_path / "full.yaml", state_dir=fc.state,
                       policy={"command_timeout": 120},
                       workloads={"gated": {"pidfile": f"{fc.wl.count_file}.pid",
                                            "health": health}})  # fmt: skip
    run = run_gated(fc, cfg)
    run.wait("verify")
    before = fc.wl.count()
    path = fc.state / "journal" / f"{migration_id(run)}.jsonl"
    slack = -path.stat().st_size % 4096
    if slack:  # the last page full: the next record needs a new one
        with open(path, "a") as f:
            f.write(" " * (slack - 1) + "\n")
    fill(fc.state)
    slack, line = -path.stat().st_size % 4096, len(path.read_text().splitlines()[-1]) + 1
    fc.case.fault += f" (journal page slack {slack} B, lines ~{line} B)"
    gate.touch()
    out = run.finish()
    fc.ended(out)
    assert out.rc in (0, 3) and "Traceback" not in out.stderr, out
    assert "\n" not in out.error, out.error
    assert slack == 0, f"`verify done` (~{line} B) would fit in {slack} B"
    assert out.rc == 3 and out.status == "rolled_back", out
    assert "No space left on device" in out.error, out.error
    host = "host-a"
    assert_one_copy(lab, fc.wl, host, before)

    (fc.state / "ballast").unlink()  # room again
    hist = json.loads(run_migrate("history", "--json", config=cfg).stdout)
    if next(h for h in hist if h["id"] == out.id)["status"] is None:
        rec = run_migrate("recover", out.id, "--json", config=cfg)
        fc.case.outcome += f"; recover: {rec.summary()}"
        assert rec.rc in (0, 3) and "Traceback" not in rec.stderr, rec
        assert_one_copy(lab, fc.wl, host, before)
    fc.count()
    assert leftovers(lab, out.id) == []


def broken_restore(tmp_path: Path) -> str:
    """A criu whose restore fails (tests.labkit.BROKEN_CRIU); its path."""
    broken = tmp_path / "criu-fails-restore"
    broken.write_text(BROKEN_CRIU)
    broken.chmod(0o755)
    return str(broken)


def test_controller_killed_during_its_rollback_then_recover(
    lab: labmod.Lab, fault_case: Callable[..., FaultCase], tmp_path: Path,
    ssh_blocks: Callable[[str], None],
) -> None:  # fmt: skip
    """The restore fails on host-b, so the controller rolls back; host-a's ssh stops answering
    as the restore begins (packets dropped), so the rollback hangs in resuming the stopped
    source; the controller is SIGKILLed there (its journal shows `rollback` and the undo of
    restore). With host-a back, `recover` resumes the source: one copy, its state kept."""
    fc = fault_case("controller SIGKILLed during its rollback (restore failed, source stopped)",
                    "fault-kill-rollback")  # fmt: skip
    cfg = gated_config(lab, tmp_path / "broken.yaml", fc.wl, fc.state,
                       hosts={"host-b": {"criu": broken_restore(tmp_path)}})  # fmt: skip
    run = run_gated(fc, cfg)
    run.wait("restore")
    ssh_blocks("host-a")  # the rollback's next step on host-a hangs
    mid = migration_id(run)
    wait_event(run, lambda e: e.get("event") == "rollback", "the rollback")
    wait_event(run, lambda e: e.get("event") == "undo" and e.get("name") == "restore",
               "the undo of restore")  # fmt: skip
    run.stop()  # SIGKILL, by its pid, while it waits on host-a
    held = census(lab, fc.wl.count_file)
    fc.case.fault += f" [when killed: {held}]"
    assert held.stopped.get("host-a"), f"the source was not left stopped: {held}"
    unblock_ssh(lab, "host-a")

    rec = run_migrate("recover", mid, "--json", config=cfg)
    fc.case.outcome = f"controller killed; recover: {rec.summary()}"
    assert rec.rc == 3 and rec.status == "rolled_back", rec
    assert "Traceback" not in rec.stderr, rec.stderr
    assert_one_copy(lab, fc.wl, "host-a", fc.before)
    fc.count()
    assert leftovers(lab, mid) == []


@pytest.mark.parametrize("mode", ["drop", "reject"])
def test_link_cut_during_rollback_still_resumes_the_source(
    lab: labmod.Lab, fault_case: Callable[..., FaultCase], tmp_path: Path,
    links: Callable[..., None], mode: str,
) -> None:  # fmt: skip
    """The link host-a <-> host-b is cut (packets dropped, or refused) as the restore begins,
    the images already on host-b; the restore fails there, and the whole rollback runs with
    the link cut (its own ssh master between the hosts among what it closes): the source is
    resumed all the same, one copy, nothing left."""
    fc = fault_case(f"link a-b cut ({mode}) during the rollback (restore failed on host-b)",
                    f"fault-cut-rollback-{mode}")  # fmt: skip
    cfg = gated_config(lab, tmp_path / "broken.yaml", fc.wl, fc.state,
                       hosts={"host-b": {"criu": broken_restore(tmp_path)}})  # fmt: skip
    run = run_gated(fc, cfg)
    run.wait("restore")
    links("host-a", "host-b", mode)
    out = run.finish()
    fc.ended(out)
    assert out.rc == 3 and out.status == "rolled_back", out
    assert "restore" in out.error and "host-b" in out.error, out.error
    assert "Traceback" not in out.stderr, out.stderr
    assert_one_copy(lab, fc.wl, "host-a", fc.before)
    fc.count()
    assert leftovers(lab, out.id) == []


def test_controller_killed_while_its_rollback_restores_the_source_then_recover(
    lab: labmod.Lab, case: Case, tmp_path: Path, gate: Path,
    net_counter: Callable[..., Workload],
    background: Callable[..., Background],
) -> None:  # fmt: skip
    """A workload with its own network is rolled back by killing its stopped source and
    restoring it from its images. The restore fails on host-b; the rollback's own restore on
    host-a is held before criu runs (the source is killed: its images are the only copy), and
    the controller is SIGKILLed there. `recover` restores it from those images: one copy on
    host-a, counting on from the dump."""
    case.fault = "controller SIGKILLed in its rollback, the source killed, its restore not run"
    wl = net_counter("netcounter", "198.18.0.62", "02:6d:67:00:05:62", "vrt3")
    hold = holding_criu(tmp_path / "criu-holds-restore", "restore", gate, before=True)
    state = tmp_path / "state"
    hosts = {"host-a": {"criu": str(hold)}, "host-b": {"criu": broken_restore(tmp_path)}}
    cfg = fault_config(lab, tmp_path / "held.yaml", state_dir=state, hosts=hosts)
    run = background("run", wl.spec, "host-a", "host-b", *STOPCOPY, config=cfg, state_dir=state)
    mid = migration_id(run)
    wait_for(lambda: Path(f"{gate}.held").exists(), 90, "the rollback's restore on host-a")
    run.stop()  # SIGKILL, by its pid
    # The held criu would restore the source once the gate opens: the controller died before
    # that, so it must not (its wrapper is killed, by pid; the images are the only copy).
    held = on(lab, "host-a", 'pgrep -f -- "$1" || true', str(hold)).split()
    if held:
        on(lab, "host-a", 'kill -KILL "$@"', *held, check=False)
    dumped = wl.count()  # what the images hold
    killed = census(lab, wl.count_file)
    case.fault += f" [when killed: {killed}]"
    assert killed.copies == 0, f"the source should exist only as its images: {killed}"
    assert any(mid in d for d in image_dirs(lab, "host-a")), "the source's images are kept"

    good = fault_config(lab, tmp_path / "good.yaml", state_dir=state)
    rec = run_migrate("recover", mid, "--json", config=good)
    case.outcome = f"controller killed; recover: {rec.summary()}"
    assert rec.rc == 3 and rec.status == "rolled_back", rec
    assert "Traceback" not in rec.stderr, rec.stderr
    c = assert_one_copy(lab, wl, "host-a", dumped)
    case.counted(c)
    assert leftovers(lab, mid) == []
