"""Pre-copy on this machine's kernel, which has no soft-dirty tracking: `--strategy precopy`
is refused in pre-flight with the reason, and `auto` says it falls back to stream. (Pre-copy
itself is proven in a VM whose kernel has it: tests/vm.)"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from orchestrator import lab as labmod
from tests.labkit import migrate, running_pids, start, wait_for

pytestmark = pytest.mark.lab


@pytest.fixture(autouse=True)
def _no_dirty_tracking() -> None:
    probe = subprocess.run(["criu", "check", "--feature", "mem_dirty_track"],
                           capture_output=True, check=False)  # fmt: skip
    if probe.returncode == 0:
        pytest.skip("this kernel tracks dirty memory: the refusal cannot happen here")


def test_precopy_is_refused_in_preflight(lab: labmod.Lab, cleanup: list[Path]) -> None:
    wl = start(lab, "host-a", "counter-precopy", container=False)
    cleanup.append(wl.count_file)
    before = wl.count()
    r = migrate("run", wl.spec, "host-a", "host-b", "--strategy", "precopy", "--json",
                config=lab.config_path)  # fmt: skip
    assert r.returncode == 1, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["status"] == "failed" and report["strategy"] == "precopy"
    assert report["error"] == (
        "pre-copy needs CRIU feature mem_dirty_track on host-a, which its kernel or CRIU lacks "
        "(`criu check --feature`)"
    )
    assert [p["name"] for p in report["phases"]] == ["preflight"]
    assert any("nothing was changed" in n for n in report["notes"])
    assert report["rounds"] == [] and report["stopped_by"] is None
    # Nothing changed: it runs on host-a, as before, and no image dir was made anywhere.
    assert wl.root_pid in running_pids(lab, "host-a", wl.count_file)
    assert wl.count() > before
    for host in lab.hosts:
        images = host.workdir / "images"
        assert not images.exists() or not list(images.glob("*")), host.name
    # The human output says it in one line on stderr.
    r = migrate("run", wl.spec, "host-a", "host-b", "--strategy", "precopy",
                config=lab.config_path)  # fmt: skip
    assert r.returncode == 1
    assert r.stderr.strip().startswith("error: pre-copy needs CRIU feature mem_dirty_track")


def test_auto_falls_back_to_stream_with_a_note(lab: labmod.Lab, cleanup: list[Path]) -> None:
    wl = start(lab, "host-a", "counter-auto", container=False)
    cleanup.append(wl.count_file)
    r = migrate("run", wl.spec, "host-a", "host-b", "--dry-run", config=lab.config_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "strategy stream" in r.stdout
    assert "note: auto: stream (" in r.stdout and "mem_dirty_track" in r.stdout
    assert "pre-dump" not in r.stdout


@pytest.mark.parametrize(
    "flag, value, error",
    [
        ("--goal", "150", "--goal: must be between 0 and 100, not 150"),
        ("--max-iterations", "0", "--max-iterations: must be between 1 and 100"),
        ("--max-downtime-ms", "0", "--max-downtime-ms: must be at least 1"),
        ("--max-precopy-seconds", "x", "invalid float value"),
    ],
)
def test_bad_stop_rule_flags(lab: labmod.Lab, flag: str, value: str, error: str) -> None:
    r = migrate("run", "pid:2", "host-a", "host-b", "--strategy", "precopy", flag, value,
                config=lab.config_path)  # fmt: skip
    assert r.returncode == 2 and error in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_sync_paths_travel_while_frozen(
    lab: labmod.Lab, cleanup: list[Path], tmp_path: Path
) -> None:
    """A workload's sync_paths are rsynced to the same paths on the destination (here with
    stop-copy: once, while frozen). The lab's hosts share one filesystem, so what this shows
    is the real rsync of them succeeding inside the migration, as the log of commands says."""
    wl = start(lab, "host-a", "counter-sync", container=False)
    cleanup.append(wl.count_file)
    extra = lab.dir / "workloads" / "counter-sync.conf"
    extra.write_text("not on shared storage\n")
    config = yaml.safe_load(lab.config_path.read_text())
    config["workloads"] = {"syncer": {"pidfile": f"{wl.count_file}.pid",
                                      "sync_paths": [str(extra), str(wl.count_file)]}}  # fmt: skip
    path = tmp_path / "migrate.yaml"
    path.write_text(yaml.safe_dump(config))
    r = migrate("-v", "run", "syncer", "host-a", "host-b", "--json", config=path)
    assert r.returncode == 0, r.stdout + r.stderr
    synced = [ln for ln in r.stderr.splitlines() if "rsync" in ln and "--relative" in ln]
    assert len(synced) == 1 and synced[0].endswith(f"{extra} {wl.count_file} 198.18.0.2:/")
    after = wl.count()
    wait_for(lambda: wl.count() > after + 5, what="the counter to keep counting on host-b")
