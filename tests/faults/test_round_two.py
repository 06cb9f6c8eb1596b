"""Never lose a workload, round two: the faults issue 13 found, each held at the phase it needs
by a gate (a health check that waits for a file), never by a sleep.

- the controller's connection to the source drops mid-migration: the lock is taken again (or
  the migration stops), and a second controller meanwhile is refused;
- `recover` while the controller lives changes nothing;
- restore fails on both hosts for a workload with its own network: the rollback's own restore
  fails too, the images are kept and the journal stays open, and `recover` brings it back;
- the controller's state dir turns read-only mid-migration: one line, rolled back.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from orchestrator import lab as labmod
from tests.faults.kit import (
    Background,
    Case,
    assert_one_copy,
    census,
    drop_connections,
    fault_config,
    gated_config,
    image_dirs,
    leftovers,
    run_migrate,
)  # fmt: skip
from tests.labkit import BROKEN_CRIU, Workload, on, start

pytestmark = pytest.mark.lab


def test_lost_connection_retakes_the_lock_and_a_second_controller_is_refused(
    lab: labmod.Lab, cleanup: list[Path], case: Case, tmp_path: Path, gate: Path,
    background: Callable[..., Background],
) -> None:  # fmt: skip
    case.fault = "controller's ssh to the source dropped at verify; a 2nd controller tries"
    wl = start(lab, "host-a", "counter-lostlock", container=False)
    cleanup.append(wl.count_file)
    state = tmp_path / "state"
    cfg = gated_config(lab, tmp_path / "first.yaml", wl, state, gate=gate)
    run = background("run", "gated", "host-a", "host-b", "--json", config=cfg, state_dir=state)
    run.wait("verify")
    before = wl.count()
    drop_connections(lab, "host-a")  # the controller's connection to host-a
    other = gated_config(lab, tmp_path / "second.yaml", wl, tmp_path / "other", gate=gate)
    second = run_migrate("run", "gated", "host-a", "host-c", "--json", config=other)
    gate.touch()
    out = run.finish()
    case.ended(out)
    assert second.rc == 1 and "is stopped" in second.error, second
    assert out.rc == 0 and out.status == "succeeded", out
    assert any("taken again before confirm" in n for n in out.report["notes"]), out.report  # type: ignore[index]
    assert_one_copy(lab, wl, "host-b", before)
    assert census(lab, wl.count_file, ["host-c"]).copies == 0
    assert leftovers(lab, out.id) == []


def test_recover_of_a_live_migration_changes_nothing(
    lab: labmod.Lab, cleanup: list[Path], case: Case, tmp_path: Path, gate: Path,
    background: Callable[..., Background],
) -> None:  # fmt: skip
    case.fault = "migrate recover run during a live migration (held at verify)"
    wl = start(lab, "host-a", "counter-liverecover", container=False)
    cleanup.append(wl.count_file)
    state = tmp_path / "state"
    cfg = gated_config(lab, tmp_path / "live.yaml", wl, state, gate=gate)
    run = background("run", "gated", "host-a", "host-b", "--json", config=cfg, state_dir=state)
    run.wait("verify")
    before = wl.count()
    rec = run_migrate("recover", config=cfg)
    gate.touch()
    out = run.finish()
    case.ended(out)
    assert rec.rc == 1 and "is live" in rec.stderr, rec
    assert out.rc == 0 and out.status == "succeeded", out
    ended = [e for e in run.events() if e["event"] == "end"]
    assert len(ended) == 1 and "recovered" not in ended[0]
    assert_one_copy(lab, wl, "host-b", before)


def test_rollback_that_cannot_restore_keeps_the_last_copy_for_recover(
    lab: labmod.Lab, case: Case, tmp_path: Path, net_counter: Callable[..., Workload]
) -> None:
    case.fault = "restore fails on both hosts (own network: rollback restores the source)"
    wl = net_counter("lastcopy", "198.18.0.61", "02:6d:67:00:05:61", "vrt2")
    broken = tmp_path / "criu-fails-restore"
    broken.write_text(BROKEN_CRIU)
    broken.chmod(0o755)
    state = tmp_path / "state"
    both = {h: {"criu": str(broken)} for h in ("host-a", "host-b")}
    cfg = fault_config(lab, tmp_path / "broken.yaml", state_dir=state, hosts=both)
    # (stop-copy: its rollback restores the source from its own images; stream's unlocks the
    # stopped source instead, its images lacking the pages: test_live_tcp)
    out = run_migrate("run", wl.spec, "host-a", "host-b", "--json", "--strategy", "stopcopy",
                      config=cfg)  # fmt: skip
    case.ended(out)
    notes = " ".join(out.report["notes"])  # type: ignore[index]
    assert out.rc == 1 and out.status == "failed", out
    assert "ROLLBACK INCOMPLETE" in notes and "images kept" in notes, notes
    assert any(out.id in d for d in image_dirs(lab, "host-a")), "the source's images are kept"
    hist = run_migrate("history", "--json", config=cfg)
    assert next(h for h in json.loads(hist.stdout) if h["id"] == out.id)["status"] is None
    dumped = wl.count()  # the count at the dump: what the images hold

    good = fault_config(lab, tmp_path / "good.yaml", state_dir=state)
    rec = run_migrate("recover", out.id, "--json", config=good)
    case.outcome += f"; recover: {rec.status} (exit {rec.rc})"
    assert rec.rc == 3 and rec.status == "rolled_back", rec
    assert_one_copy(lab, wl, "host-a", dumped)
    assert leftovers(lab, out.id) == []


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[Callable[[Path], None]]:
    """read_only(dir) makes dir read-only (a bind mount over it) until the test ends."""
    mounted: list[Path] = []

    def make(path: Path) -> None:
        subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
        mounted.append(path)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True)

    yield make
    for path in reversed(mounted):
        subprocess.run(["umount", str(path)], check=False)


def test_state_dir_read_only_mid_migration_rolls_back_in_one_line(
    lab: labmod.Lab, cleanup: list[Path], case: Case, tmp_path: Path, gate: Path,
    background: Callable[..., Background], read_only: Callable[[Path], None],
) -> None:  # fmt: skip
    case.fault = "controller's state dir read-only at verify"
    wl = start(lab, "host-a", "counter-rostate", container=False)
    cleanup.append(wl.count_file)
    state = tmp_path / "state"
    cfg = gated_config(lab, tmp_path / "ro.yaml", wl, state, gate=gate)
    run = background("run", "gated", "host-a", "host-b", "--json", config=cfg, state_dir=state)
    run.wait("verify")
    before = wl.count()
    read_only(state / "journal")
    gate.touch()
    out = run.finish()
    case.ended(out)
    assert out.rc == 3 and out.status == "rolled_back", out
    assert "cannot write the journal" in out.error and "Read-only file system" in out.error
    assert "Traceback" not in out.stderr
    assert_one_copy(lab, wl, "host-a", before)
    assert leftovers(lab, out.id) == []


def test_gc_removes_only_what_no_migration_owns(
    lab: labmod.Lab, cleanup: list[Path], case: Case, tmp_path: Path
) -> None:
    case.fault = "leftovers on hosts: an ended migration's dir, a stale lock, an open one's dir"
    wl = start(lab, "host-a", "counter-gc", container=False)
    cleanup.append(wl.count_file)
    state = tmp_path / "state"
    cfg = fault_config(lab, tmp_path / "gc.yaml", state_dir=state)
    out = run_migrate("run", wl.spec, "host-a", "host-b", "--json", config=cfg)
    assert out.rc == 0, out
    ended = out.id
    unfinished = "20261203T000000-0a0b0c"
    (state / "journal" / f"{unfinished}.jsonl").write_text(json.dumps({
        "t": 1.0, "event": "start", "id": unfinished, "workload": "w", "source": "host-a",
        "destination": "host-b", "strategy": "stopcopy",
    }) + "\n")  # fmt: skip
    wd_a, wd_b = lab.host("host-a").workdir, lab.host("host-b").workdir
    on(lab, "host-a", 'mkdir -p "$1/images/$2" "$1/locks" && touch "$1/locks/pid-99999.lock"',
       str(wd_a), ended)  # fmt: skip
    on(lab, "host-b", 'mkdir -p "$1/images/$2"', str(wd_b), unfinished)
    try:
        shown = run_migrate("gc", "--json", config=cfg)
        rows = json.loads(shown.stdout)["leftovers"]
        verdict = {(r["host"], r["what"].rsplit("/", 1)[1]): r["garbage"] for r in rows}
        assert verdict[("host-a", ended)] and verdict[("host-a", "pid-99999.lock")]
        assert verdict[("host-b", unfinished)] is False
        assert ended in image_dirs(lab, "host-a"), "a dry run removes nothing"
        applied = run_migrate("gc", "--apply", config=cfg)
        case.outcome = f"gc --apply: exit {applied.rc}"
        assert applied.rc == 0, applied
        assert ended not in image_dirs(lab, "host-a")
        assert not on(lab, "host-a", 'ls -- "$1/locks"', str(wd_a)).count("pid-99999.lock")
        assert unfinished in image_dirs(lab, "host-b"), "an unfinished migration's images stay"
    finally:
        on(lab, "host-b", 'rm -rf -- "$1/images/$2"', str(wd_b), unfinished)
