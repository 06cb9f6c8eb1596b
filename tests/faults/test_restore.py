"""Fault: CRIU's restore fails on the destination. The source must run on, as before."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator import lab as labmod
from tests.faults.kit import (
    Case,
    assert_one_copy,
    census,
    fault_config,
    leftovers,
    phases,
    run_migrate,
)
from tests.labkit import BROKEN_CRIU, start

pytestmark = pytest.mark.lab


def test_restore_fails_on_destination(
    lab: labmod.Lab, cleanup: list[Path], case: Case, tmp_path: Path
) -> None:
    case.fault = "criu restore fails on the destination"
    wl = start(lab, "host-a", "fault-restore", container=False)
    cleanup.append(wl.count_file)
    broken = tmp_path / "criu-fails-restore"
    broken.write_text(BROKEN_CRIU)
    broken.chmod(0o755)
    cfg = fault_config(
        lab, tmp_path / "migrate.yaml", state_dir=tmp_path / "state",
        hosts={"host-b": {"criu": str(broken)}},
    )  # fmt: skip
    before = wl.count()

    out = run_migrate("run", wl.spec, "host-a", "host-b", "--json", config=cfg)
    case.ended(out)
    case.counted(census(lab, wl.count_file))

    assert out.rc == 3, out
    assert out.status == "rolled_back"
    assert "restore" in out.error and "host-b" in out.error, out.error
    assert any("injected" in line for line in out.report["criu_errors"]), out.report  # type: ignore[index]
    assert ("restore", "failed") in phases(out)
    assert ("undo dump", "undone") in phases(out)
    c = assert_one_copy(lab, wl, "host-a", before)
    assert c.where() == {"host-a": [wl.root_pid]}, "the source copy itself runs on"
    assert leftovers(lab, out.id) == []
