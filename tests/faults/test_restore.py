"""Fault: CRIU's restore fails on the destination. The source must run on, as before."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator import lab as labmod
from tests.faults.kit import FaultCase, assert_one_copy, leftovers, phases
from tests.labkit import BROKEN_CRIU

pytestmark = pytest.mark.lab


def test_restore_fails_on_destination(
    lab: labmod.Lab, fault_case: Callable[..., FaultCase], tmp_path: Path
) -> None:
    broken = tmp_path / "criu-fails-restore"
    broken.write_text(BROKEN_CRIU)
    broken.chmod(0o755)
    fc = fault_case(
        "criu restore fails on the destination", "fault-restore",
        hosts={"host-b": {"criu": str(broken)}},
    )  # fmt: skip
    wl, before = fc.wl, fc.before

    out = fc.migrate("host-b")
    fc.ended(out)

    assert out.rc == 3, out
    assert out.status == "rolled_back"
    assert "restore" in out.error and "host-b" in out.error, out.error
    assert any("injected" in line for line in out.report["criu_errors"]), out.report  # type: ignore[index]
    assert ("restore", "failed") in phases(out)
    assert ("undo dump", "undone") in phases(out)
    c = assert_one_copy(lab, wl, "host-a", before)
    assert c.where() == {"host-a": [wl.root_pid]}, "the source copy itself runs on"
    assert leftovers(lab, out.id) == []
